"""Training throughput of the default recipe: Ray Train against plain PyTorch loops, in one run.

All runs train on the same Parquet data (JPEG crops and 2 x 2 grids of the demo photos, as the
``prepare`` stage makes them) with batch 16 and report images per second over the steps after a
warm-up (start-up seconds are printed separately):

- ``plain loop, before``: the previous default's work per step in one process and one torch
  thread: decode + augment every image every step, a separate auxiliary network
  (``builtin:efficientnet_lite0``), float32.
- ``plain loop, now``: the current default in one process with all cores: images decoded once and
  cropped per step at ``train.crop_scale``, ``auxiliary: backbone`` (one pass gives prediction and
  features), the precision ``amp: auto`` picks on this CPU, the deletion term.
- ``ptame.train, now``: :func:`ptame.train.train` with the same settings (one Ray Train worker,
  images cached in the worker, torch threads = the node's CPUs), and once more without the
  deletion term (the paper's loss, so the same work per image as ``before``).

Usage::

    python3 benchmarks/bench_train.py                 # EfficientNet-Lite2, crops of params.yaml's train.crop_scale
    python3 benchmarks/bench_train.py --steps 20      # shorter
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from ptame.demo import load_photos, train_images  # noqa: E402
from ptame.losses import LossWeights  # noqa: E402
from ptame.prepare import encode  # noqa: E402
from ptame.precision import choose_precision  # noqa: E402
from ptame.train import TrainConfig, train  # noqa: E402
from ptame.train.config import build_explainer, training_preprocessing  # noqa: E402
from ptame.train.driver import _resolve_preprocessing  # noqa: E402
from ptame.train.feed import crop_flip, decode_batch  # noqa: E402


def write_data(folder: Path, n: int) -> Path:
    """``n`` demo training images (crops and grids, 320 px JPEG) in 2 Parquet files."""
    rows = [(i, encode(im)) for i, im, _ in train_images(load_photos(), n, seed=0)]
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(2):
        part = rows[s::2]
        pq.write_table(pa.table({"image_id": [r[0] for r in part], "image": pa.array([r[1] for r in part], pa.binary())}),
                       folder / f"part-{s}.parquet")
    return folder


def plain_loop(cfg: TrainConfig, steps: int, warmup: int, cached: bool, threads: int) -> tuple[float, float]:
    """Images/s of a single-process loop after ``warmup`` steps, and its set-up seconds."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    explainer = build_explainer(cfg)
    explainer.train()
    opt = torch.optim.AdamW(explainer.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    blobs = pq.read_table(cfg.data, columns=["image"]).column("image").to_numpy(zero_copy_only=False)
    prep = training_preprocessing(cfg)
    size = prep["input_size"]
    precision = choose_precision(cfg.amp, "cpu")
    decoded = torch.from_numpy(decode_batch({"image": blobs}, "image", prep, True)["image"]) if cached else None
    setup = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        lo = (step * cfg.batch_size) % (len(blobs) - cfg.batch_size)
        if cached:
            raw = decoded[lo : lo + cfg.batch_size]
        else:
            raw = torch.from_numpy(decode_batch({"image": blobs[lo : lo + cfg.batch_size]}, "image", prep, True)["image"])
        images = crop_flip(raw, size, generator)
        with precision.autocast("cpu"):
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
    return (last - warmup) * cfg.batch_size * cfg.num_workers / (h[last] - h[warmup]), result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the throughput (default 5)")
    parser.add_argument("--crop-scale", type=float, default=None, help="training crop scale of 'now' (default: params.yaml's train.crop_scale)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cores = os.cpu_count() or 1
    crop_scale = args.crop_scale or yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("params.yaml").read_text())["train"].get("crop_scale", 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp, "data"), max(320, args.steps * 16 + 32))
        now = TrainConfig(
            backbone="builtin:efficientnet_lite2", auxiliary="backbone", data=str(data), output_dir=str(Path(tmp, "out")),
            batch_size=16, max_steps=args.steps, epochs=10, lr=1e-3, amp="auto", head_init="cam", log_every=1, crop_scale=crop_scale,
            loss=asdict(LossWeights(deletion=0.5)), storage_path=str(Path(tmp, "ray_results")),
            checkpoint_every=10_000, resume=False,
        )
        now = replace(now, preprocessing=_resolve_preprocessing(now))
        before = replace(now, auxiliary="builtin:efficientnet_lite0", amp=False, head_init="random", loss=asdict(LossWeights()),
                         crop_scale=1.0)
        chosen = choose_precision("auto", "cpu").name
        runs = {
            "plain loop, before (decode per step, lite0 auxiliary, fp32, 1 thread)":
                lambda: plain_loop(before, args.steps, args.warmup, cached=False, threads=1),
            f"plain loop, now (decoded once, auxiliary backbone, {chosen}, deletion, crops {now.crop_scale:g} x 260 px, {cores} threads)":
                lambda: plain_loop(now, args.steps, args.warmup, cached=True, threads=cores),
            "ptame.train, now (Ray Train, 1 worker, same settings)": lambda: ray_run(now, args.warmup),
            "ptame.train, now without the deletion term (the paper's loss)":
                lambda: ray_run(replace(now, loss=asdict(LossWeights())), args.warmup),
        }
        results = {name: run() for name, run in runs.items()}
    print(f"\nEfficientNet-Lite2 (before: 260 px, now: {round(260 * now.crop_scale)} px), batch 16, {args.steps} steps ({args.warmup} warm-up steps not timed), "
          f"{cores} CPU cores, torch {torch.__version__}")
    base = next(iter(results.values()))[0]
    print("\n| run | images/s | vs plain loop, before | set-up or total s |")
    print("| --- | ---: | ---: | ---: |")
    for name, (rate, seconds) in results.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {seconds:.1f} |")


if __name__ == "__main__":
    main()
