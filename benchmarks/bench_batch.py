"""Bulk explanation: ``ptame explain`` (Ray Data) against a plain single-process PyTorch loop.

All explain the same JPEGs (random crops of the embedded default's photos, 300-640 px) with the
same model (the embedded default: EfficientNet-Lite2 backbone read by the head through its own feature
maps, ``--auxiliary backbone``; ``builtin:efficientnet_lite0`` is the paper's second network; an
untrained head: speed does not depend on its weights) and the same batch size, in one run, round
robin, so all see the same machine load. The plain loop reads, decodes, preprocesses and explains
(`ptame.records`) batch after batch, once with torch's default threads and once with one thread.
Each `ptame explain` run starts a local Ray of ``--num-cpus`` CPUs inside the clock and stops it
at the end, as the command does on a machine without a cluster, so the whole-job figure is what a
user waits for: Ray's start (``ray.init``, also printed alone; a cluster that outlives its jobs pays
it once), actor start-up and model loading, and the explaining.

Then a projection for 1 million and 100 million images from the measured per-image costs: CPU
core-hours from the one-thread loop's decode + explain time, GPU-hours at an *assumed* GPU
throughput (``--gpu-images-per-s``, stated in the table, not measured here), the CPU cores that
must decode to keep one such GPU busy, and the Parquet size from the measured bytes per row.

    python benchmarks/bench_batch.py [--images 240] [--batch-size 16] [--chunk-size 32] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ptame.batch import explain_to_parquet
from ptame.data import prepare_image
from ptame.demo import write_sample_jpegs
from ptame.explainer import Explainer
from ptame.explanations import explanations_table
from ptame.process import init_ray
from ptame.records import explain_prepared


def plain_loop(explainer: Explainer, paths: list[Path], batch_size: int, topk: int, threads: int) -> dict[str, float]:
    """One process, ``threads`` torch threads: read + decode + preprocess a batch, explain it, build its rows."""
    prep = explainer.preprocessing
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    decode = explain = 0.0
    start = time.perf_counter()
    try:
        for i in range(0, len(paths), batch_size):
            t0 = time.perf_counter()
            batch = paths[i : i + batch_size]
            items = [prepare_image(p.read_bytes(), prep) for p in batch]
            t1 = time.perf_counter()
            rows = explain_prepared(explainer, items, topk=topk)
            explanations_table([p.name for p in batch], rows, "plain")
            t2 = time.perf_counter()
            decode, explain = decode + t1 - t0, explain + t2 - t1
    finally:
        torch.set_num_threads(before)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "decode_s_per_image": decode / len(paths), "explain_s_per_image": explain / len(paths)}


def ray_job(
    model: Path, folder: Path, out: Path, batch_size: int, chunk_size: int, topk: int, num_cpus: int
) -> dict[str, float]:
    """`ptame explain` into a fresh directory on a local Ray it starts and stops (inside the clock);
    also Ray's start and the start-up time (until the first chunk lands)."""
    import ray

    start, wall = time.perf_counter(), time.time()
    init_ray("local", num_cpus=num_cpus, include_dashboard=False)  # as `ptame explain` starts it, on num_cpus
    ray_start = time.perf_counter() - start
    try:
        summary = explain_to_parquet(
            str(model), str(folder), str(out), batch_size=batch_size, chunk_size=chunk_size, topk=topk, progress=False
        )
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - start
    landed = sorted(p.stat().st_mtime for p in out.glob("part-*.parquet"))
    return {
        "seconds": seconds,
        "ray_start_s": ray_start,
        "first_chunk_s": landed[0] - wall,
        # after start-up: the images of all chunks but the first over the time between first and last
        "steady_images_per_s": (summary.images - chunk_size) / (landed[-1] - landed[0]),
        "bytes_per_row": sum(p.stat().st_size for p in out.glob("part-*.parquet")) / summary.images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=32, help="images per Parquet file in the Ray job")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--auxiliary", default="backbone", help="the head's feature source (default: %(default)s, as params.yaml)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (the plain loop uses torch's default threads)")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin repetitions; medians are reported")
    parser.add_argument("--gpu-images-per-s", type=float, default=1000.0, help="ASSUMED explain throughput of one GPU, for the projection")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_sample_jpegs(root / "images", args.images)
        torch.manual_seed(0)
        explainer = Explainer.from_uris("builtin:efficientnet_lite2", args.auxiliary)
        model = explainer.save(root / "model")
        threads = torch.get_num_threads()
        plain_loop(explainer, paths[: args.batch_size], args.batch_size, args.topk, threads)  # warm-up
        plain, single, batch = [], [], []
        for r in range(args.repeats):
            plain.append(plain_loop(explainer, paths, args.batch_size, args.topk, threads))
            single.append(plain_loop(explainer, paths, args.batch_size, args.topk, 1))
            out = root / f"out{r}"
            batch.append(ray_job(model, root / "images", out, args.batch_size, args.chunk_size, args.topk, args.num_cpus))

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    n = args.images
    rates = {
        f"plain PyTorch loop, {threads} torch threads (decode + explain)": n / med(plain, "seconds"),
        "plain PyTorch loop, 1 torch thread": n / med(single, "seconds"),
        f"ptame explain, whole job incl. Ray's start and start-up ({med(batch, 'first_chunk_s'):.0f} s to the first chunk)": n
        / med(batch, "seconds"),
        "ptame explain after start-up (first to last chunk landed)": med(batch, "steady_images_per_s"),
    }
    base = next(iter(rates.values()))
    print(f"\n{n} images, batch {args.batch_size}, Ray chunks of {args.chunk_size}, local Ray of {args.num_cpus} CPUs, "
          f"median of {args.repeats} round-robin run(s)")  # fmt: skip
    best = max(list(rates.values())[:2])
    print("| run | images/s | vs plain loop (default threads) | vs the faster plain loop |")
    print("| --- | ---: | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / base:.2f} | {rate / best:.2f} |")
    print(f"\nRay's start (ray.init of a local Ray): {med(batch, 'ray_start_s'):.1f} s of the whole job's "
          f"{med(batch, 'seconds'):.1f} s")  # fmt: skip

    decode = med(single, "decode_s_per_image")
    explain = med(single, "explain_s_per_image")
    bytes_per_row = med(batch, "bytes_per_row")
    print(f"\nmeasured per image on one core: decode + preprocess {decode * 1e3:.0f} ms, explain {explain * 1e3:.0f} ms; "
          f"Parquet {bytes_per_row:.0f} bytes/row")  # fmt: skip
    print(f"| images | CPU core-hours (measured) | GPU-hours at an ASSUMED {args.gpu_images_per_s:.0f} images/s/GPU "
          "| CPU cores to decode for one such GPU | Parquet |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: |")
    for total in (1_000_000, 100_000_000):
        print(
            f"| {total:,} | {total * (decode + explain) / 3600:,.0f} | {total / args.gpu_images_per_s / 3600:,.1f} | "
            f"{args.gpu_images_per_s * decode:.0f} | {total * bytes_per_row / 1e9:,.1f} GB |"
        )


if __name__ == "__main__":
    main()
