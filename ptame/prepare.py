"""Image source -> Parquet shards (the ``prepare`` stage).

Output: ``<out>/train/part-*.parquet``, ``<out>/eval/part-*.parquet`` and ``<out>/single/part-*.parquet``
(the embedded default's single evaluation photos; empty for a user's images), one row per image with
the columns of :data:`SCHEMA` (``image_id``, encoded ``image`` bytes, ``split``, ``source``,
``width``, ``height``, ``label``, ``grid_classes``). Every input is decoded once: a corrupt,
truncated, empty or non-image file is logged with its reason, counted in the report and left out,
never silently.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ptame.data import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

__all__ = ["SCHEMA", "PrepareReport", "ShardWriter", "encode", "prepare_demo", "prepare_source", "read_prepared", "write_shards"]

logger = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("source", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("grid_classes", pa.list_(pa.int32())),
    ]
)


@dataclass
class PrepareReport:
    """What a prepare run wrote and what it left out (with the reason for each)."""

    train: int = 0
    eval: int = 0
    single: int = 0
    skipped: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    """Encode an RGB image (JPEG by default; PNG for lossless)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **({"quality": quality} if fmt.upper() == "JPEG" else {}))
    return buf.getvalue()


class ShardWriter:
    """Stream rows with :data:`SCHEMA`'s columns into ``part-00000.parquet``, ``part-00001.parquet``, ...

    ``out_dir`` is emptied first, so a rerun never mixes old and new shards; ids must be unique.
    Use as a context manager; at least one (possibly empty) shard is always written.
    """

    def __init__(self, out_dir: str | Path, shard_rows: int = 256) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.out = Path(out_dir)
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        self.shard_rows = shard_rows
        self.rows = 0
        self._shards = 0
        self._buffer: list[dict[str, Any]] = []
        self._seen: set[str] = set()

    def write(self, row: dict[str, Any]) -> None:
        if row["image_id"] in self._seen:
            raise ValueError(f"duplicate image_id {row['image_id']!r}; image ids must be unique")
        self._seen.add(row["image_id"])
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        table = pa.Table.from_pylist([{n: r.get(n) for n in SCHEMA.names} for r in self._buffer], schema=SCHEMA)
        pq.write_table(table, self.out / f"part-{self._shards:05d}.parquet")
        self._shards += 1
        self._buffer.clear()

    def close(self) -> None:
        if self._buffer or self._shards == 0:
            self._flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_shards(rows: Iterable[dict[str, Any]], out_dir: str | Path, shard_rows: int = 256) -> int:
    """Write all ``rows`` with a :class:`ShardWriter`; returns the row count."""
    with ShardWriter(out_dir, shard_rows) as writer:
        for row in rows:
            writer.write(row)
    return writer.rows


