"""float32 against bf16 autocast on this machine, side by side, and what ``amp: auto`` picks here.

bf16 is 1.5-2.5x faster where the CPU has bf16 units (AVX512-BF16, AMX, Arm BF16) and ~20x slower
where it is emulated (AVX2-only CPUs). This script times, round-robin in one run (so both see the
same load): one backbone forward of a batch (what RISE and the measures repeat) and one training
step of the default recipe (forward, masked and deleted passes, backward into the head), then
prints the ratio and whether :func:`ptame.precision.choose_precision` chose the faster one.

    python benchmarks/bench_precision.py [--size 260] [--batch-size 16] [--repeats 3]

Emulate a CPU without native bf16 on one that has it:
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_precision.py``
(the decision reads the CPU's flags, so it still says bf16 there: compare the times).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from bench_explain import timed_together

from ptame.explainer import Explainer
from ptame.losses import LossWeights
from ptame.precision import choose_precision, cpu_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="builtin:efficientnet_lite2")
    parser.add_argument("--size", type=int, default=260)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    explainer = Explainer.from_uris(args.backbone, "backbone", loss_weights=LossWeights(deletion=0.5))
    explainer.init_head_from_classifier(0.5)
    explainer.train()
    images = torch.rand(args.batch_size, 3, args.size, args.size)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)

    def forward(ctx: contextlib.AbstractContextManager) -> None:
        with torch.inference_mode(), ctx:
            explainer.backbone(images)

    def step(ctx: contextlib.AbstractContextManager) -> None:
        with ctx:
            loss = explainer.training_step(images)["loss"]
        loss.backward()
        explainer.head.zero_grad(set_to_none=True)

    times = timed_together({
        "forward, float32": lambda: forward(contextlib.nullcontext()),
        "forward, bf16 autocast": lambda: forward(bf16),
        "training step, float32": lambda: step(contextlib.nullcontext()),
        "training step, bf16 autocast": lambda: step(bf16),
    }, args.repeats)  # fmt: skip
    native, isa = cpu_bf16()
    chosen = choose_precision("auto", "cpu")
    print(f"\n{args.backbone} at {args.size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; CPU: {isa} (native bf16: {native})")
    print("\n| work | float32 s | bf16 s | bf16 / float32 | faster |")
    print("| --- | ---: | ---: | ---: | --- |")
    picks = []
    for work in ("forward", "training step"):
        f32, b16 = times[f"{work}, float32"], times[f"{work}, bf16 autocast"]
        faster = "bfloat16" if b16 < f32 else "float32"
        picks.append(faster)
        print(f"| {work} | {f32:.3f} | {b16:.3f} | {b16 / f32:.2f}x | {faster} |")
    verdict = "the faster one" if all(p == chosen.name for p in picks) else "NOT the faster one"
    print(f"\namp: auto chooses {chosen.describe()} -> {verdict} on this machine")


if __name__ == "__main__":
    main()
