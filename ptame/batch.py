"""``ptame explain``: bulk-explain images into Parquet with Ray Data, resumable and safe on bad input.

The pipeline streams chunks of inputs through Ray Data stages, so memory stays bounded whatever
the input size::

    chunk (ids, paths) --map, actor pool-----> read bytes, decode, preprocess (bad input -> error),
                                               explain (model loaded once per actor), write the
                                               chunk as part-<chunk>.parquet atomically

CPU actors decode their own chunks with the CPUs they reserve (one per torch thread): no pixels
cross the object store and no Ray worker is started for a chunk. GPU actors (``use_gpu``) are fed by a CPU
stage that reads, decodes and preprocesses, so that decoding on the CPUs overlaps the GPUs.

On a cluster whose nodes share no disk (:mod:`ptame.cluster`), the explainer reaches the actors as
the bytes of its files, an input that other nodes do not see is read by a stage pinned to the
driver's node, and the part files of an output that other nodes do not see are written by the
driver from what the actors return.

Rows are chunks, not images, so that a chunk is one unit from reading to its file (Ray Data's own
readers and writers do not keep such units apart, and exactly-once needs them).

Exactly once and additions to an output folder (the chunk plans, the manifest, generations) live
in :mod:`ptame.jobs`: a rerun skips the chunks whose file exists, and another model or other
settings are refused rather than mixed into the same output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ptame.explanations import MANIFEST, output_filesystem
from ptame.jobs import (
    MANIFEST_FORMAT,
    TEMPORARY,
    check_output,
    chunk_file,
    explained_ids,
    finished_chunks,
    list_names,
    manifest_generations,
    plan_addition,
    plan_chunks,
    start_addition,
    write_atomically,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkExplainer",
    "ExplainSummary",
    "add_arguments",
    "explain_to_parquet",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256
VIEWS = ("crop", "full")  # ptame.data.VIEWS, repeated so that `ptame --help` does not import torch
#: ``--maps``: the map of the explained class only, or also the maps of all top-k classes
MAPS = ("pred", "topk")


@dataclass(frozen=True)
class ExplainSummary:
    """What one ``explain_to_parquet`` call did (``images``/``errors`` count this run's rows)."""

    output: str
    model_uri: str
    images: int
    errors: int
    seconds: float
    chunks_written: int
    chunks_skipped: int
    total_images: int
    already_explained: int = 0  # inputs an earlier run had explained into the same output

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0




# ---------------------------------------------------------------------------------- planning


def _pin_model(model: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``(model_uri, tracking_uri)``: a registry alias resolved once to ``models:/<name>/<version>``."""
    from pathlib import Path

    if not model.startswith("models:/"):
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model {model!r} is neither a directory saved by Explainer.save nor a models:/ URI")
        return str(path.resolve()), None
    from ptame.registry import connect, resolve_version

    tracking_uri = connect(tracking_uri)  # absolute for SQLite: actors run in other working directories
    name, version = resolve_version(model)
    return f"models:/{name}/{version}", tracking_uri














# ------------------------------------------------------------------------ output directory














def _default_max_pixels() -> int:
    from ptame.data import DEFAULT_MAX_PIXELS  # imports torch: only when a job starts

    return DEFAULT_MAX_PIXELS


def _absolute(spec: str) -> str:
    return spec if "://" in spec else os.path.abspath(spec)


# ------------------------------------------------------------------------ Ray Data stages


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
    chunk: dict[str, Any],
    *,
    filesystem: Any,
    image_column: str,
    id_column: str,
    classes: int | str | None = None,
    driver: str | None = None,
) -> tuple[list[tuple[str, bytes | None, str | None]], list[Any]]:
    """``(entries (id, bytes, error), wanted classes)`` of one chunk, as read by :func:`_read_here` on
    the driver's node, else read here. ``driver``: the driver's node when the input is shared by
    every node; a file unreadable here is read again there (:func:`ptame.cluster.reread_on_driver`)."""
    from ptame.sources import ImageSource, iter_image_bytes

    if "blobs" in chunk:
        return list(zip(chunk["image_id"], chunk["blobs"], chunk["read_error"])), list(chunk["classes"])
    if "ids" in chunk:
        source = ImageSource("files", list(chunk["paths"]), list(chunk["ids"]), filesystem)
        entries = list(iter_image_bytes(source))
        if driver is not None and any(e[2] is not None for e in entries):
            from ptame.cluster import reread_on_driver

            entries = reread_on_driver(entries, source.paths, filesystem, driver)
        return entries, [classes] * len(entries)
    column = classes if isinstance(classes, str) else None
    rows = chunk["rows"] if "rows" in chunk else range(chunk["start"], chunk["stop"])
    ids, blobs, wanted = _read_parquet_rows(filesystem, chunk["file"], rows, image_column, id_column, column)
    entries = [(i, b, None if b is not None else "no image bytes (null)") for i, b in zip(ids, blobs)]
    return entries, wanted if column else [classes] * len(entries)


def _read_here(chunk: dict[str, Any], **read: Any) -> dict[str, Any]:
    """Read stage pinned to the driver's node for an input other nodes do not see: the chunk's bytes as one row."""
    entries, wanted = _read_entries(chunk, **read)
    return {
        "chunk": chunk["chunk"],
        "image_id": [e[0] for e in entries],
        "blobs": [e[1] for e in entries],
        "read_error": [e[2] for e in entries],
        "classes": [None if c is None else str(c) for c in wanted],
    }


def _read_and_prepare(
    chunk: dict[str, Any],
    *,
    preprocessing: dict[str, Any],
    max_pixels: int,
    view: str = "crop",
    **read: Any,
) -> tuple[list[str], list[Any], list[Any]]:
    """Read (:func:`_read_entries`), decode and preprocess one chunk: ``(ids, prepared items, wanted
    classes)``; every input yields an item, bad ones an error.

    ``read["classes"]``: one class for every image (int), or the Parquet column holding each row's class;
    ``view``: ``crop`` or ``full`` (see :func:`ptame.records.prepare`).
    """
    from ptame.data import Prepared, prepare_image
    from ptame.models import Preprocessing

    prep = Preprocessing.from_dict(preprocessing)
    entries, wanted = _read_entries(chunk, **read)
    items: list[Prepared] = []
    for image_id, data, error in entries:
        if error is not None:
            items.append(Prepared(None, 0, 0, None, error))
            continue
        try:
            items.append(prepare_image(data, prep, max_pixels, view))
        except Exception as e:  # noqa: BLE001 - any input that breaks a decoder is an error row, not a dead job
            logger.warning("could not prepare %s: %r", image_id, e)
            items.append(Prepared(None, 0, 0, None, f"could not prepare image: {type(e).__name__}: {e}"))
    return [e[0] for e in entries], items, wanted


def _prepare_chunk(chunk: dict[str, Any], **prepare: Any) -> dict[str, Any]:
    """Decode stage in front of GPU actors: :func:`_read_and_prepare` packed as one Ray Data row.

    The pixels of the good images travel as one float16 buffer (half of float32's object-store traffic),
    each within 2**-12 of what a CPU actor computes; :func:`_unpack_chunk` restores a letterbox's padding
    exactly. Not uint8: the resize runs in float, so no uint8 image reproduces a CPU actor's input, and
    rounding to 1/255 moved maps by up to 0.06 and flipped a near-tie prediction (EfficientNet-Lite0, 7
    photos), where float16 moved them by at most 0.004 (about one step of the stored uint8 map) and
    flipped none.
    """
    import numpy as np

    ids, items, wanted = _read_and_prepare(chunk, **prepare)
    good = [it.tensor.numpy() for it in items if it.error is None]
    size = int(prepare["preprocessing"]["input_size"])
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


def _unpack_chunk(chunk: dict[str, Any], prep: Any) -> tuple[list[str], list[Any], list[Any]]:
    """A row of :func:`_prepare_chunk` back as ``(ids, prepared items, wanted classes)``: the float16 pixels
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


class ChunkExplainer:
    """Actor stage: loads the pinned explainer once, then explains chunk after chunk.

    ``prepare``: the keyword arguments of :func:`_read_and_prepare` when the actor reads and decodes its
    chunks itself (CPU actors); ``None`` when a decode stage before it did (GPU actors). Each chunk
    lands in ``output`` as one Parquet file (:data:`ptame.explanations.SCHEMA`), written atomically
    by the actor (a separate write stage would start a fresh Ray worker for many of its writes); with
    no ``output`` (a folder other nodes do not see) the file's bytes go back to the driver, which writes
    them. ``shipped``: the explainer as bytes (:func:`ptame.cluster.ship_explainer`), for actors on
    nodes that cannot load ``model_uri`` themselves.
    """

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str | None,
        topk: int,
        batch_size: int,
        use_gpu: bool,
        threads: int | None = None,
        maps: str = "pred",
        prepare: dict[str, Any] | None = None,
        output: str = "",
        shipped: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from ptame.registry import load_explainer

        if threads:
            torch.set_num_threads(threads)

        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("use_gpu was set but this actor sees no CUDA device")
        device = "cuda" if use_gpu else "cpu"
        if shipped is not None:  # never a registry lookup on a node without the registry's files
            from ptame.cluster import load_shipped

            loaded = load_shipped(shipped, device)
        else:
            if tracking_uri:
                import mlflow

                mlflow.set_tracking_uri(tracking_uri)
                mlflow.set_registry_uri(tracking_uri)
            loaded = load_explainer(model_uri, map_location=device)
        if loaded.model_uri != model_uri:
            raise RuntimeError(f"asked for {model_uri}, the registry gave {loaded.model_uri}")
        self.explainer = loaded.explainer
        self.model_uri = model_uri
        self.topk = topk
        self.batch_size = batch_size
        self.topk_maps = maps == "topk"
        self.prepare = prepare
        self.output = output

    def __call__(self, chunk: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ptame.classes import resolve_class
        from ptame.data import Prepared
        from ptame.explanations import explanations_table
        from ptame.records import explain_prepared

        if self.prepare is not None:
            ids, items, wanted = _read_and_prepare(chunk, **self.prepare)
        else:
            ids, items, wanted = _unpack_chunk(chunk, self.explainer.preprocessing)
        classes: list[int | None] = []
        for i, (item, want) in enumerate(zip(items, wanted)):
            try:
                classes.append(None if item.error is not None or want is None else resolve_class(want, self.explainer.class_names))
            except ValueError as e:
                items[i] = Prepared(None, item.width, item.height, None, str(e))
                classes.append(None)
        rows: list[dict[str, Any]] = []
        for i in range(0, len(items), self.batch_size):
            window = slice(i, i + self.batch_size)
            rows.extend(
                explain_prepared(
                    self.explainer, items[window], topk=self.topk, classes=classes[window], topk_maps=self.topk_maps
                )
            )
        table = explanations_table(ids, rows, self.model_uri)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        done = {"chunk": chunk["chunk"], "images": len(rows), "errors": sum(r["error"] is not None for r in rows)}
        if not self.output:
            return {**done, "table": sink.getvalue().to_pybytes()}
        fs, root = output_filesystem(self.output)
        write_atomically(fs, f"{root}/{chunk_file(chunk['chunk'])}", sink.getvalue().to_pybytes())
        return done


def _decode_memory(max_pixels: int, chunk_size: int, preprocessing: dict[str, Any], ray: Any) -> int:
    """Heap bytes a decode task may need: ~20 bytes per pixel of the largest image (RGB, float
    tensor, resize buffers) plus the chunk's float32 output twice; at most a quarter of the cluster's."""
    size = int(preprocessing["input_size"])
    need = 20 * max_pixels + 2 * chunk_size * 3 * size * size * 4
    available = int(ray.cluster_resources().get("memory", need * 4))
    return max(1, min(need, available // 4))


def _actor_layout(
    nodes: Sequence[dict[str, float]], concurrency: int | None, use_gpu: bool, chunks: int
) -> tuple[int, int]:
    """``(actors, torch threads each)`` for the alive nodes' resources and the ``chunks`` to explain.

    CPU actors decode their own chunks and reserve one CPU per thread: by default one actor per CPU
    with one thread (two one-thread processes explain ~1.2x faster than one with two threads); fewer
    actors share the CPUs as threads. GPU actors take a GPU and a CPU each, with CPUs left for the
    decoding that feeds them, and need few threads. Never more actors than chunks (one would idle).
    """
    cpus = [int(node.get("CPU", 0)) for node in nodes if node.get("CPU", 0) >= 1]
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    if use_gpu:
        if gpus == 0:
            raise ValueError("use_gpu was set but the Ray cluster has no GPU; start GPU nodes or drop --use-gpu")
        actors = gpus if concurrency is None else concurrency
        if actors > gpus:  # an actor that can never be placed would wait for a GPU forever
            raise ValueError(f"concurrency={actors} GPU explain actors need a GPU each; this cluster has {gpus}")
        if not 1 <= actors < sum(cpus):
            raise ValueError(
                f"concurrency={actors} GPU explain actors on {sum(cpus)} CPUs leaves no CPU to decode images; "
                f"use 1 to {sum(cpus) - 1} (the cluster needs at least 2 CPUs)"
            )
        actors = min(actors, chunks)
        return actors, 2 if sum(cpus) >= 4 * actors else 1
    actors = sum(cpus) if concurrency is None else concurrency
    if not 1 <= actors <= sum(cpus):
        raise ValueError(f"concurrency={actors} explain actors need a CPU each; this cluster has {sum(cpus)}")
    actors = min(actors, chunks)
    threads = max(1, min(min(cpus), sum(cpus) // actors))
    while threads > 1 and sum(c // threads for c in cpus) < actors:
        threads -= 1
    return actors, threads


def _progress_note(output: str) -> str:
    """``"N of M chunks written; rerun the same command to resume"`` from the output folder."""
    from ptame.explanations import read_manifest

    fs, root = output_filesystem(output)
    total = (read_manifest(output) or {}).get("num_chunks", "?")
    return f"{len(finished_chunks(fs, root))} of {total} chunks written; rerun the same command to resume"


# ---------------------------------------------------------------------------------- driver


def _check_classes(classes: int | str | None) -> None:
    """``classes`` is an index >= 0, -1 (the prediction), a column name, or ``None``."""
    if classes is None or isinstance(classes, str) and classes:
        return
    if not isinstance(classes, int) or isinstance(classes, bool):
        raise TypeError(f"classes must be a class index or a column name, got {classes!r}")
    if classes < -1:
        raise ValueError(f"classes must be a class index >= 0, -1 (the prediction) or a column name, got {classes}")


def _check_class_column(source: Any, column: str) -> None:
    """A per-row class needs a Parquet input whose every file has the ``column``."""
    import pyarrow.parquet as pq

    if source.kind != "parquet":
        raise ValueError(
            f"--classes {column!r} names a column, but the input is image files; give one class index for "
            "all images, or a Parquet input with that column"
        )
    for path in source.paths:
        with source.filesystem.open(path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if column not in names:
            raise ValueError(f"{path} has no class column {column!r} (columns: {names})")


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def explain_to_parquet(
    model: str,
    input: str,  # noqa: A002 - the CLI's name for it
    output: str,
    *,
    batch_size: int = 32,
    concurrency: int | None = None,
    topk: int = 5,
    use_gpu: bool = False,
    chunk_size: int | None = None,
    max_pixels: int | None = None,
    image_column: str = "image",
    id_column: str = "image_id",
    classes: int | str | None = None,
    view: str = "crop",
    maps: str = "pred",
    address: str | None = None,
    progress: bool = True,
    tracking_uri: str | None = None,
) -> ExplainSummary:
    """Explain every image of ``input`` into Parquet files under ``output``, exactly once.

    Rerunning the same call after a crash finishes the job without redoing finished chunks; a
    rerun of a finished job does nothing and says so. Another ``input`` (a grown folder) with the
    same model and settings adds only the images ``output`` lacks. Uses the running Ray instance, or
    starts one at ``address`` (default ``RAY_ADDRESS`` or a local Ray) and stops it at the end.

    Args:
        model: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or an ``Explainer.save`` directory.
        input: folder, glob, ``.txt`` list of paths, or Parquet with an image-bytes column (local or URI).
        output: directory (local or URI) for ``part-*.parquet`` and the job manifest.
        batch_size: images per forward pass in an actor.
        concurrency: explain actors (default: one per GPU with ``use_gpu``, else one per CPU).
        topk: classes kept in ``topk_classes``/``topk_scores`` per image.
        use_gpu: one GPU per explain actor.
        chunk_size: images per output file and unit of resumption (default: the job's, or 256).
        max_pixels: larger images are refused as decompression bombs, an error row (default: the
            job's, or :data:`ptame.data.DEFAULT_MAX_PIXELS`).
        image_column, id_column: columns of a Parquet input (ids default to ``<file>#<row>``).
        classes: the class every map explains (an index; ``-1``: the prediction), or the column of a Parquet
            input that holds each row's class (an index or a label; null and -1 rows, and the default,
            explain the prediction).
        view: ``"crop"``: the map covers the classifier's centre crop; ``"full"``: the whole image
            (letterboxed: longer side resized, padded with the mean; the map is cut to the image).
        maps: ``"pred"``: the map of that class only; ``"topk"``: also the maps of all ``topk_classes``
            (``topk_saliency``), from the same pass.
        address: Ray cluster to use when Ray is not initialised yet.
        progress: show a progress bar.
        tracking_uri: MLflow registry of a ``models:/`` model (default: ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db`` here); a SQLite file that does not exist is an error, never created.

    Returns:
        An :class:`ExplainSummary` of this run.

    Raises:
        ValueError: ``output`` holds another job (another model or setting) or foreign files.
        RuntimeError: the part files an unfinished addition was planned from have changed.
    """
    for name, value in (("model", model), ("input", input), ("output", output)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    _check_positive(batch_size=batch_size, concurrency=concurrency, topk=topk, chunk_size=chunk_size, max_pixels=max_pixels)
    _check_classes(classes)
    if maps not in MAPS:
        raise ValueError(f"maps must be one of {list(MAPS)}, got {maps!r}")
    from ptame.classes import PREDICTED, resolve_class
    from ptame.data import check_view
    from ptame.explanations import read_manifest
    from ptame.registry import load_explainer
    from ptame.sources import resolve_source

    check_view(view)
    classes = None if classes == PREDICTED else classes  # -1: the prediction, the same job as the default
    start = time.perf_counter()
    model_uri, tracking_uri = _pin_model(model, tracking_uri)
    source = resolve_source(input, image_column=image_column, id_column=id_column)
    # loaded once here: a broken model fails now, with its own message, not inside an actor
    explainer = load_explainer(model_uri).explainer
    if isinstance(classes, str):
        _check_class_column(source, classes)
    elif classes is not None:
        resolve_class(classes, explainer.class_names)  # a class the model lacks: refused before the manifest
    fs, root = output_filesystem(output)
    previous = read_manifest(output) or {}
    size = chunk_size or previous.get("chunk_size") or DEFAULT_CHUNK_SIZE
    max_pixels = max_pixels or previous.get("max_pixels") or _default_max_pixels()
    chunks, fingerprint, num_inputs = plan_chunks(source, size)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_uri": model_uri,
        "input": _absolute(input),
        "input_kind": source.kind,
        "image_column": image_column,
        "id_column": id_column,
        "num_inputs": num_inputs,
        "chunk_size": size,
        "num_chunks": len(chunks),
        "fingerprint": fingerprint,
        "topk": topk,
        "max_pixels": max_pixels,
        "classes": classes,
        "view": view,
        "maps": maps,
    }
    existing = check_output(fs, root, output, manifest)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    generation = {k: manifest[k] for k in ("input", "input_kind", "num_inputs", "fingerprint")}
    already = 0
    if existing is None:
        fs.makedirs(root, exist_ok=True)
        manifest |= {"created": now, "generations": [{**generation, "first_chunk": 0, "num_chunks": len(chunks), "started": now}]}
        write_atomically(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    elif (last := manifest_generations(existing)[-1])["fingerprint"] != fingerprint:
        chunks, already = start_addition(fs, root, output, source, size, existing, manifest, generation, now)
        if not chunks:
            return ExplainSummary(output, model_uri, 0, 0, time.perf_counter() - start, 0, 0, num_inputs, already)
    elif last["first_chunk"]:  # finishing an addition: the same chunks as when it started
        chunks, digest, already = plan_addition(source, size, last["first_chunk"], explained_ids(fs, root, last["first_chunk"]))
        if digest != last["digest"] or len(chunks) != last["num_chunks"]:
            raise RuntimeError(
                f"the explanations before {chunk_file(last['first_chunk'])} in {output!r} changed since the addition "
                f"of {last['input']!r} started (part files deleted or replaced?), so it cannot be finished exactly "
                "once; explain into a new --output."
            )
    done = finished_chunks(fs, root)
    pending = [c for c in chunks if c["chunk"] not in done]
    skipped = len(chunks) - len(pending)
    if not pending:
        logger.info("nothing to do: all %d chunks (%d inputs) in %s are done with %s", len(chunks), num_inputs, output, model_uri)
        return ExplainSummary(output, model_uri, 0, 0, time.perf_counter() - start, 0, skipped, num_inputs, already)
    if skipped:
        logger.info("resuming: %d of %d chunks already done, %d to go", skipped, len(chunks), len(pending))
    for name in filter(TEMPORARY.match, list_names(fs, root)):
        fs.rm(f"{root}/{name}")  # left by a killed run: never a finished chunk
    images, errors, written = _run_pipeline(
        pending, source, model_uri, tracking_uri, output, explainer.preprocessing.to_dict(),
        chunk_size=size, batch_size=batch_size, concurrency=concurrency, topk=topk, use_gpu=use_gpu,
        max_pixels=max_pixels, classes=classes, view=view, maps=maps, address=address, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    missing = len({c["chunk"] for c in chunks} - finished_chunks(fs, root))
    if missing:
        raise RuntimeError(f"{missing} chunks of {output} were not written; rerun the same command to finish them")
    summary = ExplainSummary(output, model_uri, images, errors, seconds, written, skipped, num_inputs, already)
    logger.info(
        "explained %d images (%d errors) in %.1f s, %.2f images/s, into %s with %s%s",
        images, errors, seconds, summary.images_per_s, output, model_uri,
        f" ({skipped} chunks were already done)" if skipped else "",
    )  # fmt: skip
    return summary




def _run_pipeline(
    pending: list[dict[str, Any]],
    source: Any,
    model_uri: str,
    tracking_uri: str | None,
    output: str,
    preprocessing: dict[str, Any],
    *,
    chunk_size: int,
    batch_size: int,
    concurrency: int | None,
    topk: int,
    use_gpu: bool,
    max_pixels: int,
    classes: int | str | None,
    view: str,
    maps: str,
    address: str | None,
    progress: bool,
) -> tuple[int, int, int]:
    """Build and stream the Ray Data pipeline over ``pending`` chunks: ``(images, errors, chunks)``."""
    import ray
    from tqdm.auto import tqdm

    from ptame.process import init_ray

    started = not ray.is_initialized()
    if started:
        # the design's rule: an explicit address, else RAY_ADDRESS, else a new local Ray (never
        # whichever cluster happens to run on this machine)
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        local = {"include_dashboard": False} if address == "local" else {}
        init_ray(address, **local)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        concurrency, threads = _actor_layout(nodes, concurrency, use_gpu, len(pending))
        logger.info("explaining %d chunks with %d %s actor(s), %d torch thread(s) each", len(pending), concurrency,
                    "GPU" if use_gpu else "CPU", threads)  # fmt: skip
        from ptame.cluster import driver_node, driver_only, multi_node, ship_explainer, stage_on_node

        fs, root = output_filesystem(output)
        read = {"filesystem": source.filesystem, "image_column": source.image_column, "id_column": source.id_column,
                "classes": classes}  # fmt: skip
        prepare = {**read, "preprocessing": preprocessing, "max_pixels": max_pixels, "view": view}
        ds = ray.data.from_items(pending, override_num_blocks=min(len(pending), 10_000))
        if driver_only(source.filesystem, source.paths[0]):  # read where the files are, explained anywhere
            logger.info("other nodes do not see %s: its files are read on this node and reach them through Ray", source.paths[0])
            ds = ds.map(_read_here, fn_kwargs=read, **stage_on_node(driver_node()))
        elif multi_node():
            prepare["driver"] = driver_node()
        write_here = driver_only(fs, f"{root}/{MANIFEST}")
        if use_gpu:
            ds = ds.map(
                _prepare_chunk,
                fn_kwargs=prepare,
                num_cpus=1,
                # room for the largest image a task accepts and its chunk; also keeps Ray Data from
                # fusing decoding into the explain actors (decoding on the CPUs must overlap the GPUs)
                memory=_decode_memory(max_pixels, chunk_size, preprocessing, ray),
            )
        ds = ds.map(
            ChunkExplainer,
            fn_constructor_kwargs={
                "model_uri": model_uri,
                "tracking_uri": tracking_uri,
                "topk": topk,
                "batch_size": batch_size,
                "use_gpu": use_gpu,
                "threads": threads,
                "maps": maps,
                "prepare": None if use_gpu else prepare,
                "output": "" if write_here else output,  # other nodes do not see it: chunks come back here
                "shipped": ship_explainer(model_uri, tracking_uri),
            },
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=1 if use_gpu else threads,
            num_gpus=1 if use_gpu else 0,
        )
        images = errors = written = 0
        total = sum(len(c["ids"]) if "ids" in c else len(c["rows"]) if "rows" in c else c["stop"] - c["start"] for c in pending)
        with tqdm(total=total, unit="img", desc="explain", disable=None if progress else True) as bar:
            for row in ds.iter_rows():
                if row.get("table") is not None:
                    write_atomically(fs, f"{root}/{chunk_file(row['chunk'])}", row["table"])
                images += row["images"]
                errors += row["errors"]
                written += 1
                bar.update(row["images"])
                bar.set_postfix(errors=errors, refresh=False)
        return images, errors, written
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: say how far the job got and how to finish it
        if started:
            ray.shutdown()  # first, so that no chunk lands after the count
        e.add_note(_progress_note(output))
        raise
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Explain every image of INPUT with a P-TAME explainer into Parquet files under DIR (one row per "
        "image; bad inputs become rows with `error` set). Rerun the same command after a crash to finish "
        "the job: finished chunks are kept, nothing is duplicated. Run it again with a grown or another INPUT "
        "into the same DIR (same model and settings) to explain only the images DIR lacks; rows of inputs "
        "removed since are kept."
    )
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, or a directory saved by Explainer.save")
    parser.add_argument("--input", required=True, help="folder (recursive), glob, .txt list of paths, or Parquet with an image-bytes column; local or s3://, gs://, ...")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (local or URI) for part-*.parquet and the job manifest; an existing one made with the same model and settings gets only the images it lacks")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=None, help="explain actors (default: one per CPU, each decoding its own images with one torch thread; fewer actors get more threads each; with --use-gpu one per GPU, fed by decoding tasks on the CPUs)")
    parser.add_argument("--topk", type=int, default=5, help="top classes recorded per image (default: %(default)s)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per explain actor")
    parser.add_argument("--chunk-size", type=int, default=None, help=f"images per output file and unit of resumption (default: the job's, else {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--max-pixels", type=int, default=None, help="larger images are refused as decompression bombs, an error row (default: the job's, else 64 megapixels)")
    parser.add_argument("--image-column", default="image", help="image-bytes column of a Parquet input (default: %(default)s)")
    parser.add_argument("--id-column", default="image_id", help="id column of a Parquet input; without it ids are <file>#<row> (default: %(default)s)")
    parser.add_argument("--classes", type=_class_option, default=None, metavar="INDEX|COLUMN", help="class the maps explain: an index for every image (-1: the predicted class), or the column of a Parquet input holding each row's class index or label (null or -1: the prediction) (default: the predicted class)")
    parser.add_argument("--view", choices=VIEWS, default="crop", help="what each map covers: 'crop', the centre square the classifier sees (crop_box says where); 'full', the whole image, letterboxed (longer side resized, padded with the mean, the map cut to the image: its shape follows the aspect ratio, crop_box is the whole image). A rerun must keep the job's view (default: %(default)s)")
    parser.add_argument("--maps", choices=MAPS, default="pred", help="pred: the map of the explained class (saliency); topk: also the maps of all --topk classes in topk_saliency, from the same pass (default: %(default)s)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI of a models:/ model (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _class_option(text: str) -> int | str:
    """``--classes``: an integer is a class index (``-1``: the prediction), anything else a column name."""
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def main(args: argparse.Namespace) -> int:
    explain_to_parquet(
        args.model, args.input, args.output,
        batch_size=args.batch_size, concurrency=args.concurrency, topk=args.topk, use_gpu=args.use_gpu,
        chunk_size=args.chunk_size, max_pixels=args.max_pixels, image_column=args.image_column,
        id_column=args.id_column, classes=args.classes, view=args.view, maps=args.maps, address=args.address,
        progress=not args.no_progress,
        tracking_uri=args.tracking_uri,
    )  # fmt: skip
    return 0
