"""Explanations as Parquet: the one schema of the bulk output, the table builder, and the reader.

A directory of explanations holds ``part-<chunk>.parquet`` files, one row per input image, with the
columns of :data:`SCHEMA` (the explanations contract of ``design.md`` plus ``crop_box``), and the
job's manifest ``_ptame_job.json``. Files whose names start with ``.`` or ``_`` (the manifest,
half-written temporary files) are never read as data.

Example::

    import ptame
    df = ptame.read_explanations("explanations/")   # pandas, one row per image
    good = df[df.error.isna()]
    good.saliency.iloc[0]                            # (h, w) float32 array in [0, 1]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "MANIFEST",
    "SCHEMA",
    "explanations_dataset",
    "explanations_table",
    "output_filesystem",
    "read_explanations",
    "read_manifest",
    "saliency_array",
]

#: the job manifest written beside the data files (model, input, chunking; see :mod:`ptame.batch`)
MANIFEST = "_ptame_job.json"

#: one row per input image; ``error`` is null on good rows, every prediction column null on bad ones
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("pred_class", pa.int32()),
        pa.field("pred_label", pa.string()),
        pa.field("pred_score", pa.float32()),
        pa.field("topk_classes", pa.list_(pa.int32())),
        pa.field("topk_labels", pa.list_(pa.string())),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("saliency", pa.binary()),  # saliency_class map, min-max normalised, uint8, row-major
        pa.field("saliency_class", pa.int32()),  # the requested class (--classes), else pred_class
        pa.field("saliency_label", pa.string()),
        pa.field("saliency_score", pa.float32()),
        pa.field("saliency_shape", pa.list_(pa.int32())),  # (h, w)
        # the maps of topk_classes, in that order, quantised like saliency; null unless --maps topk
        pa.field("topk_saliency", pa.list_(pa.binary())),
        pa.field("crop_box", pa.list_(pa.int32())),  # (left, top, right, bottom) in original pixels
        pa.field("model_uri", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

_ROW_COLUMNS = [f.name for f in SCHEMA if f.name not in ("image_id", "model_uri")]
#: columns a row may leave out (null): only made when asked for
_OPTIONAL = frozenset({"topk_saliency"})


def explanations_table(image_ids: Sequence[str], rows: Sequence[dict[str, Any]], model_uri: str) -> pa.Table:
    """Rows of :func:`ptame.records.explain_prepared` (one per id) as a table with :data:`SCHEMA`."""
    if len(image_ids) != len(rows):
        raise ValueError(f"image_ids has {len(image_ids)} entries but rows has {len(rows)}")
    columns: dict[str, list[Any]] = {"image_id": [str(i) for i in image_ids]}
    for name in _ROW_COLUMNS:
        columns[name] = [row.get(name) if name in _OPTIONAL else row[name] for row in rows]
    columns["model_uri"] = [model_uri] * len(rows)
    return pa.Table.from_pydict({f.name: columns[f.name] for f in SCHEMA}, schema=SCHEMA)


def saliency_array(data: bytes | None, shape: Sequence[int] | None) -> np.ndarray | None:
    """A stored ``saliency`` cell as a ``(h, w)`` float32 array in ``[0, 1]`` (``None`` stays ``None``)."""
    if data is None or shape is None:
        return None
    from ptame.records import dequantize

    return dequantize(data, shape)


def output_filesystem(uri: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for a local directory or any fsspec URI (``s3://...``)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") or path


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The job manifest of an explanations directory, or ``None`` when there is none."""
    fs, root = output_filesystem(directory)
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rt") as f:
        return json.load(f)


def explanations_dataset(directory: str) -> Any:
    """The explanations under ``directory`` as a :class:`pyarrow.dataset.Dataset` (lazy, queryable).

    Raises:
        FileNotFoundError: ``directory`` holds no explanation files.
    """
    import pyarrow.dataset as pads
    from pyarrow.fs import LocalFileSystem

    fs, root = output_filesystem(directory)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{directory!r} is not a directory of explanations (run `ptame explain` first)")
    local = "file" in ([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol)
    dataset = pads.dataset(root, schema=SCHEMA, format="parquet", filesystem=LocalFileSystem() if local else fs)
    if not dataset.files:
        raise FileNotFoundError(f"{directory!r} holds no explanation files (part-*.parquet)")
    return dataset


def read_explanations(
    directory: str, columns: Sequence[str] | None = None, limit: int | None = None, errors: bool = True
) -> Any:
    """Read explanations into a :class:`pandas.DataFrame`, maps decoded to arrays.

    Args:
        directory: output of ``ptame explain`` (local path or fsspec URI).
        columns: columns to read (default all of :data:`SCHEMA`).
        limit: read at most this many rows (in ``image_id`` order within each file).
        errors: keep error rows (``False``: only images that were explained).

    Returns:
        One row per image; ``saliency`` holds ``(h, w)`` float32 arrays in ``[0, 1]`` (``None`` on
        error rows), ``topk_saliency`` a list of them (``None`` unless made with ``--maps topk``);
        integer and float columns are nullable (``Int32``, ``Float32``).
    """
    import pandas as pd
    import pyarrow.compute as pc

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    names = list(columns) if columns is not None else SCHEMA.names
    unknown = sorted(set(names) - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"columns {unknown} are not explanation columns; choose from {SCHEMA.names}")
    maps = [name for name in ("saliency", "topk_saliency") if name in names]
    wanted = list(dict.fromkeys(names + (["saliency_shape"] if maps else [])))
    dataset = explanations_dataset(directory)
    where = None if errors else pc.field("error").is_null()
    if limit is None:
        table = dataset.to_table(columns=wanted, filter=where)
    else:
        table = dataset.head(limit, columns=wanted, filter=where)
    df = table.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype(), pa.float32(): pd.Float32Dtype()}.get)
    if "saliency" in names:
        df["saliency"] = [saliency_array(d, s) for d, s in zip(df["saliency"], df["saliency_shape"])]
    if "topk_saliency" in names:
        df["topk_saliency"] = [
            None if ds is None else [saliency_array(d, s) for d in ds] for ds, s in zip(df["topk_saliency"], df["saliency_shape"])
        ]
    if maps and "saliency_shape" not in names:
        df = df.drop(columns="saliency_shape")
    return df