def read_prepared(path: str | Path, columns: list[str] | None = None, limit: int | None = None) -> pa.Table:
    """The prepared shards under ``path`` as one table (first ``limit`` rows, in id order of writing)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prepared data not found at {p}; run the prepare stage first (dvc repro prepare)")
    table = pq.read_table(p, columns=columns, schema=SCHEMA) if p.is_dir() else pq.read_table(p, columns=columns)
    return table.slice(0, limit) if limit is not None else table


# --------------------------------------------------------------------------- the embedded default


def prepare_demo(
    out_dir: str | Path,
    backbone: Any,
    train_images: int = 384,
    eval_images: int = 16,
    single_images: int = 0,
    grid_fraction: float = 0.5,
    image_size: int = 320,
    seed: int = 0,
    eval_seed: int = 1,
    min_score: float = 0.2,
    shard_rows: int = 256,
    photos: list[str] | None = None,
) -> PrepareReport:
    """Write the embedded default (see :mod:`ptame.demo`): training crops and grids, evaluation grids and single photos.

    Args:
        backbone: the :class:`~ptame.models.Classifier` that labels the evaluation cells and picks the single photos.
        single_images: single evaluation photos (no grid), from ``eval_seed``.
        seed / eval_seed: must differ, so no evaluation composite is ever seen in training.
    """
    from tqdm.auto import tqdm

    from ptame import demo

    if seed == eval_seed:
        raise ValueError(f"eval_seed must differ from seed (both {seed}): evaluation grids must never be trained on")
    pics = demo.load_photos(photos)
    logger.info("demo photos: %s", ", ".join(sorted(pics)))
    out = Path(out_dir)
    train_rows = (
        _row(image_id, encode(im), "train", "demo:" + "+".join(names), im.size, None, None)
        for image_id, im, names in tqdm(
            demo.train_images(pics, train_images, seed, grid_fraction, image_size), total=train_images, desc="prepare train", disable=None
        )
    )
    n_train = write_shards(train_rows, out / "train", shard_rows)
    grids = demo.eval_grids(pics, backbone, eval_images, eval_seed, image_size, min_score)
    eval_rows = (
        _row(g.image_id, encode(g.image, "PNG"), "eval", "demo:" + "+".join(g.photos), g.image.size, None, g.grid_classes)
        for g in grids
    )
    n_eval = write_shards(eval_rows, out / "eval", shard_rows)
    singles = demo.single_photos(pics, backbone, single_images, eval_seed, min_score) if single_images else []
    single_rows = (_row(i, encode(im, "PNG"), "single", f"demo:{name}", im.size, None, None) for i, im, name in singles)
    n_single = write_shards(single_rows, out / "single", shard_rows)
    logger.info("prepared %d training, %d evaluation grid and %d single evaluation images in %s", n_train, n_eval, n_single, out)
    return PrepareReport(train=n_train, eval=n_eval, single=n_single, source="demo")


def _row(
    image_id: str, data: bytes, split: str, source: str, size: tuple[int, int], label: str | None, grid_classes: list[int] | None
) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "image": data,
        "split": split,
        "source": source,
        "width": int(size[0]),
        "height": int(size[1]),
        "label": label,
        "grid_classes": [int(c) for c in grid_classes] if grid_classes is not None else None,
    }


# --------------------------------------------------------------------------- a user's images


def _is_eval(image_id: str, eval_fraction: float, seed: int) -> bool:
    """Deterministic split by a hash of the id: stable across reruns and machines."""
    digest = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _label(image_id: str) -> str | None:
    """ImageNet layout ``<class>/<file>``: the parent folder names the class."""
    parts = image_id.replace("\\", "/").split("/")
    return parts[-2] if len(parts) >= 2 else None


def prepare_source(
    spec: str,
    out_dir: str | Path,
    eval_fraction: float = 0.1,
    seed: int = 0,
    shard_rows: int = 256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_images: int | None = None,
) -> PrepareReport:
    """Validate and copy a user's images (folder, glob, ``.txt`` list or Parquet) into shards.

    Good images keep their original encoded bytes; each bad one is logged with its reason and
    listed in the report's ``errors``. A share ``eval_fraction`` goes to the evaluation split
    (chosen by a hash of the id, so reruns agree).
    """
    from tqdm.auto import tqdm

    from ptame.sources import iter_image_bytes, resolve_source

    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    source = resolve_source(spec)
    report = PrepareReport(source=spec)
    out = Path(out_dir)
    items: Iterator[tuple[str, bytes | None, str | None]] = iter_image_bytes(source)
    total = len(source) if source.kind == "files" else None
    write_shards([], out / "single", shard_rows)  # single photos are the embedded default's; a user's are all in eval
    with ShardWriter(out / "train", shard_rows) as train, ShardWriter(out / "eval", shard_rows) as evals:
        for image_id, data, error in tqdm(items, total=total, desc="prepare", disable=None):
            if max_images is not None and report.train + report.eval >= max_images:
                break
            if error is None:
                try:
                    im = decode_image(data or b"", max_pixels=max_pixels)
                except ImageDecodeError as e:
                    error = str(e)
            if error is not None:
                logger.warning("skipped %s: %s", image_id, error)
                report.skipped += 1
                report.errors.append({"image_id": image_id, "error": error})
                continue
            split = "eval" if _is_eval(image_id, eval_fraction, seed) else "train"
            label = _label(image_id) if source.kind == "files" else None
            (evals if split == "eval" else train).write(_row(image_id, data, split, spec, im.size, label, None))  # type: ignore[arg-type]
            setattr(report, split, getattr(report, split) + 1)
    if not report.train:
        raise ValueError(f"{spec}: no readable training image ({report.skipped} skipped); see the warnings above")
    if not report.eval and eval_fraction > 0:
        logger.warning("%s: no image fell into the evaluation split (eval_fraction=%s); raise it", spec, eval_fraction)
    if report.skipped:
        logger.warning("%s: %d of %d inputs were unreadable and skipped", spec, report.skipped, report.skipped + report.train + report.eval)
    logger.info("prepared %d training and %d evaluation images from %s in %s", report.train, report.eval, spec, out)
    return report
