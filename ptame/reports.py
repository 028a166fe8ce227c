"""Score sets of images and write the evaluation's reports: the one path of the DVC ``evaluate`` stage and ``ptame evaluate``.

A run scores every method on every named image set with :func:`ptame.evaluate.evaluate` and writes:

- ``metrics.json``: ``{method: {measure: value, ...}}`` for the main set and ``{method}/{set}`` for each
  other set (the embedded default's single photos: ``ptame/single``);
- ``differences.json``: P-TAME minus each peer with paired 95 % intervals, ``"ptame - gradcam"`` and
  ``"ptame/single - gradcam/single"``;
- ``evaluation.json``: the fingerprint the champion rule compares, each set's image ids, the settings
  and any images left out with the reason;
- ``per_image.parquet``: one row per set, method and image, one column per measure;
- ``road_morf.csv`` / ``road_lerf.csv`` (``road_morf_single.csv`` ...) and their ``.png`` drawings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ptame.evaluate import EvalSet, Evaluation, decode_eval_rows, evaluate
from ptame.explainer import Explainer
from ptame.measures import HEADLINE, MEASURES

__all__ = [
    "MAIN", "ReportPaths", "ScoredSets", "ScoringSettings", "as_table", "combined_fingerprint", "load_image_set",
    "render_gallery", "score_sets", "set_key", "write_reports", "write_road_plots",
]

logger = logging.getLogger(__name__)

#: the name of the main set, whose entries keep their bare method names
MAIN = ""


@dataclass(frozen=True)
class ScoringSettings:
    """How the measures are scored (ROAD and the bootstrap): everything besides the methods that can change a number."""

    percentages: tuple[int, ...] = (10, 30, 50, 70)
    imputer: str = "linear"
    noise_std: float = 0.01
    road_seed: int = 0
    resamples: int = 1000
    bootstrap_seed: int = 0
    batch_size: int = 16

    @classmethod
    def from_params(cls, evaluate_params: Mapping[str, Any]) -> ScoringSettings:
        """From ``params.yaml``'s ``evaluate`` section (its ``road``, ``bootstrap`` and ``batch_size``)."""
        road, boot = evaluate_params["road"], evaluate_params["bootstrap"]
        return cls(
            percentages=tuple(int(p) for p in road["percentages"]), imputer=str(road["imputer"]),
            noise_std=float(road["noise_std"]), road_seed=int(road["seed"]), resamples=int(boot["resamples"]),
            bootstrap_seed=int(boot["seed"]), batch_size=int(evaluate_params["batch_size"]),
        )  # fmt: skip


@dataclass(frozen=True)
class ReportPaths:
    """Where a run's reports go: the JSON files and Parquet under ``root``, the curves under ``plots``."""

    root: Path
    plots: Path

    @classmethod
    def under(cls, root: str | Path, plots: str | Path | None = None) -> ReportPaths:
        return cls(Path(root), Path(plots) if plots is not None else Path(root))

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def differences(self) -> Path:
        return self.root / "differences.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def per_image(self) -> Path:
        return self.root / "per_image.parquet"


@dataclass
class ScoredSets:
    """Each set's :class:`~ptame.evaluate.Evaluation` by set name, and the images left out before scoring."""

    results: dict[str, Evaluation]
    sets: dict[str, EvalSet]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def set_key(name: str, set_name: str) -> str:
    """A method's (or a difference's) entry for ``set_name``: bare for the main set, ``name/set`` otherwise."""
    if set_name == MAIN:
        return name
    if " - " in name:
        mine, peer = name.split(" - ", 1)
        return f"{mine}/{set_name} - {peer}/{set_name}"
    return f"{name}/{set_name}"


def combined_fingerprint(results: Mapping[str, Evaluation]) -> str:
    """The main set's fingerprint alone, or a hash of every set's (so adding a set changes it)."""
    if list(results) == [MAIN]:
        return results[MAIN].fingerprint
    joined = "|".join(f"{name}:{results[name].fingerprint}" for name in sorted(results))
    return hashlib.sha256(joined.encode()).hexdigest()


