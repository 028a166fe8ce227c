"""Score P-TAME and its peers with the same code on the same images (the ``evaluate`` stage).

Every method goes through :func:`ptame.saliency.saliency` and is scored by :mod:`ptame.metrics`:
AD/IC at 100/50/15 %, ROAD MoRF/LeRF (noisy linear imputation, per percentage and as area under
the curve), the grid pointing game on composites with known cell classes, and seconds per image.
All measures use the backbone's predicted class ``t`` of each evaluation image, except the grid
pointing game, which explains the class of each grid cell.

Fair and repeatable: maps are computed in batches of ``batch_size`` images; ``sec_per_image`` is
timed after one untimed warm-up batch per method; every measure is also scored per image, and a
seeded bootstrap over images (the same resampled image indices for every method scored on the same
images) gives a 95 % percentile interval. A method limited by ``max_images`` (RISE) is scored on
the first images only, and every method scored on more images is also reported on that subset
(``metrics["ptame@rise"]``), from the same per-image scores. ROAD noise is seeded per image and
RISE masks by their ``seed``, so two runs give the same metrics.

Layout of :attr:`Evaluation.metrics` (``reports/metrics.json``), every leaf a number so that
``dvc metrics show`` and MLflow read it::

    {"ptame": {"AD@100": 32.2, ..., "ROAD-MoRF@10": 0.5, ..., "sec_per_image": 0.05,
               "images": 32.0, "n": 32, "AD@100_lo": 28.0, "AD@100_hi": 36.1, ...},
     "gradcam": {...}, "rise": {..., "n": 8},
     "ptame@rise": {... the same keys, on RISE's 8 images}, "gradcam@rise": {...}}

``<measure>_lo`` / ``<measure>_hi`` bound the 95 % bootstrap interval of each measure of
:data:`INTERVAL_MEASURES`; ``images`` (float, kept for older readers) and ``n`` are the number of
images. :func:`fingerprint` identifies the images and settings behind the numbers.

:attr:`Evaluation.differences` (``reports/differences.json``) says whether a gap between P-TAME and a
peer is real: ``{"ptame - gradcam": {"ROAD-LeRF": -0.014, "ROAD-LeRF_lo": ..., "ROAD-LeRF_hi": ...,
"n": 64}, "ptame - rise": {...}}``, the mean per-image difference on the images both were scored on,
with a *paired* 95 % bootstrap interval (an interval that excludes 0 is a difference beyond the
spread of the images; two overlapping marginal intervals say much less).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ptame.data import CropBox, ImageDecodeError, decode_image, preprocess
from ptame.explainer import Explainer
from ptame.measures import INTERVAL_MEASURES, MEASURES
from ptame.metrics import average_drop_increase_per_image, grid_pointing_game, road_per_image
from ptame.models import Classifier
from ptame.saliency import EXPLAINER_METHODS, rise_multi, saliency

__all__ = [
    "EvalSet",
    "Evaluation",
    "bootstrap_intervals",
    "decode_eval_rows",
    "evaluate",
    "log_precision",
    "fingerprint",
    "load_eval_set",
    "paired_differences",
]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class EvalSet:
    """Evaluation images ready for the backbone, with what the measures and the gallery need.

    Attributes:
        images: ``(N, 3, S, S)`` in ``[0, 1]`` after the explainer's preprocessing.
        targets: ``(N,)`` the backbone's predicted classes.
        grid_classes: ``(N, 4)`` class of each 2 x 2 cell (row-major), or ``None``.
        digests: SHA-256 of each image's encoded bytes (empty: :func:`fingerprint` hashes ``images``).
    """

    image_ids: list[str]
    images: Tensor
    targets: Tensor
    originals: list[Image.Image]
    crop_boxes: list[CropBox]
    grid_classes: Tensor | None = None
    digests: tuple[str, ...] = ()


@dataclass
class Evaluation:
    """Results of :func:`evaluate`: ``metrics[method][measure]``, paired differences to P-TAME, ROAD curves, maps, per-image scores.

    ``per_image[method][measure]`` is a ``(n,)`` float64 array whose mean is the metric;
    ``fingerprint`` identifies the images and settings (see :func:`fingerprint`).
    """

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    differences: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)
    per_image: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


def load_eval_set(
    path: str | Path, backbone: Classifier, max_images: int | None = None, batch_size: int = 16, allow_empty: bool = False
) -> EvalSet:
    """Decode and preprocess the prepared evaluation shards at ``path`` (see :mod:`ptame.prepare`).

    Rows whose image does not decode are logged and left out. When every kept row has
    ``grid_classes``, they are returned for the grid pointing game. ``allow_empty``: no readable
    row gives an empty set instead of an error.
    """
    from ptame.prepare import read_prepared

    table = read_prepared(path, columns=["image_id", "image", "grid_classes"])
    rows = zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(), repeat(None))
    evalset, _ = decode_eval_rows(rows, backbone, table.column("grid_classes").to_pylist(), None, max_images, batch_size)
    if not evalset.image_ids and not allow_empty:
        raise ValueError(f"no readable evaluation image in {path}; check the prepare stage's report")
    return evalset


def decode_eval_rows(
    rows: Iterable[tuple[str, bytes | None, str | None]],
    backbone: Classifier,
    cells: Sequence[Sequence[int] | None] | None = None,
    classes: Sequence[int | None] | int | None = None,
    max_images: int | None = None,
    batch_size: int = 16,
) -> tuple[EvalSet, list[dict[str, str]]]:
    """``(image_id, bytes, error)`` rows as an :class:`EvalSet`, and the rows left out with their reason.

    The one loader behind the evaluate stage and ``ptame evaluate``. Row ``i`` keeps ``cells[i]``
    (its 2 x 2 grid classes) and is explained for ``classes[i]`` (or ``classes`` for every row;
    ``None``: the backbone's prediction). A row that cannot be read or decoded is logged, never fatal.
    """
    ids, tensors, originals, boxes, digests, chosen, kept_cells, skipped = [], [], [], [], [], [], [], []
    for row, (image_id, data, error) in enumerate(rows):
        if max_images is not None and len(ids) >= max_images:
            break
        if error is None:
            try:
                pil = decode_image(data or b"")
            except ImageDecodeError as e:
                error = str(e)
        if error is not None:
            logger.warning("%s left out: %s", image_id, error)
            skipped.append({"image_id": image_id, "error": error})
            continue
        tensor, box = preprocess(pil, backbone.preprocessing)
        ids.append(image_id)
        tensors.append(tensor)
        originals.append(pil)
        boxes.append(box)
        digests.append(hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]
        chosen.append(classes[row] if isinstance(classes, Sequence) else classes)
        kept_cells.append(cells[row] if cells is not None else None)
    if not ids:
        return EvalSet([], torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long), [], []), skipped
    images = torch.stack(tensors)
    with torch.inference_mode():
        predicted = torch.cat([backbone(images[i : i + batch_size]).argmax(1) for i in range(0, len(ids), batch_size)])
    targets = torch.tensor([int(p) if c is None else c for p, c in zip(predicted.tolist(), chosen)], dtype=torch.long)
    return EvalSet(ids, images, targets, originals, boxes, _grid_tensor(kept_cells), tuple(digests)), skipped


def _grid_tensor(cells: Sequence[Sequence[int] | None]) -> Tensor | None:
    """Each row's four ``grid_classes`` as ``(N, 4)`` for the grid pointing game, or ``None`` unless every row has them."""
    if cells and all(c is not None and len(c) == 4 for c in cells):
        return torch.tensor(cells, dtype=torch.long)
    if any(c is not None for c in cells):
        logger.warning("only some evaluation rows have 4 grid_classes; the grid pointing game is skipped")
    return None


def fingerprint(evalset: EvalSet, settings: Mapping[str, Any]) -> str:
    """SHA-256 of the evaluation images (ids, bytes, targets, grid classes) and the scoring settings.

    Two evaluations are comparable (:mod:`ptame.champion`) only when their fingerprints match.
    ``targets`` are the backbone's predictions, so a different backbone or preprocessing changes it
    too. ``settings`` must be JSON-serialisable; leave out what cannot change the numbers (batch sizes).
    """
    h = hashlib.sha256()
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    grid = evalset.grid_classes.tolist() if evalset.grid_classes is not None else None
    for i, image_id in enumerate(evalset.image_ids):
        if evalset.digests:
            digest = evalset.digests[i]
        else:
            digest = hashlib.sha256(evalset.images[i].detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()
        cells = grid[i] if grid is not None else None
        h.update(json.dumps([image_id, digest, int(evalset.targets[i]), cells]).encode())
    return h.hexdigest()


def bootstrap_intervals(
    per_image: Mapping[str, np.ndarray], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of the mean of each ``(n,)`` array, resampling images.

    The resampled indices depend only on ``seed`` and ``n``, so methods scored on the same images
    are resampled alike (paired) and two runs give the same intervals.

    Returns:
        ``{measure: (lo, hi)}``; with one image both bounds are its value.
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    out: dict[str, tuple[float, float]] = {}
    indices: dict[int, np.ndarray] = {}
    for measure, values in per_image.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"per_image[{measure!r}] must be a non-empty 1-D array, got shape {values.shape}")
        n = values.size
        if n not in indices:
            indices[n] = np.random.default_rng([int(seed), n]).integers(0, n, size=(resamples, n))
        means = values[indices[n]].mean(axis=1)
        lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
        out[measure] = (float(lo), float(hi))
    return out


def paired_differences(
    per_image: Mapping[str, Mapping[str, np.ndarray]], reference: str = "ptame", resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``reference`` minus every other method, per measure, with a paired 95 % bootstrap interval.

    Each difference is taken image by image on the images both were scored on (a method limited to
    its first ``n`` images is compared with ``"<reference>@<method>"``, a limited reference with
    ``"<method>@<reference>"``), then bootstrapped like
    :func:`bootstrap_intervals`. Subset entries (``"a@b"``) are not compared again.

    Returns:
        ``{"<reference> - <method>": {measure: mean difference, measure_lo, measure_hi, "n"}}``.
    """
    if reference not in per_image:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, scores in per_image.items():
        if name == reference or "@" in name:
            continue
        mine = per_image.get(f"{reference}@{name}", per_image[reference])
        scores = per_image.get(f"{name}@{reference}", scores)  # when the reference itself was limited
        measures = [m for m in INTERVAL_MEASURES if m in scores and m in mine]
        if not measures or len(scores[measures[0]]) != len(mine[measures[0]]):
            continue
        diffs = {m: np.asarray(mine[m], dtype=np.float64) - np.asarray(scores[m], dtype=np.float64) for m in measures}
        out[f"{reference} - {name}"] = _with_bounds(diffs, bootstrap_intervals(diffs, resamples, seed))
    return out


def _maps(
    method: str, explainer: Explainer, images: Tensor, classes: Tensor, options: Mapping[str, Any]
) -> Tensor:
    """``(B, k, h, w)`` maps of ``classes`` ``(B, k)`` by ``method``."""
    b, k = classes.shape
    if method == "rise":
        return rise_multi(explainer.backbone, images, classes, **options)
    model: Explainer | Classifier = explainer if method in EXPLAINER_METHODS else explainer.backbone
    flat = saliency(method, model, images.repeat_interleave(k, 0), classes.reshape(-1), **options)
    return flat.view(b, k, *flat.shape[-2:])


def _batched_maps(
    method: str, explainer: Explainer, images: Tensor, classes: Tensor, options: Mapping[str, Any], batch_size: int
) -> tuple[Tensor, float]:
    """Maps ``(n, k, h, w)`` of ``classes`` ``(n, k)`` in batches, and the seconds the first class cost.

    One untimed warm-up batch comes first (RISE: one image and one batch of masks, the shape of
    its timed passes). Timed: the predicted class (column 0) of every image; RISE gets all its
    classes from the same passes and is timed as a whole.
    """
    n = images.shape[0]
    warm = dict(options)
    if method == "rise":
        warm["num_masks"] = min(int(warm.get("num_masks", 4000)), int(warm.get("batch_size", 64)))
        warm_images = 1
    else:
        warm_images = min(batch_size, n)
    _maps(method, explainer, images[:warm_images], classes[:warm_images, :1], warm)
    chunks, seconds = [], 0.0
    for start in range(0, n, batch_size):
        img, cls = images[start : start + batch_size], classes[start : start + batch_size]
        if method == "rise":
            t0 = time.perf_counter()
            chunks.append(_maps(method, explainer, img, cls, options).float().cpu())
            seconds += time.perf_counter() - t0
            continue
        t0 = time.perf_counter()
        first = _maps(method, explainer, img, cls[:, :1], options)
        seconds += time.perf_counter() - t0
        if cls.shape[1] > 1:
            first = torch.cat([first, _maps(method, explainer, img, cls[:, 1:], options)], 1)
        chunks.append(first.float().cpu())
    return torch.cat(chunks), seconds


def _with_bounds(per_image: Mapping[str, np.ndarray], intervals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Each measure's mean (today's keys), ``n`` and its interval as ``<measure>_lo`` / ``_hi``."""
    out: dict[str, float] = {k: float(np.mean(v)) for k, v in per_image.items()}
    out["n"] = len(next(iter(per_image.values())))
    for measure, (lo, hi) in intervals.items():
        out[f"{measure}_lo"], out[f"{measure}_hi"] = lo, hi
    return out


def _summary(per_image: Mapping[str, np.ndarray], intervals: Mapping[str, tuple[float, float]], seconds_per_image: float) -> dict[str, float]:
    """Point values, ``sec_per_image``, ``images``, ``n`` and the ``_lo``/``_hi`` bounds of a method."""
    out = _with_bounds(per_image, intervals)
    out["sec_per_image"] = seconds_per_image
    out["images"] = float(out["n"])
    return out


def log_precision(methods: Mapping[str, Mapping[str, Any]], device: torch.device | str = "cpu") -> None:
    """One line per method that autocasts (RISE's ``amp``): which precision and why; the rest is float32."""
    from ptame.precision import precision_for

    autocast = [name for name, options in methods.items() if "amp" in options or name == "rise"]
    for name in autocast:
        precision_for(methods[name].get("amp", "auto"), device, f"evaluation: {name}'s masked passes in")
    if not autocast:
        logger.info("evaluation precision float32: no method autocasts")


def evaluate(
    explainer: Explainer,
    evalset: EvalSet,
    methods: Mapping[str, Mapping[str, Any]],
    percentages: Sequence[int] = (10, 30, 50, 70),
    imputer: str = "linear",
    noise_std: float = 0.01,
    seed: int = 0,
    batch_size: int = 16,
    resamples: int = 1000,
    bootstrap_seed: int = 0,
    subsets: bool = True,
) -> Evaluation:
    """Score each method on ``evalset`` with the same measures, in batches, with bootstrap intervals.

    Args:
        methods: ``{name: options}``; options go to the method (e.g. RISE's ``num_masks``), except
            ``max_images``, which scores the method on the first images only (RISE's budget).
        percentages, imputer, noise_std, seed: ROAD settings (see :func:`ptame.metrics.road`).
        batch_size: images per map computation and per classifier call (does not change the numbers).
        resamples, bootstrap_seed: the bootstrap over images behind the 95 % intervals.
        subsets: also report each method scored on more images on every ``max_images`` subset,
            as ``"<method>@<limited method>"``.

    Returns:
        An :class:`Evaluation`; ``metrics[name]`` holds the keys of :data:`MEASURES` (``GridPG``
        only when the set has grid classes) plus ``ROAD-MoRF@p`` / ``ROAD-LeRF@p``, ``images``,
        ``n`` and the interval bounds (layout in the module docstring).
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    total = len(evalset.image_ids)
    limits = _limits(methods, total)
    settings = {
        "methods": {m: dict(o) for m, o in methods.items()},
        "images": total,
        "road": {"percentages": sorted(int(p) for p in percentages), "imputer": imputer, "noise_std": float(noise_std), "seed": int(seed)},
        "bootstrap": {"resamples": int(resamples), "seed": int(bootstrap_seed), "level": 0.95},
    }
    result = Evaluation(fingerprint=fingerprint(evalset, settings), settings=settings)
    seconds_per_image: dict[str, float] = {}
    start = time.perf_counter()
    for i, name in enumerate(bar := tqdm(list(methods), desc="evaluate", disable=None)):
        bar.set_postfix(method=name)
        logger.info("method %d/%d %s on %d images (%.0f s so far)", i + 1, len(methods), name, limits[name], time.perf_counter() - start)
        options = {k: v for k, v in methods[name].items() if k != "max_images"}
        scores, maps, seconds = _score_method(name, explainer, evalset, limits[name], options, percentages, noise_std, seed, imputer, batch_size)
        seconds_per_image[name] = seconds / limits[name]
        result.per_image[name] = scores
        result.maps[name] = maps
        result.curves[name] = {
            order: {p: float(np.mean(scores[f"ROAD-{order}@{p}"])) for p in sorted(percentages)} for order in ("MoRF", "LeRF")
        }
    if subsets:
        _add_subsets(result, limits, seconds_per_image, total)
    for name, scores in result.per_image.items():
        wanted = {k: v for k, v in scores.items() if k in INTERVAL_MEASURES}
        intervals = bootstrap_intervals(wanted, resamples, bootstrap_seed)
        result.metrics[name] = _summary(scores, intervals, seconds_per_image[name])
        shown = {k: round(v, 4) for k, v in result.metrics[name].items() if k in MEASURES or k == "n"}
        logger.info("%s: %s", name, shown)
    result.differences = paired_differences(result.per_image, "ptame", resamples, bootstrap_seed)
    return result


def _limits(methods: Mapping[str, Mapping[str, Any]], total: int) -> dict[str, int]:
    """How many of the first images each method is scored on (its ``max_images``, else all)."""
    limits: dict[str, int] = {}
    for name, options in methods.items():
        limit = options.get("max_images")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"methods[{name!r}].max_images must be a positive integer or None, got {limit!r}")
        limits[name] = total if limit is None else min(limit, total)
    return limits


def _score_method(
    name: str, explainer: Explainer, evalset: EvalSet, n: int, options: Mapping[str, Any],
    percentages: Sequence[int], noise_std: float, seed: int, imputer: str, batch_size: int,
) -> tuple[dict[str, np.ndarray], Tensor, float]:  # fmt: skip
    """One method's per-image scores on the first ``n`` images, its maps of the explained class, and the seconds they cost."""
    classifier = explainer.backbone
    images, targets = evalset.images[:n], evalset.targets[:n]
    classes = targets[:, None]
    if evalset.grid_classes is not None:
        classes = torch.cat([classes, evalset.grid_classes[:n]], 1)
    maps, seconds = _batched_maps(name, explainer, images, classes, options, batch_size)
    maps = maps.clamp(0, 1)
    scores = {k: v.numpy() for k, v in average_drop_increase_per_image(classifier, images, maps[:, 0], targets, batch_size=batch_size).items()}
    road_scores = road_per_image(classifier, images, maps[:, 0], targets, percentages, noise_std, seed, batch_size, imputer)  # type: ignore[arg-type]
    scores.update({k: v.numpy() for k, v in road_scores.items()})
    if evalset.grid_classes is not None:
        cell_maps = maps[:, 1:5].reshape(n * 4, *maps.shape[-2:])
        cells = torch.arange(4).repeat(n)
        scores["GridPG"] = grid_pointing_game(cell_maps, cells).double().view(n, 4).mean(1).numpy()
    return scores, maps[:, 0], seconds


def _add_subsets(result: Evaluation, limits: Mapping[str, int], seconds_per_image: dict[str, float], total: int) -> None:
    """Every method scored on more images, again on each limited method's images: ``"<method>@<limited>"``."""
    for limited, n in sorted(limits.items()):
        if n >= total:
            continue
        for other, m in limits.items():
            if other != limited and m > n:
                result.per_image[f"{other}@{limited}"] = {k: v[:n] for k, v in result.per_image[other].items()}
                seconds_per_image[f"{other}@{limited}"] = seconds_per_image[other]
