"""DVC stage ``evaluate``: P-TAME and the baselines scored by the same code on ``data/prepared/eval``.

Writes ``reports/metrics.json`` (``{method: {measure: value}}`` with ``n`` and 95 % bootstrap bounds
``<measure>_lo`` / ``<measure>_hi``, plus ``<method>@<limited method>`` entries on RISE's subset; see
:mod:`ptame.evaluate`), ``reports/evaluation.json`` (the fingerprint of the images and settings that
the champion rule compares, the image ids and the settings), ``reports/differences.json`` (P-TAME minus
each peer on the same images, with paired 95 % bootstrap intervals), the ROAD curves as DVC plots
(``reports/plots/road_{morf,lerf}.csv``, and as ``.png``) and an overlay gallery under ``reports/gallery/``.
"""

import json
import logging
import time
from pathlib import Path

from _stage import main

logger = logging.getLogger("pipelines.evaluate")

MODEL = "models/explainer"
DATA = "data/prepared/eval"
METRICS = Path("reports/metrics.json")
EVALUATION = Path("reports/evaluation.json")
DIFFERENCES = Path("reports/differences.json")
PLOTS = Path("reports/plots")
GALLERY = Path("reports/gallery")


def run(params) -> None:
    import torch

    from ptame.evaluate import HEADLINE, as_table, evaluate, load_eval_set, log_precision, render_gallery, write_road_plots
    from ptame.explainer import Explainer
    from ptame.viz import plot_csv

    start = time.perf_counter()
    e = params["evaluate"]
    methods = {m: dict(o or {}) for m, o in e["methods"].to_dict().items()}
    log_precision(methods)
    torch.manual_seed(e["seed"])
    explainer = Explainer.load(MODEL)
    evalset = load_eval_set(DATA, explainer.backbone, max_images=e["max_images"], batch_size=e["batch_size"])
    road, boot = e["road"], e["bootstrap"]
    result = evaluate(
        explainer, evalset, methods,
        percentages=road["percentages"], imputer=road["imputer"], noise_std=float(road["noise_std"]),
        seed=road["seed"], batch_size=e["batch_size"], resamples=int(boot["resamples"]), bootstrap_seed=int(boot["seed"]),
    )  # fmt: skip
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(result.metrics, indent=2))
    DIFFERENCES.write_text(json.dumps(result.differences, indent=2))
    record = {
        "fingerprint": result.fingerprint,
        "n": len(evalset.image_ids),
        "image_ids": evalset.image_ids,
        "settings": result.settings,
        "seconds": round(time.perf_counter() - start, 1),
    }
    EVALUATION.write_text(json.dumps(record, indent=2))
    for csv_path in write_road_plots(result.curves, PLOTS):  # and as PNGs: `dvc plots show` draws them offline
        order = csv_path.stem.split("_")[-1]
        better = "lower" if order == "morf" else "higher"
        plot_csv(csv_path, csv_path.with_suffix(".png"), "percentage", list(result.curves),
                 f"ROAD {'MoRF' if order == 'morf' else 'LeRF'} ({better} is better)", "removed pixels (%)", "accuracy")
    g = e["gallery"]
    render_gallery(evalset, result.maps, GALLERY, methods=g["methods"], count=g["images"], class_names=explainer.class_names)
    logger.info("metrics (reports/metrics.json), fingerprint %s:\n%s", result.fingerprint[:12], as_table(result.metrics))
    logger.info(
        "P-TAME minus each peer on the same images, paired 95 %% intervals (reports/differences.json):\n%s",
        as_table(result.differences, ("n", *HEADLINE), intervals=True),
    )


if __name__ == "__main__":
    main(run)
