"""The steps of ``benchmarks/gpu_check.sh`` that need Python: each prints ``RESULT: ...`` lines for its table.

    python benchmarks/gpu_check.py explain --workdir DIR [--images 2000] [--batch-size 64] [--device cuda]
    python benchmarks/gpu_check.py serve   --workdir DIR [--requests 256] [--clients 32] [--device cuda]
    python benchmarks/gpu_check.py repro   --workdir DIR [--device cuda] [--tiny]

``explain``: ``ptame explain`` (``--use-gpu`` on CUDA) on sample JPEGs against the plain
single-process loop of ``bench_batch.py`` on the same device, GPU utilisation sampled by
``nvidia-smi`` while the job runs, and the decoding cores one GPU needs (plain loop's decode time
over its explain time). ``serve``: ``ptame serve`` (``--use-gpu`` on CUDA) answering a burst of
concurrent requests. ``repro``: ``dvc repro`` of a small configuration in a temporary copy of the
project, with ``train.use_gpu``, ``train.amp`` and ``explain.use_gpu`` (and ``evaluate.use_gpu``
where params.yaml has that knob) on CUDA. A step exits non-zero when what it checks is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONE, AUXILIARY = "builtin:efficientnet_lite2", "builtin:efficientnet_lite0"

logger = logging.getLogger("gpu_check")


def result(text: str) -> None:
    """One line for the check's table."""
    print(f"RESULT: {text}", flush=True)


def ptame_cli() -> list[str]:
    return [sys.executable, "-m", "ptame.cli"]


def save_model(workdir: Path, device: str):  # -> tuple[Explainer, Path]
    """The embedded default's backbone and auxiliary with an untrained head (speed does not depend on it)."""
    import torch

    from ptame.explainer import Explainer

    torch.manual_seed(0)
    explainer = Explainer.from_uris(BACKBONE, AUXILIARY)
    model = explainer.save(workdir / "model")
    return explainer.to(device), model


