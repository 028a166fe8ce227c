"""One chunk of a ``ptame explain`` job read and prepared: ids, image bytes, decoded model inputs.

A chunk (:func:`ptame.jobs.plan_chunks`) names its inputs as files (``ids``/``paths``) or as rows of a
Parquet file (``file`` with ``start``/``stop`` or ``rows``). The stages of :mod:`ptame.pipeline` turn it
into prepared items with a :class:`ChunkReader`: read on the driver's node (:func:`read_here`) when other
nodes do not see the input, decoded by a CPU stage in front of GPU actors (:func:`prepare_chunk`, undone by
:func:`unpack_chunk`), or read and decoded by a CPU actor itself (:func:`read_and_prepare`). Every input
yields an item; a bad one an error. No Ray here.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ptame.batch import ExplainJob

__all__ = ["ChunkReader", "prepare_chunk", "read_and_prepare", "read_here", "unpack_chunk"]

logger = logging.getLogger("ptame.batch")  # one logger for the whole ``ptame explain`` job


@dataclass(frozen=True)
class ChunkReader:
    """What a stage needs to read and prepare a job's chunks, as one value that travels to Ray's workers.

    ``job``: the settings (columns, classes, ``max_pixels``, ``view``); ``filesystem``: the input's;
    ``preprocessing``: the model's (:meth:`ptame.models.Preprocessing.to_dict`); ``driver``: the driver's
    node when the input is shared by every node, where a file unreadable here is read again
    (:func:`ptame.cluster.reread_on_driver`).
    """

    job: ExplainJob
    filesystem: Any
    preprocessing: dict[str, Any]
    driver: str | None = None


def _read_parquet_rows(
    fs: Any, path: str, rows: Sequence[int], image_column: str, id_column: str, class_column: str | None = None
) -> tuple[list[str], list[bytes | None], list[Any]]:
    """The ``rows`` (ascending) of one Parquet file: ids, image bytes and the class column's values
    (``None`` each without ``class_column``); only the row groups that hold the rows are read."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [image_column] + ([id_column] if id_column in pf.schema_arrow.names else [])
        columns += [class_column] if class_column else []
        groups, local, kept, offset = [], [], 0, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = bisect_left(rows, offset), bisect_left(rows, offset + n)
            if hi > lo:
                groups.append(g)
                local.extend(kept + r - offset for r in rows[lo:hi])
                kept += n
            offset += n
        table = pf.read_row_groups(groups, columns=columns).take(local)
    blobs = table.column(image_column).to_pylist()
    if id_column in columns:
        ids = [str(v) for v in table.column(id_column).to_pylist()]
    else:
        name = path.rsplit("/", 1)[-1]
        ids = [f"{name}#{row}" for row in rows]
    wanted = table.column(class_column).to_pylist() if class_column else [None] * len(blobs)
    return ids, blobs, wanted


def _read_entries(
    chunk: dict[str, Any], reader: ChunkReader
) -> tuple[list[tuple[str, bytes | None, str | None]], list[Any]]:
    """``(entries (id, bytes, error), wanted classes)`` of one chunk, as read by :func:`read_here` on
    the driver's node, else read here. ``job.classes``: one class for every image (int), or the
    Parquet column holding each row's class."""
    from ptame.sources import ImageSource, iter_image_bytes

    job, filesystem = reader.job, reader.filesystem
    if "blobs" in chunk:
        return list(zip(chunk["image_id"], chunk["blobs"], chunk["read_error"])), list(chunk["classes"])
    if "ids" in chunk:
        source = ImageSource("files", list(chunk["paths"]), list(chunk["ids"]), filesystem)
        entries = list(iter_image_bytes(source))
        if reader.driver is not None and any(e[2] is not None for e in entries):
            from ptame.cluster import reread_on_driver

            entries = reread_on_driver(entries, source.paths, filesystem, reader.driver)
        return entries, [job.classes] * len(entries)
    column = job.classes if isinstance(job.classes, str) else None
    rows = chunk["rows"] if "rows" in chunk else range(chunk["start"], chunk["stop"])
    ids, blobs, wanted = _read_parquet_rows(filesystem, chunk["file"], rows, job.image_column, job.id_column, column)
    entries = [(i, b, None if b is not None else "no image bytes (null)") for i, b in zip(ids, blobs)]
    return entries, wanted if column else [job.classes] * len(entries)


