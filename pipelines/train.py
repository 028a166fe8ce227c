"""DVC stage ``train``: Ray Train on ``data/prepared/train`` -> the trained explainer in ``models/head``.

The explain-time map settings (``model.smoothing``, ``cam_weight``, ``activity_weight``) are read here
because, with ``train.loss.maps: explained``, the head is trained on the maps they make.

Writes the loss terms per step to ``reports/plots/train_loss.csv`` (a DVC plot; also drawn as
``train_loss.png``, which ``dvc plots show`` renders offline) and a summary to
``reports/train.json``. ``train.ray_address`` (or ``$RAY_ADDRESS``) joins a cluster; ``null``
starts a local Ray.
"""

import csv
import json
from pathlib import Path

from _stage import main

DATA = "data/prepared/train"
OUT = "models/head"
LOSS_CSV = Path("reports/plots/train_loss.csv")
LOSS_PNG = Path("reports/plots/train_loss.png")
SUMMARY = Path("reports/train.json")
#: ``train`` params passed to TrainConfig as they are (a missing one is named by the error)
TRAIN_KEYS = (
    "epochs", "max_steps", "batch_size", "augment", "num_workers", "cpus_per_worker", "use_gpu", "amp",
    "storage_path", "run_name", "checkpoint_every", "max_failures", "seed", "ray_address", "log_every",
    "head_init", "cache_gb", "crop_scale",
)  # fmt: skip


def run(params) -> None:
    from ptame.classes import read_class_names
    from ptame.params import check_class_names_file, map_settings
    from ptame.train import LOSS_TERMS, TrainConfig, train
    from ptame.viz import plot_csv

    check_class_names_file(params.get("model.class_names", None))  # dvc.yaml tracks classes/ only

    t = params["train"]
    prep = params.get("model.preprocessing")
    cfg = TrainConfig(
        backbone=params["model.backbone"],
        auxiliary=params["model.auxiliary"],
        pretrained=bool(params["model.pretrained"]),
        stages=params.get("model.stages", None),
        preprocessing=prep.to_dict() if prep is not None else None,
        class_names=read_class_names(params.get("model.class_names", None)),
        data=DATA,
        output_dir=OUT,
        lr=float(t["lr"]),  # YAML 1.1 reads "1e-4" as a string
        weight_decay=float(t["weight_decay"]),
        cam_scale=float(t["cam_scale"]),
        maps=map_settings(params),
        loss={k: v if isinstance(v, (str, list)) else float(v) for k, v in t["loss"].to_dict().items()},
        **{key: t[key] for key in TRAIN_KEYS},
    )
    try:
        result = train(cfg)
    except KeyboardInterrupt as e:
        e.add_note("rerun `dvc repro` to resume: training continues from its last checkpoint")
        raise
    LOSS_CSV.parent.mkdir(parents=True, exist_ok=True)
    with LOSS_CSV.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "ce", "area", "tv", "deletion", "lr"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.history)
    plot_csv(LOSS_CSV, LOSS_PNG, "step", list(LOSS_TERMS), "training loss (per step)")  # dvc plots show, offline
    last = result.history[-1] if result.history else {}
    SUMMARY.write_text(json.dumps({
        "steps": result.steps, "seconds": round(result.seconds, 1), "checkpoint": result.checkpoint,
        "final": {k: last.get(k) for k in ("loss", "ce", "area", "tv", "deletion")}, "resumed_from": list(result.resumed_from),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main(run)
