"""Served explanations (``ptame serve``: Ray Serve over HTTP) against the bulk paths, in one run.

One local Ray runs two copies of the served application side by side, identical but for dynamic
batching (``max_batch_size`` 16 vs 1), each one replica reserving ``--replica-cpus`` CPUs; the
bulk paths run in the same Ray session (``ptame explain``: Ray Data, one explain actor) and in
this process (a plain decode + explain loop in batches of 16). All explain the same JPEGs (random
crops of the demo photos, 300-640 px) with the same model: the embedded default's
EfficientNet-Lite2 backbone and EfficientNet-Lite0 auxiliary with an untrained head (speed does
not depend on its weights). Rounds are repeated round robin so every figure sees the same load;
medians are reported. The HTTP clients run in this process, on the same cores as the server.

Measured: p50 / p99 latency of one client sending one image at a time; images/s with
``--clients`` concurrent clients, batching on and off; served images/s as a fraction of the bulk
paths' images/s (the plain loop; and a whole ``ptame explain`` job, whose Ray Data start-up and
model loading weigh on so few images).

    python benchmarks/bench_serve.py [--images 48] [--requests 48] [--latency-requests 25] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from ptame.data import prepare_image
from ptame.demo import write_sample_jpegs
from ptame.explainer import Explainer
from ptame.records import explain_prepared

BACKBONE, AUXILIARY = "builtin:efficientnet_lite2", "builtin:efficientnet_lite0"


def plain_loop(explainer: Explainer, bodies: list[bytes], batch_size: int = 16) -> float:
    """images/s of decode + preprocess + explain in this process, ``batch_size`` at a time."""
    start = time.perf_counter()
    for i in range(0, len(bodies), batch_size):
        items = [prepare_image(b, explainer.preprocessing) for b in bodies[i : i + batch_size]]
        explain_prepared(explainer, items, topk=5)
    return len(bodies) / (time.perf_counter() - start)


def ray_job(model: Path, folder: Path, out: Path) -> float:
    """images/s of a whole ``ptame explain`` job (one explain actor, batches of 16), start-up included."""
    from ptame.batch import explain_to_parquet

    start = time.perf_counter()
    summary = explain_to_parquet(str(model), str(folder), str(out), batch_size=16, concurrency=1, progress=False)
    return summary.images / (time.perf_counter() - start)


def post(client: httpx.Client, url: str, body: bytes) -> None:
    r = client.post(url, content=body, headers={"content-type": "image/jpeg"})
    r.raise_for_status()


def throughput(client: httpx.Client, url: str, bodies: list[bytes], requests: int, clients: int) -> float:
    """images/s with ``clients`` threads each sending one request at a time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: post(client, url, bodies[i % len(bodies)]), range(requests)))
    return requests / (time.perf_counter() - start)


def latencies(client: httpx.Client, url: str, bodies: list[bytes], requests: int) -> list[float]:
    """Seconds per request of a single client, one request at a time."""
    out = []
    for i in range(requests):
        start = time.perf_counter()
        post(client, url, bodies[i % len(bodies)])
        out.append(time.perf_counter() - start)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="distinct JPEGs (bulk paths explain each once)")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput measurement")
    parser.add_argument("--latency-requests", type=int, default=25, help="requests per single-client latency run")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput")
    parser.add_argument("--replica-cpus", type=float, default=2, help="CPUs (= torch threads) per served replica")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repetitions; medians are reported")
    parser.add_argument("--use-gpu", action="store_true", help="serve on one GPU per replica (bulk paths: CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from ptame.serve import deploy

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bodies = [p.read_bytes() for p in write_sample_jpegs(root / "images", args.images)]
        torch.manual_seed(0)
        explainer = Explainer.from_uris(BACKBONE, AUXILIARY)
        model = explainer.save(root / "model")
        torch.set_num_threads(max(1, int(args.replica_cpus)))
        plain_loop(explainer, bodies[:16])  # warm-up

        port = free_port()
        # room for both served replicas and for the Ray Data job (its decode tasks + one actor)
        cpus = int(2 * args.replica_cpus) + 2
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
        results: dict[str, list[float]] = {}
        lat: dict[str, list[float]] = {"batching on": [], "batching off": []}
        threads: dict[str, int] = {}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            apps = {"batching on": 16, "batching off": 1}
            for label, batch in apps.items():
                name = "batched" if batch > 1 else "unbatched"
                info = deploy(
                    {"model": str(model), "max_batch_size": batch, "batch_wait_timeout_s": 0.01,
                     "num_cpus": args.replica_cpus, "use_gpu": args.use_gpu, "max_ongoing_requests": 32},
                    name=name, route_prefix=f"/{name}",
                )  # fmt: skip
                threads[label] = info["replica"]["torch_threads"]
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
                for name in ("batched", "unbatched"):  # warm-up
                    throughput(client, f"{base}/{name}/explain", bodies, 4, 2)
                for r in range(args.rounds):
                    results.setdefault("plain loop", []).append(plain_loop(explainer, bodies))
                    results.setdefault("ptame explain", []).append(ray_job(model, root / "images", root / f"out{r}"))
                    for label, name in (("batching on", "batched"), ("batching off", "unbatched")):
                        url = f"{base}/{name}/explain"
                        served = throughput(client, url, bodies, args.requests, args.clients)
                        results.setdefault(label, []).append(served)
                        lat[label] += latencies(client, url, bodies, args.latency_requests)
                    done = ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items())
                    print(f"round {r + 1}/{args.rounds} (images/s): {done}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

    rate = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\n{args.images} JPEGs (300-640 px), {BACKBONE} + {AUXILIARY} at {explainer.preprocessing.input_size} px, "
        f"{args.rounds} rounds (medians), {args.clients} clients x {args.requests} requests for throughput; "
        f"served replica: {args.replica_cpus:g} CPUs, torch threads {threads}; plain loop: {torch.get_num_threads()}"
    )
    print(
        f"\n| served | p50 latency, 1 client (s) | p99 latency, 1 client (s) | images/s, {args.clients} clients "
        "| / plain loop | / ptame explain |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label in ("batching on", "batching off"):
        p50, p99 = np.percentile(lat[label], [50, 99])
        ratios = f"{rate[label] / rate['plain loop']:.2f} | {rate[label] / rate['ptame explain']:.2f}"
        print(f"| {label} | {p50:.3f} | {p99:.3f} | {rate[label]:.2f} | {ratios} |")
    print(
        f"\nbulk images/s: plain loop {rate['plain loop']:.2f}; ptame explain {rate['ptame explain']:.2f} "
        f"(a whole {args.images}-image job, Ray Data start-up and model loading included). "
        f"Batching on / off: {rate['batching on'] / rate['batching off']:.2f}x. Per round: "
        + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in results.items())
    )
    print(f"latency samples per setting: {len(lat['batching on'])} (p99 of so few is close to the maximum)")

if __name__ == "__main__":
    main()