def read_here(chunk: dict[str, Any], reader: ChunkReader) -> dict[str, Any]:
    """Read stage pinned to the driver's node for an input other nodes do not see: the chunk's bytes as one row."""
    entries, wanted = _read_entries(chunk, reader)
    return {
        "chunk": chunk["chunk"],
        "image_id": [e[0] for e in entries],
        "blobs": [e[1] for e in entries],
        "read_error": [e[2] for e in entries],
        "classes": [None if c is None else str(c) for c in wanted],
    }


def read_and_prepare(chunk: dict[str, Any], reader: ChunkReader) -> tuple[list[str], list[Any], list[Any]]:
    """Read, decode and preprocess one chunk: ``(ids, prepared items, wanted classes)``; every input
    yields an item, bad ones an error. ``job.view``: ``crop`` or ``full`` (see :func:`ptame.data.prepare`)."""
    from ptame.models import Preprocessing
    from ptame.data import Prepared, prepare_image

    prep = Preprocessing.from_dict(reader.preprocessing)
    entries, wanted = _read_entries(chunk, reader)
    items: list[Prepared] = []
    for image_id, data, error in entries:
        if error is not None:
            items.append(Prepared(None, 0, 0, None, error))
            continue
        try:
            items.append(prepare_image(data, prep, reader.job.max_pixels, reader.job.view))
        except Exception as e:  # noqa: BLE001 - any input that breaks a decoder is an error row, not a dead job
            logger.warning("could not prepare %s: %r", image_id, e)
            items.append(Prepared(None, 0, 0, None, f"could not prepare image: {type(e).__name__}: {e}"))
    return [e[0] for e in entries], items, wanted


def prepare_chunk(chunk: dict[str, Any], reader: ChunkReader) -> dict[str, Any]:
    """Decode stage in front of GPU actors: :func:`read_and_prepare` packed as one Ray Data row.

    The pixels of the good images travel as one float16 buffer (half of float32's object-store traffic),
    each within 2**-12 of what a CPU actor computes; :func:`unpack_chunk` restores a letterbox's padding
    exactly. Not uint8: the resize runs in float, so no uint8 image reproduces a CPU actor's input, and
    rounding to 1/255 moved maps by up to 0.06 and flipped a near-tie prediction (EfficientNet-Lite0, 7
    photos), where float16 moved them by at most 0.004 (about one step of the stored uint8 map) and
    flipped none.
    """
    import numpy as np

    ids, items, wanted = read_and_prepare(chunk, reader)
    good = [it.tensor.numpy() for it in items if it.error is None]
    size = int(reader.preprocessing["input_size"])
    pixels = np.stack(good) if good else np.zeros((0, 3, size, size))
    return {
        "chunk": chunk["chunk"],
        "image_id": ids,
        "width": [it.width for it in items],
        "height": [it.height for it in items],
        "crop_box": [list(it.crop_box) if it.crop_box else None for it in items],
        "content": [list(it.content) if it.content else None for it in items],
        "error": [it.error for it in items],
        "classes": [None if c is None else str(c) for c in wanted],  # index or label; None: the prediction
        "pixels": np.ascontiguousarray(pixels, np.float16).tobytes(),
    }


def unpack_chunk(chunk: dict[str, Any], prep: Any) -> tuple[list[str], list[Any], list[Any]]:
    """A row of :func:`prepare_chunk` back as ``(ids, prepared items, wanted classes)``: the float16 pixels
    as float32 for the :class:`~ptame.models.Preprocessing` ``prep``, a letterbox padded with its exact mean."""
    import numpy as np
    import torch

    from ptame.data import Prepared

    size = prep.input_size
    pixels = torch.from_numpy(np.frombuffer(chunk["pixels"], np.float16).reshape(-1, 3, size, size).astype(np.float32))
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(3, 1, 1)
    items, g = [], 0
    for width, height, box, content, error in zip(
        chunk["width"], chunk["height"], chunk["crop_box"], chunk["content"], chunk["error"]
    ):
        if error is not None:
            items.append(Prepared(None, int(width), int(height), None, error))
            continue
        inside = None if content is None else tuple(int(v) for v in content)
        if inside is not None:  # the padding is the exact mean (zero once normalised), not its nearest float16
            left, top, right, bottom = inside
            image = pixels[g, :, top:bottom, left:right].clone()
            pixels[g] = mean
            pixels[g, :, top:bottom, left:right] = image
        crop = tuple(int(v) for v in box)
        items.append(Prepared(pixels[g], int(width), int(height), crop, None, inside))  # type: ignore[arg-type]
        g += 1
    return list(chunk["image_id"]), items, list(chunk["classes"])
