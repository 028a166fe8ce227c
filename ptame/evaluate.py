"""Score P-TAME and its peers with the same code on the same images (the ``evaluate`` stage).

Every method goes through :func:`ptame.saliency.saliency` and is scored by :mod:`ptame.metrics`:
AD/IC at 100/50/15 %, ROAD MoRF/LeRF (noisy linear imputation, per percentage and as area under
the curve), the grid pointing game on composites with known cell classes, and seconds per image.
All measures use the backbone's predicted class ``t`` of each evaluation image, except the grid
pointing game, which explains the class of each grid cell.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ptame.data import CropBox, ImageDecodeError, decode_image, preprocess
from ptame.explainer import Explainer
from ptame.metrics import average_drop_increase, grid_pointing_game, road
from ptame.models import Classifier
from ptame.saliency import rise_multi, saliency

__all__ = [
    "MEASURES",
    "EvalSet",
    "Evaluation",
    "as_table",
    "evaluate",
    "load_eval_set",
    "render_gallery",
    "write_road_plots",
]

logger = logging.getLogger(__name__)

#: measure -> True when higher is better
MEASURES: dict[str, bool] = {
    "AD@100": False,
    "AD@50": False,
    "AD@15": False,
    "IC@100": True,
    "IC@50": True,
    "IC@15": True,
    "ROAD-MoRF": False,
    "ROAD-LeRF": True,
    "GridPG": True,
    "sec_per_image": False,
}


@dataclass(frozen=True)
class EvalSet:
    """Evaluation images ready for the backbone, with what the measures and the gallery need.

    Attributes:
        images: ``(N, 3, S, S)`` in ``[0, 1]`` after the explainer's preprocessing.
        targets: ``(N,)`` the backbone's predicted classes.
        grid_classes: ``(N, 4)`` class of each 2 x 2 cell (row-major), or ``None``.
    """

    image_ids: list[str]
    images: Tensor
    targets: Tensor
    originals: list[Image.Image]
    crop_boxes: list[CropBox]
    grid_classes: Tensor | None = None


@dataclass
class Evaluation:
    """Results of :func:`evaluate`: ``metrics[method][measure]``, ROAD curves and the maps."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)


def load_eval_set(path: str | Path, backbone: Classifier, max_images: int | None = None, batch_size: int = 16) -> EvalSet:
    """Decode and preprocess the prepared evaluation shards at ``path`` (see :mod:`ptame.prepare`).

    Rows whose image does not decode are logged and left out. When every kept row has
    ``grid_classes``, they are returned for the grid pointing game.
    """
    from ptame.prepare import read_prepared

    table = read_prepared(path, columns=["image_id", "image", "grid_classes"])
    ids, tensors, originals, boxes, cells = [], [], [], [], []
    for row in table.to_pylist():
        if max_images is not None and len(ids) >= max_images:
            break
        try:
            pil = decode_image(row["image"])
        except ImageDecodeError as e:
            logger.warning("evaluation image %s skipped: %s", row["image_id"], e)
            continue
        tensor, box = preprocess(pil, backbone.preprocessing)
        ids.append(row["image_id"])
        tensors.append(tensor)
        originals.append(pil)
        boxes.append(box)
        cells.append(row["grid_classes"])
    if not ids:
        raise ValueError(f"no readable evaluation image in {path}; check the prepare stage's report")
    images = torch.stack(tensors)
    with torch.inference_mode():
        targets = torch.cat([backbone(images[i : i + batch_size]).argmax(1) for i in range(0, len(ids), batch_size)])
    grid = None
    if all(c is not None and len(c) == 4 for c in cells):
        grid = torch.tensor(cells, dtype=torch.long)
    elif any(c is not None for c in cells):
        logger.warning("only some evaluation rows have grid_classes; the grid pointing game is skipped")
    return EvalSet(ids, images, targets, originals, boxes, grid)


def _maps(
    method: str, explainer: Explainer, images: Tensor, classes: Tensor, options: Mapping[str, Any]
) -> Tensor:
    """``(B, k, h, w)`` maps of ``classes`` ``(B, k)`` by ``method``."""
    b, k = classes.shape
    if method == "rise":
        return rise_multi(explainer.backbone, images, classes, **options)
    model: Explainer | Classifier = explainer if method == "ptame" else explainer.backbone
    flat = saliency(method, model, images.repeat_interleave(k, 0), classes.reshape(-1), **options)
    return flat.view(b, k, *flat.shape[-2:])


