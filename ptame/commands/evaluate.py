"""``ptame evaluate``: score an explainer and its peers on any images, with the pipeline's own code.

No labels needed: each image's prediction is explained (or ``--classes``). Writes, under
``--output``, what the DVC ``evaluate`` stage writes (see :mod:`ptame.reports`): ``metrics.json``,
``differences.json`` (P-TAME minus each peer, paired 95 % intervals), ``evaluation.json``,
``per_image.parquet`` and the ROAD curves.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ptame.explainer import Explainer

__all__ = ["DEFAULT_METHODS", "METHOD_OPTIONS", "add_arguments", "default_methods", "main"]

logger = logging.getLogger("ptame.evaluate")

DEFAULT_METHODS = "ptame,cam,gradcam"

#: options each method gets here (as ``params.yaml``'s ``evaluate.methods``): RISE is scored on its first images only
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"rise": {"num_masks": 1000, "max_images": 8, "batch_size": 16, "seed": 0, "amp": "auto"}}


def _class_option(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _methods(text: str) -> list[str]:
    from ptame.saliency import METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown or text!r}; choose from {', '.join(sorted(METHODS))}")
    if "ptame" not in names:
        names.insert(0, "ptame")  # the differences are P-TAME minus each peer
    return names


def default_methods(explainer: Explainer) -> list[str]:
    """:data:`DEFAULT_METHODS`, less ``cam`` where the explainer has no CAM to start from (a separate auxiliary)."""
    names = _methods(DEFAULT_METHODS)
    try:
        explainer.starting_point()
    except ValueError as err:
        logger.info("not scoring cam (the head's untrained start): %s", err)
        names.remove("cam")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved explainer directory (models/explainer) or a registry URI, e.g. models:/ptame-efficientnet-lite2@champion")
    parser.add_argument("--input", required=True, help="images: a folder (recursive), a glob, a .txt list of paths, or Parquet with an 'image' column "
                        "(and 'grid_classes', four cell classes per 2 x 2 grid: GridPG is scored too)")
    parser.add_argument("--output", required=True, help="folder for metrics.json, differences.json, evaluation.json, per_image.parquet and the ROAD curves")
    parser.add_argument("--methods", type=_methods, default=None,
                        help=f"comma-separated methods to score (default {DEFAULT_METHODS}, cam being the head's untrained "
                             "start: what the training adds, left out where the explainer has no CAM; also gradcampp, "
                             "scorecam, rise: 1000 masks on the first 8 images); ptame is always included")  # fmt: skip
    parser.add_argument("--classes", type=_class_option, default=None,
                        help="the class each map explains: an index, a label, -1 (the prediction, default), or a Parquet column")  # fmt: skip
    parser.add_argument("--max-images", type=int, default=None, help="score the first N readable images only (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (does not change the numbers)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples behind the 95 %% intervals")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for a models:/ model (default: $MLFLOW_TRACKING_URI)")


def main(args: argparse.Namespace) -> int:
    from ptame.registry import connect, load_explainer
    from ptame.reports import ReportPaths, ScoringSettings, load_image_set, score_sets, write_reports

    for name, value in (("--max-images", args.max_images), ("--batch-size", args.batch_size), ("--resamples", args.resamples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if str(args.model).startswith("models:/"):
        connect(args.tracking_uri)
    loaded = load_explainer(args.model)
    names = args.methods or default_methods(loaded.explainer)
    evalset, skipped = load_image_set(args.input, loaded.explainer, args.classes, args.max_images, args.batch_size)
    logger.info("%d images from %s (%d left out), methods %s", len(evalset.image_ids), args.input, len(skipped), ", ".join(names))
    methods = {m: dict(METHOD_OPTIONS.get(m, {})) for m in names}
    settings = ScoringSettings(resamples=args.resamples, batch_size=args.batch_size)
    scored = score_sets(loaded.explainer, {"": evalset}, methods, settings, skipped)
    write_reports(scored, ReportPaths.under(args.output), extra={"model": loaded.model_uri, "input": args.input})
    logger.info("wrote the reports to %s", args.output)
    return 0
