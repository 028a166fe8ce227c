"""Training throughput: Ray Train (1 and 2 workers) against a plain PyTorch loop, in one run.

All runs train the same explainer on the same Parquet data (PNG-encoded synthetic scenes, decoded,
resized, randomly cropped and flipped in every run) for the same number of steps, and report
images per second over the steps after a warm-up (start-up times are printed separately).

- ``plain loop``: one process, one torch thread; decoding happens inline with the same function
  the Ray Data pipeline uses, then ``Explainer.training_step`` + AdamW + one-cycle schedule. It
  runs as a Ray task with one CPU (the reference: same process niceness and scheduling group as
  the Ray Train workers) and, for information, in the driver process itself.
- ``Ray Train, W worker(s)``: :func:`ptame.train.train` on the same local Ray with ``W`` workers of
  one CPU each (one torch thread each); decoding runs in Ray Data tasks beside them.

On a shared machine, use ``--rounds 3``: the runs are repeated in turn and the table shows the
median and the spread of each; a spread wider than the ratios means the load decided the figures.

Usage::

    python3 benchmarks/bench_train.py            # lite0 backbone + lite0 auxiliary at 128 px
    python3 benchmarks/bench_train.py --tiny     # tiny CNN backbone at 64 px (seconds per run)
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from ptame.testing import object_scenes  # noqa: E402
from ptame.train import TrainConfig, _build_explainer, _decode_batch, _resolve_preprocessing, train  # noqa: E402



def write_data(folder: Path, n: int, size: int) -> Path:
    """``n`` synthetic scenes of ``size`` pixels as PNG bytes in 4 Parquet files."""
    images, _, _ = object_scenes(n, size=size, object_size=size // 4, seed=0)
    blobs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(4):
        part = list(range(s, n, 4))
        pq.write_table(pa.table({
            "image_id": [f"scene-{i}" for i in part],
            "image": pa.array([blobs[i] for i in part], pa.binary()),
        }), folder / f"part-{s}.parquet")
    return folder


def plain_loop(cfg: TrainConfig, steps: int, warmup: int) -> tuple[float, float]:
    """Images/s of a single-process, single-thread loop (after ``warmup`` steps) and its set-up seconds."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    explainer = _build_explainer(cfg)
    explainer.train()
    opt = torch.optim.AdamW(explainer.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    table = pq.read_table(cfg.data, columns=["image"])
    blobs = table.column("image").to_numpy(zero_copy_only=False)
    setup = time.perf_counter() - t0
    start = None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        chunk = blobs[(step * cfg.batch_size) % len(blobs):][: cfg.batch_size]
        batch = _decode_batch({"image": chunk}, "image", cfg.preprocessing, cfg.augment)
        images = torch.from_numpy(batch["image"]).float().div_(255.0)
        out = explainer.training_step(images)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
    return (steps - warmup) * cfg.batch_size / (time.perf_counter() - start), setup


def ray_run(cfg: TrainConfig, warmup: int) -> tuple[float, float]:
    """Images/s of a Ray Train run between step ``warmup`` and its last step, and its total seconds."""
    result = train(cfg)
    h = {e["step"]: e["elapsed"] for e in result.history}
    last = max(h)
    images = (last - warmup) * cfg.batch_size * cfg.num_workers
    return images / (h[last] - h[warmup]), result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny CNN backbone at 64 px instead of lite0 at 128 px")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the throughput (default 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per worker per step (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all runs, interleaved; medians are printed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import ray

    if args.tiny:
        backbone, size = "python:ptame.testing:tiny_cnn", 64
        prep = {"input_size": 64, "resize": 72, "mean": [0.5] * 3, "std": [0.5] * 3}
    else:
        backbone, size, prep = "builtin:efficientnet_lite0", 128, {"input_size": 128, "resize": 146}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp, "data"), args.steps * args.batch_size * 2, size=int(size * 1.25))
        base = TrainConfig(
            backbone=backbone, auxiliary="builtin:efficientnet_lite0", data=str(data),
            output_dir=str(Path(tmp, "explainer")), batch_size=args.batch_size, max_steps=args.steps,
            lr=3e-3, storage_path=str(Path(tmp, "ray_results")), checkpoint_every=10_000, resume=False,
            preprocessing=prep,
        )
        base = replace(base, preprocessing=_resolve_preprocessing(base))  # the backbone's mean/std, our sizes

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        remote_loop = ray.remote(num_cpus=1)(plain_loop)
        runs = {
            "plain loop, Ray task, 1 CPU": lambda: ray.get(remote_loop.remote(base, args.steps, args.warmup)),
            "plain loop, driver process, 1 thread": lambda: plain_loop(base, args.steps, args.warmup),
            **{f"Ray Train, {w} worker(s) x 1 CPU": (lambda w=w: ray_run(replace(base, num_workers=w), args.warmup))
               for w in (1, 2)},
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        try:
            for _ in range(args.rounds):  # rounds interleave the runs, so load drift hits all of them
                for name, run in runs.items():
                    results[name].append(run())
        finally:
            ray.shutdown()

    print(f"\nconfig: backbone {backbone}, auxiliary builtin:efficientnet_lite0, {prep['input_size']} px, "
          f"batch {args.batch_size} per worker, {args.steps} steps ({args.warmup} warm-up steps not timed), "
          f"augmentation on, {os.cpu_count()} CPU cores, torch {torch.__version__}, ray {ray.__version__}")
    reference = float(np.median([r for r, _ in results["plain loop, Ray task, 1 CPU"]]))
    print(f"\n| run | images/s (median of {args.rounds}) | min - max | vs plain loop (Ray task) | set-up or total s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in results.items():
        rates = [r for r, _ in values]
        rate, seconds = float(np.median(rates)), float(np.median([t for _, t in values]))
        print(f"| {name} | {rate:.1f} | {min(rates):.1f} - {max(rates):.1f} | {rate / reference:.2f}x | {seconds:.1f} |")


if __name__ == "__main__":
    main()