class GpuSampler:
    """``nvidia-smi`` utilisation samples every 250 ms while in the ``with`` block (none without it)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    def summary(self) -> str:
        if not self.samples:
            return "GPU utilisation: not sampled (no nvidia-smi)"
        busy = [s for s in self.samples if s > 0]
        return (f"GPU utilisation mean {statistics.mean(self.samples):.0f}% over the job, "
                f"{statistics.mean(busy) if busy else 0:.0f}% while busy, max {max(self.samples):.0f}%")  # fmt: skip


# ------------------------------------------------------------------------------------ explain


def check_explain(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_batch import plain_loop

    from ptame.demo import write_sample_jpegs

    work = Path(args.workdir)
    gpu = args.device == "cuda"
    t0 = time.perf_counter()
    paths = write_sample_jpegs(work / "images", args.images)
    explainer, model = save_model(work, args.device)
    logger.info("%d JPEGs and the model written in %.1f s", len(paths), time.perf_counter() - t0)

    threads = torch.get_num_threads()
    plain_loop(explainer, paths[: args.batch_size], args.batch_size, 5, threads)  # warm-up (cuDNN, allocator)
    plain = plain_loop(explainer, paths, args.batch_size, 5, threads)
    plain_rate = len(paths) / plain["seconds"]
    explain_rate = 1.0 / plain["explain_s_per_image"]
    del explainer
    if gpu:
        torch.cuda.empty_cache()

    out = work / "explanations"
    cmd = [*ptame_cli(), "explain", "--model", str(model), "--input", str(work / "images"), "--output", str(out),
           "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size), "--no-progress"]  # fmt: skip
    if gpu:
        cmd.append("--use-gpu")
    env = {**os.environ, "RAY_ADDRESS": "local"}
    start, wall = time.perf_counter(), time.time()
    with GpuSampler() as sampler:
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - start
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        result(f"ptame explain failed (exit {proc.returncode})")
        return 1
    parts = sorted(out.glob("part-*.parquet"))
    table = pq.read_table(parts, columns=["image_id", "error"])
    ids = table.column("image_id").to_pylist()
    errors = sum(e is not None for e in table.column("error").to_pylist())
    landed = sorted(p.stat().st_mtime for p in parts)
    steady = (len(ids) - args.chunk_size) / (landed[-1] - landed[0]) if len(landed) > 1 else float("nan")
    job_rate = len(ids) / seconds
    where = torch.cuda.get_device_name(0) if gpu else f"CPU ({threads} threads)"
    result(f"{len(ids)} images on {where}, batch {args.batch_size}, chunks of {args.chunk_size}, {os.cpu_count()} CPUs")
    result(f"ptame explain{' --use-gpu' if gpu else ''}: {job_rate:.1f} images/s whole job ({seconds:.1f} s incl. "
           f"Ray start-up), {steady:.1f} images/s after start-up (first to last chunk)")  # fmt: skip
    result(f"plain {args.device} loop (1 process, decode + explain): {plain_rate:.1f} images/s; "
           f"whole job / plain = {job_rate / plain_rate:.2f}x, after start-up / plain = {steady / plain_rate:.2f}x")  # fmt: skip
    result(f"explain alone (pre-decoded batches): {explain_rate:.1f} images/s; decode + preprocess "
           f"{plain['decode_s_per_image'] * 1e3:.1f} ms/image on one core, so one {args.device} needs "
           f"~{plain['decode_s_per_image'] / plain['explain_s_per_image']:.1f} decoding cores")  # fmt: skip
    result(sampler.summary())
    if len(set(ids)) != len(paths) or len(ids) != len(paths) or errors:
        result(f"WRONG OUTPUT: {len(ids)} rows ({len(set(ids))} distinct) for {len(paths)} inputs, {errors} errors")
        return 1
    return 0


# -------------------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serve(args: argparse.Namespace) -> int:
    import httpx
    import numpy as np

    from ptame.demo import write_sample_jpegs

    work = Path(args.workdir)
    bodies = [p.read_bytes() for p in write_sample_jpegs(work / "serve-images", 16)]
    _, model = save_model(work, "cpu")
    port = free_port()
    cmd = [*ptame_cli(), "serve", "--model", str(model), "--port", str(port), "--address", "local",
           "--max-batch-size", str(args.max_batch_size), "--max-queued", "-1"]  # fmt: skip
    if args.device == "cuda":
        cmd.append("--use-gpu")
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
            deadline = time.monotonic() + args.start_timeout
            while True:
                if server.poll() is not None:
                    result(f"ptame serve exited with {server.returncode} before answering (see serve.log)")
                    return 1
                try:
                    if client.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    result(f"ptame serve not ready after {args.start_timeout} s")
                    return 1
                time.sleep(0.5)
            started = time.monotonic() - (deadline - args.start_timeout)

            def post(i: int) -> tuple[int, float, dict]:
                t = time.perf_counter()
                r = client.post(f"{base}/explain", content=bodies[i % len(bodies)], headers={"content-type": "image/jpeg"})
                return r.status_code, time.perf_counter() - t, r.json() if r.status_code == 200 else {"detail": r.text}

            post(0)  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                answers = list(pool.map(post, range(args.requests)))
            seconds = time.perf_counter() - start
            info = client.get(f"{base}/model").json()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # ptame serve shuts Serve and its Ray down
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
    codes = [c for c, _, _ in answers]
    lat = np.array([t for _, t, _ in answers])
    good = [a for c, _, a in answers if c == 200]
    replica = info.get("replica", {})
    result(f"ready after {started:.0f} s; {args.requests} requests from {args.clients} clients: "
           f"{codes.count(200)} x 200, others {sorted(set(codes) - {200})}")  # fmt: skip
    result(f"{args.requests / seconds:.1f} requests/s, latency p50 {np.percentile(lat, 50):.3f} s, "
           f"p99 {np.percentile(lat, 99):.3f} s; replica: {replica.get('images')} images in "
           f"{replica.get('forward_passes')} forward passes")  # fmt: skip
    same = len({a["pred_class"] for a in good[:: len(bodies)]}) <= 1
    if codes.count(200) != args.requests or not all("saliency_png" in a for a in good) or not same:
        result("WRONG ANSWERS: not every request got a 200 with a saliency map, or the same image got different classes")
        return 1
    return 0


# -------------------------------------------------------------------------------------- repro


def small_params(gpu: bool, tiny: bool) -> dict:
    """params.yaml shrunk to a few minutes; ``tiny``: EfficientNet-Lite0 at 64 px and 3 steps (CPU dry runs)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if tiny:
        params["model"].update(backbone="builtin:efficientnet_lite0", preprocessing={"input_size": 64, "resize": 64})
        params["data"]["demo"].update(train_images=16, eval_images=2, image_size=128, min_score=0.05)
        params["train"].update(max_steps=3, batch_size=4, checkpoint_every=2, lr=1e-3)
        params["evaluate"].update(max_images=2, batch_size=4)
    else:
        params["data"]["demo"].update(train_images=96, eval_images=4)
        params["train"].update(max_steps=12, batch_size=8, checkpoint_every=6)
        params["evaluate"].update(max_images=4, batch_size=4)
    params["evaluate"]["methods"]["rise"].update(num_masks=32, max_images=1, batch_size=32)
    params["evaluate"]["gallery"]["images"] = 1
    params["register"]["name"] = "gpu-check-ptame"
    params["explain"].update(batch_size=8, concurrency=1)
    params["train"].update(use_gpu=gpu, amp=gpu)
    params["explain"]["use_gpu"] = gpu
    if "use_gpu" in params["evaluate"]:
        params["evaluate"]["use_gpu"] = gpu
    return params


