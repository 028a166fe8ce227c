"""DVC stage ``evaluate``: P-TAME and its peers scored by the same code on ``data/prepared/eval`` and ``/single``.

The grids are the main set; the embedded default's single photos (no grid) are scored as their own
table (``ptame/single`` in ``reports/metrics.json``, ``ptame/single - gradcam/single`` in
``reports/differences.json``). Reports are written by :mod:`ptame.reports`, the code path of
``ptame evaluate``: ``reports/{metrics,differences,evaluation}.json``, ``reports/per_image.parquet``,
the ROAD curves as DVC plots under ``reports/plots/`` (and as ``.png``), plus an overlay gallery under
``reports/gallery/``.
"""

import logging

import torch

from _stage import main

logger = logging.getLogger("pipelines.evaluate")

MODEL = "models/explainer"
SETS = {"": "data/prepared/eval", "single": "data/prepared/single"}
REPORTS = "reports"
PLOTS = "reports/plots"
GALLERY = "reports/gallery"


def run(params) -> None:
    from ptame.evaluate import load_eval_set, log_precision
    from ptame.explainer import Explainer
    from ptame.reports import ReportPaths, ScoringSettings, render_gallery, score_sets, write_reports

    e = params["evaluate"]
    methods = {m: dict(o or {}) for m, o in e["methods"].to_dict().items()}
    log_precision(methods)
    torch.manual_seed(e["seed"])
    explainer = Explainer.load(MODEL)
    sets = {
        name: load_eval_set(path, explainer.backbone, max_images=e["max_images"], batch_size=e["batch_size"], allow_empty=bool(name))
        for name, path in SETS.items()
    }
    scored = score_sets(explainer, sets, methods, ScoringSettings.from_params(e))
    write_reports(scored, ReportPaths.under(REPORTS, PLOTS))
    g = e["gallery"]
    main_maps = scored.results[""].maps
    render_gallery(sets[""], main_maps, GALLERY, methods=g["methods"], count=g["images"], class_names=explainer.class_names)


if __name__ == "__main__":
    main(run)