def _parquet_column(source: Any, column: str, required: str = "") -> list[Any] | None:
    """The values of ``column`` over a Parquet source's rows, in input order.

    ``None`` when the source is not Parquet or a file lacks the column; with ``required`` (what the
    column is for), a missing column is an error naming the file and its columns instead.
    """
    if source.kind != "parquet":
        return None
    import pyarrow.parquet as pq

    values: list[Any] = []
    for path in source.paths:
        with source.filesystem.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if column not in names:
                if required:
                    raise ValueError(f"{path} has no column {column!r} (columns: {names}); {required}")
                return None
            values += parquet.read(columns=[column]).column(0).to_pylist()
    return values


def _wanted_classes(source: Any, classes: int | str | None, class_names: Sequence[str]) -> list[int | None] | int | None:
    """Each input's class to explain (``None``: the prediction): one class for all, or a Parquet column's values."""
    from ptame.classes import resolve_class

    if classes is None:
        return None
    if isinstance(classes, str) and source.kind == "parquet" and not classes.lstrip("-").isdigit():
        values = _parquet_column(source, classes, required="--classes names a column or a class")
        return [None if v is None else resolve_class(v, class_names) for v in values or []]
    return resolve_class(classes, class_names)  # one class for every image


def load_image_set(
    spec: str, explainer: Explainer, classes: int | str | None = None, max_images: int | None = None, batch_size: int = 16
) -> tuple[EvalSet, list[dict[str, str]]]:
    """A user's images (folder, glob, ``.txt`` list or Parquet, see :mod:`ptame.sources`) as an :class:`EvalSet`.

    Each image is explained for ``classes`` (an index, a label, ``-1``/``None``: the prediction, or
    a Parquet column); an unreadable input is left out and returned with its reason, never fatal.
    """
    from ptame.sources import iter_image_bytes, resolve_source

    source = resolve_source(spec)
    wanted = _wanted_classes(source, classes, explainer.class_names)
    grids = _parquet_column(source, "grid_classes")  # 2 x 2 grids with known cells, e.g. the pipeline's: GridPG
    evalset, skipped = decode_eval_rows(iter_image_bytes(source), explainer.backbone, grids, wanted, max_images, batch_size)
    if not evalset.image_ids:
        raise ValueError(f"{spec}: no readable image ({len(skipped)} left out); see the warnings above")
    return evalset, skipped


def score_sets(
    explainer: Explainer,
    sets: Mapping[str, EvalSet],
    methods: Mapping[str, Mapping[str, Any]],
    settings: ScoringSettings = ScoringSettings(),
    skipped: Sequence[Mapping[str, str]] = (),
) -> ScoredSets:
    """Score every method on every set with the same measures and settings (empty sets are left out)."""
    start = time.perf_counter()
    results = {}
    for name, evalset in sets.items():
        if not evalset.image_ids:
            continue
        logger.info("scoring %d images of set %r with %s", len(evalset.image_ids), name or "main", ", ".join(methods))
        results[name] = evaluate(
            explainer, evalset, methods, percentages=settings.percentages, imputer=settings.imputer,
            noise_std=settings.noise_std, seed=settings.road_seed, batch_size=settings.batch_size,
            resamples=settings.resamples, bootstrap_seed=settings.bootstrap_seed,
        )  # fmt: skip
    if not results:
        raise ValueError("no image to score: every set is empty")
    return ScoredSets(results, {n: sets[n] for n in results}, [dict(s) for s in skipped], time.perf_counter() - start)


def merged(scored: ScoredSets) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """``(metrics, differences)`` of all sets in one layout (see the module docstring)."""
    metrics, differences = {}, {}
    for set_name, result in scored.results.items():
        metrics.update({set_key(m, set_name): v for m, v in result.metrics.items()})
        differences.update({set_key(d, set_name): v for d, v in result.differences.items()})
    return metrics, differences


def _per_image_table(scored: ScoredSets) -> Any:
    """One row per set, method and image (``pyarrow.Table``): ``set``, ``method``, ``image_id`` and each measure."""
    import pyarrow as pa

    rows = []
    for set_name, result in scored.results.items():
        ids = scored.sets[set_name].image_ids
        for method, scores in result.per_image.items():
            if "@" in method:  # subsets repeat their method's rows
                continue
            for i in range(len(next(iter(scores.values())))):
                rows.append({"set": set_name or "main", "method": method, "image_id": ids[i], **{k: float(v[i]) for k, v in scores.items()}})
    columns = list(dict.fromkeys(k for row in rows for k in row))  # every set's measures (GridPG only on grids)
    return pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows])


