"""Speed of P-TAME's explanation against a plain forward pass and its peers, side by side in one run.

Prints a table of per-batch times and the ratios the project tracks:
explain / (backbone + auxiliary forward), Grad-CAM / P-TAME, RISE(N) / P-TAME, and the training
step with gathered classes vs all K maps. RISE is linear in N: it is timed at a small N on a few
images and scaled to the reported N per image (stated in the table).

    python benchmarks/bench_explain.py [--batch-size 16] [--size 224] [--rise-n 4000] [--device cuda]

On a GPU every call is followed by ``torch.cuda.synchronize()`` before the clock stops.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ptame.explainer import Explainer
from ptame.saliency import saliency


def timed_together(
    fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so all see the same machine load.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU) inside the timing.
    """
    for fn in fns.values():
        fn()  # warm-up
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="builtin:efficientnet_lite2")
    parser.add_argument("--auxiliary", default="builtin:efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="input pixels (square)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rise-n", type=int, default=4000, help="RISE masks per image to report")
    parser.add_argument("--rise-measured-n", type=int, default=256, help="RISE masks actually timed per image")
    parser.add_argument("--rise-images", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i> (default: %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this machine has no CUDA device")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    explainer = Explainer.from_uris(args.backbone, args.auxiliary).to(device)
    images = torch.rand(args.batch_size, 3, args.size, args.size, device=device)
    classes = explainer.backbone(images).argmax(1)
    b = args.batch_size

    few = images[: args.rise_images]

    def forward(module: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return module(images)

        return run

    def step(gather: bool) -> Callable[[], object]:
        def run() -> object:
            explainer.train()
            explainer.head.zero_grad()
            explainer.training_step(images, gather_classes=gather)["loss"].backward()
            return explainer.eval()

        return run

    t = timed_together(
        {
            "backbone": forward(explainer.backbone),
            "auxiliary": forward(explainer.auxiliary),
            "explain": lambda: explainer.explain(images),
            "gradcam": lambda: saliency("gradcam", explainer, images, classes),
            "rise": lambda: saliency(
                "rise", explainer, few, classes[: args.rise_images], num_masks=args.rise_measured_n
            ),
            "step_gather": step(True),
            "step_full": step(False),
        },
        args.repeats,
        sync,
    )
    t_backbone, t_aux, t_explain, t_gradcam = t["backbone"], t["auxiliary"], t["explain"], t["gradcam"]
    t_rise = t["rise"] / args.rise_images * (args.rise_n / args.rise_measured_n) * b
    t_step_gather, t_step_full = t["step_gather"], t["step_full"]
    rows: list[tuple[str, float]] = []
    rows += [
        ("backbone forward", t_backbone),
        ("auxiliary forward", t_aux),
        ("P-TAME explain (prediction + map)", t_explain),
        ("Grad-CAM", t_gradcam),
        (f"RISE N={args.rise_n} (timed at N={args.rise_measured_n}, scaled)", t_rise),
        ("train step, gathered classes", t_step_gather),
        (f"train step, all {explainer.backbone.num_classes} maps", t_step_full),
    ]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nbatch {b} x 3 x {args.size} x {args.size}, {args.backbone} explained via {args.auxiliary}, "
          f"{where}, median of {args.repeats}\n")
    print(f"| {'what':58} | {'s / batch':>9} | {'ms / image':>10} |")
    print(f"|{'-' * 60}|{'-' * 11}|{'-' * 12}|")
    for name, t in rows:
        print(f"| {name:58} | {t:9.3f} | {1000 * t / b:10.1f} |")
    print()
    ratios = [
        ("explain / (backbone + auxiliary)", t_explain / (t_backbone + t_aux), "<= 1.3"),
        ("Grad-CAM / P-TAME explain", t_gradcam / t_explain, ">= 2"),
        (f"RISE N={args.rise_n} / P-TAME explain", t_rise / t_explain, ">= 1000"),
        ("train step: all maps / gathered", t_step_full / t_step_gather, "> 1"),
    ]
    print(f"| {'ratio':40} | {'value':>8} | target |")
    print(f"|{'-' * 42}|{'-' * 10}|--------|")
    for name, value, target in ratios:
        print(f"| {name:40} | {value:8.2f} | {target} |")


if __name__ == "__main__":
    main()
