"""DVC stage ``evaluate``: P-TAME and the baselines scored by the same code on ``data/prepared/eval``.

Writes ``reports/metrics.json`` (``{method: {measure: value}}``), the ROAD curves as DVC plots
(``reports/plots/road_{morf,lerf}.csv``) and an overlay gallery under ``reports/gallery/``.
"""

import json
import logging
from pathlib import Path

from _stage import main

logger = logging.getLogger("pipelines.evaluate")

MODEL = "models/explainer"
DATA = "data/prepared/eval"
METRICS = Path("reports/metrics.json")
PLOTS = Path("reports/plots")
GALLERY = Path("reports/gallery")


def run(params) -> None:
    import torch

    from ptame.evaluate import as_table, evaluate, load_eval_set, render_gallery, write_road_plots
    from ptame.explainer import Explainer

    e = params["evaluate"]
    torch.manual_seed(e["seed"])
    explainer = Explainer.load(MODEL)
    evalset = load_eval_set(DATA, explainer.backbone, max_images=e["max_images"], batch_size=e["batch_size"])
    methods = e["methods"].to_dict()
    road = e["road"]
    result = evaluate(
        explainer, evalset, {m: dict(o or {}) for m, o in methods.items()},
        percentages=road["percentages"], imputer=road["imputer"], noise_std=float(road["noise_std"]),
        seed=road["seed"], batch_size=e["batch_size"],
    )  # fmt: skip
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(result.metrics, indent=2))
    write_road_plots(result.curves, PLOTS)
    g = e["gallery"]
    render_gallery(evalset, result.maps, GALLERY, methods=g["methods"], count=g["images"], class_names=explainer.class_names)
    logger.info("metrics (reports/metrics.json):\n%s", as_table(result.metrics))


if __name__ == "__main__":
    main(run)