def _write_curves(scored: ScoredSets, plots: Path) -> list[Path]:
    """Each set's ROAD curves as CSV (``road_morf.csv``, ``road_morf_single.csv`` ...) and as PNG."""
    from ptame.viz import plot_csv

    written = []
    for set_name, result in scored.results.items():
        for csv_path in write_road_plots(result.curves, plots, suffix=f"_{set_name}" if set_name else ""):
            morf = "morf" in csv_path.stem
            title = f"ROAD {'MoRF' if morf else 'LeRF'} ({'lower' if morf else 'higher'} is better)" + (f", {set_name}" if set_name else "")
            plot_csv(csv_path, csv_path.with_suffix(".png"), "percentage", list(result.curves), title, "removed pixels (%)", "accuracy")
            written += [csv_path, csv_path.with_suffix(".png")]
    return written


def write_reports(scored: ScoredSets, paths: ReportPaths, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write every report of :func:`score_sets` under ``paths``; returns the ``evaluation.json`` record."""
    import pyarrow.parquet as pq

    paths.root.mkdir(parents=True, exist_ok=True)
    paths.plots.mkdir(parents=True, exist_ok=True)
    metrics, differences = merged(scored)
    paths.metrics.write_text(json.dumps(metrics, indent=2))
    paths.differences.write_text(json.dumps(differences, indent=2))
    first = next(iter(scored.results))  # the main set when it was scored
    record = {
        "fingerprint": combined_fingerprint(scored.results),
        "n": len(scored.sets[first].image_ids),
        "image_ids": scored.sets[first].image_ids,
        "sets": {name or "main": {"n": len(s.image_ids), "image_ids": s.image_ids, "fingerprint": scored.results[name].fingerprint}
                 for name, s in scored.sets.items()},  # fmt: skip
        "settings": scored.results[first].settings,
        "skipped": scored.skipped,
        "seconds": round(scored.seconds, 1),
        **dict(extra or {}),
    }
    paths.evaluation.write_text(json.dumps(record, indent=2))
    pq.write_table(_per_image_table(scored), paths.per_image)
    _write_curves(scored, paths.plots)
    logger.info("metrics (%s), fingerprint %s:\n%s", paths.metrics, record["fingerprint"][:12], as_table(metrics))
    logger.info(
        "P-TAME minus each peer on the same images, paired 95 %% intervals (%s):\n%s",
        paths.differences, as_table(differences, ("n", *HEADLINE, "AD@15", "ROAD-MoRF@10"), intervals=True),
    )  # fmt: skip
    return record


def write_road_plots(curves: Mapping[str, Mapping[str, Mapping[int, float]]], out_dir: str | Path, suffix: str = "") -> list[Path]:
    """``road_morf{suffix}.csv`` and ``road_lerf{suffix}.csv``: ``percentage`` and one accuracy column per method.

    The curves include the fixed end points ``(0, 1)`` and ``(100, 0)`` that the area uses.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    methods = list(curves)
    for order in ("MoRF", "LeRF"):
        percentages = sorted({p for m in methods for p in curves[m][order]})
        path = out / f"road_{order.lower()}{suffix}.csv"
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


def as_table(
    metrics: Mapping[str, Mapping[str, float]], measures: Sequence[str] = tuple(MEASURES), intervals: bool = False
) -> str:
    """A markdown table of ``metrics[row][measure]`` (for logs and reports); ``intervals``: ``value [lo, hi]``."""

    def cell(values: Mapping[str, float], m: str) -> str:
        if m not in values or not np.isfinite(values[m]):
            return "-"
        if intervals and f"{m}_lo" in values:
            return f"{values[m]:+.4g} [{values[f'{m}_lo']:+.3g}, {values[f'{m}_hi']:+.3g}]"
        return f"{values[m]:.4g}"

    head = "| method | " + " | ".join(measures) + " |"
    rule = "| --- |" + " --- |" * len(measures)
    rows = [f"| {name} | " + " | ".join(cell(values, m) for m in measures) + " |" for name, values in metrics.items()]
    return "\n".join([head, rule, *rows])