def evaluate(
    explainer: Explainer,
    evalset: EvalSet,
    methods: Mapping[str, Mapping[str, Any]],
    percentages: Sequence[int] = (10, 30, 50, 70),
    imputer: str = "linear",
    noise_std: float = 0.01,
    seed: int = 0,
    batch_size: int = 16,
) -> Evaluation:
    """Score each method on ``evalset`` with the same measures.

    Args:
        methods: ``{name: options}``; options go to the method (e.g. RISE's ``num_masks``), except
            ``max_images``, which scores the method on the first images only (RISE's budget).
        percentages, imputer, noise_std, seed: ROAD settings (see :func:`ptame.metrics.road`).

    Returns:
        An :class:`Evaluation`; ``metrics[name]`` holds the keys of :data:`MEASURES` (``GridPG``
        only when the set has grid classes) plus ``ROAD-MoRF@p`` / ``ROAD-LeRF@p`` and ``images``.
    """
    from tqdm.auto import tqdm

    result = Evaluation()
    classifier = explainer.backbone
    for name in (bar := tqdm(list(methods), desc="evaluate")):
        bar.set_postfix(method=name)
        options = dict(methods[name])
        limit = options.pop("max_images", None)
        n = len(evalset.image_ids) if limit is None else min(int(limit), len(evalset.image_ids))
        images, targets = evalset.images[:n], evalset.targets[:n]
        classes = targets[:, None]
        if evalset.grid_classes is not None:
            classes = torch.cat([classes, evalset.grid_classes[:n]], 1)
        # timing: the maps of the predicted class only (what a user pays per image)
        start = time.perf_counter()
        if name == "rise":  # one pass gives all classes: time it as a whole, per image
            maps = _maps(name, explainer, images, classes, options)
            seconds = time.perf_counter() - start
        else:
            predicted = _maps(name, explainer, images, targets[:, None], options)
            seconds = time.perf_counter() - start
            extra = _maps(name, explainer, images, classes[:, 1:], options) if classes.shape[1] > 1 else None
            maps = predicted if extra is None else torch.cat([predicted, extra], 1)
        maps = maps.float().clamp(0, 1)
        measures: dict[str, float] = {}
        measures.update(average_drop_increase(classifier, images, maps[:, 0], targets, batch_size=batch_size))
        measures.update(
            road(classifier, images, maps[:, 0], targets, percentages, noise_std, seed, batch_size, imputer)  # type: ignore[arg-type]
        )
        if evalset.grid_classes is not None:
            cell_maps = maps[:, 1:5].reshape(n * 4, *maps.shape[-2:])
            cells = torch.arange(4).repeat(n)
            measures["GridPG"] = float(grid_pointing_game(cell_maps, cells).mean())
        measures["sec_per_image"] = seconds / n
        measures["images"] = float(n)
        result.metrics[name] = measures
        result.curves[name] = {
            order: {p: measures[f"ROAD-{order}@{p}"] for p in sorted(percentages)} for order in ("MoRF", "LeRF")
        }
        result.maps[name] = maps[:, 0].cpu()
        logger.info("%s: %s", name, {k: round(v, 4) for k, v in measures.items() if "@" not in k or k.startswith(("AD", "IC"))})
    return result


def write_road_plots(curves: Mapping[str, Mapping[str, Mapping[int, float]]], out_dir: str | Path) -> list[Path]:
    """``road_morf.csv`` and ``road_lerf.csv``: ``percentage`` and one accuracy column per method.

    The curves include the fixed end points ``(0, 1)`` and ``(100, 0)`` that the area uses.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    methods = list(curves)
    for order in ("MoRF", "LeRF"):
        percentages = sorted({p for m in methods for p in curves[m][order]})
        path = out / f"road_{order.lower()}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["percentage", *methods])
            writer.writerow([0, *([1.0] * len(methods))])
            for p in percentages:
                writer.writerow([p, *(round(curves[m][order].get(p, float("nan")), 6) for m in methods)])
            writer.writerow([100, *([0.0] * len(methods))])
        written.append(path)
    return written


def _caption(image: Image.Image, text: str, height: int = 22) -> Image.Image:
    out = Image.new("RGB", (image.size[0], image.size[1] + height), "white")
    out.paste(image, (0, height))
    ImageDraw.Draw(out).text((4, 4), text, fill="black")
    return out


def render_gallery(
    evalset: EvalSet,
    maps: Mapping[str, Tensor],
    out_dir: str | Path,
    methods: Sequence[str] = ("ptame", "gradcam"),
    count: int = 4,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    height: int = 260,
) -> list[Path]:
    """PNG rows ``image | P-TAME | Grad-CAM | ...`` (predicted class) and an overview ``gallery.png``.

    Overlays cover the region each map explains (the preprocessing's centre crop).
    """
    from ptame.viz import overlay, side_by_side

    missing = [m for m in methods if m not in maps]
    if missing:
        raise ValueError(f"gallery methods {missing} were not evaluated; evaluated: {sorted(maps)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    for i in range(min(count, len(evalset.image_ids))):
        image, box = evalset.originals[i], evalset.crop_boxes[i]
        target = int(evalset.targets[i])
        label = class_names[target] if class_names else str(target)
        panels = [_caption(image.crop(box).resize((height, height)), f"{evalset.image_ids[i]}: {label[:28]}")]
        for m in methods:
            if i >= maps[m].shape[0]:
                continue
            over = overlay(image, maps[m][i].numpy(), crop_box=box, alpha=alpha).crop(box).resize((height, height))
            panels.append(_caption(over, m))
        row = side_by_side(panels, height=height + 22)
        path = out / f"{i:02d}_{evalset.image_ids[i].replace('/', '_')}.png"
        row.save(path)
        rows.append(row)
        written.append(path)
    if rows:
        width = max(r.size[0] for r in rows)
        sheet = Image.new("RGB", (width, sum(r.size[1] for r in rows) + 4 * (len(rows) - 1)), "white")
        y = 0
        for r in rows:
            sheet.paste(r, (0, y))
            y += r.size[1] + 4
        sheet.save(out / "gallery.png")
        written.append(out / "gallery.png")
    return written


def as_table(metrics: Mapping[str, Mapping[str, float]], measures: Sequence[str] = tuple(MEASURES)) -> str:
    """A markdown table of ``metrics[method][measure]`` (for logs and reports)."""
    head = "| method | " + " | ".join(measures) + " |"
    rule = "| --- |" + " --- |" * len(measures)
    lines = [head, rule]
    for method, values in metrics.items():
        cells = [f"{values[m]:.4g}" if m in values and np.isfinite(values[m]) else "-" for m in measures]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