def check_repro(args: argparse.Namespace) -> int:
    import yaml

    work = Path(args.workdir)
    project = work / "project"
    project.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for folder in ("classes", "pipelines", "ptame"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = small_params(args.device == "cuda", args.tiny)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'registry.db'}", PYTHONUNBUFFERED="1")
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=project, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout[-6000:])
    sys.stderr.write(proc.stderr[-6000:])
    stages = [s for s in ("prepare", "train", "evaluate", "register", "explain") if f"Running stage '{s}'" in proc.stdout]
    gpu_knobs = ", ".join(f"{k}={v}" for k, v in (
        ("train.use_gpu", params["train"]["use_gpu"]), ("train.amp", params["train"]["amp"]),
        ("evaluate.use_gpu", params["evaluate"].get("use_gpu", "n/a")), ("explain.use_gpu", params["explain"]["use_gpu"]),
    ))  # fmt: skip
    result(f"dvc repro {'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} in {seconds:.0f} s; "
           f"stages run: {' -> '.join(stages) or 'none'}; {gpu_knobs}")  # fmt: skip
    if proc.returncode != 0:
        return 1
    train = json.loads((project / "reports/train.json").read_text())
    metrics = json.loads((project / "reports/metrics.json").read_text())
    explained = sum(1 for _ in (project / "data/explanations").glob("part-*.parquet"))
    ptame = metrics.get("ptame", {})
    result(f"train: {json.dumps({k: train[k] for k in list(train)[:6]})}; ptame ROAD-MoRF {ptame.get('ROAD-MoRF')}, "
           f"GridPG {ptame.get('GridPG')}; {explained} explanation file(s)")  # fmt: skip
    return 0 if explained else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("explain", "serve", "repro"):
        p = sub.add_parser(name)
        p.add_argument("--workdir", required=True, help="an empty scratch directory")
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p = sub.choices["explain"]
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=128)
    p = sub.choices["serve"]
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--start-timeout", type=float, default=120.0)
    sub.choices["repro"].add_argument("--tiny", action="store_true", help="the test suite's tiny configuration")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            result("no CUDA device visible to torch")
            return 1
    return {"explain": check_explain, "serve": check_serve, "repro": check_repro}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
