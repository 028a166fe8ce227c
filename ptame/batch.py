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

This module is the job's driver: it checks and pins the job's settings (:class:`ExplainJob`), plans
its chunks and runs them. Reading and preparing a chunk lives in :mod:`ptame.chunks`, the explain
actor in :mod:`ptame.chunk_explainer`, the Ray Data pipeline in :mod:`ptame.pipeline`; the command
line in :mod:`ptame.commands.explain`. Exactly once and additions to an output folder (the chunk
plans, the manifest, generations) live in :mod:`ptame.jobs`: a rerun skips the chunks whose file
exists, and another model or other settings are refused rather than mixed into the same output.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from ptame.explanations import MANIFEST, output_filesystem
from ptame.sources import absolute
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
    "MAPS",
    "ExplainJob",
    "ExplainSummary",
    "explain_to_parquet",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256
#: ``--maps``: the map of the explained class only, or also the maps of all top-k classes
MAPS = ("pred", "topk")


@dataclass(frozen=True)
class ExplainJob:
    """The settings of one bulk-explain job: what its manifest pins and what its actors need.

    The arguments of :func:`explain_to_parquet`, as asked; once pinned (:func:`_pin_job`) ``model`` is
    ``models:/<name>/<version>`` or an absolute directory, ``tracking_uri`` the registry it was resolved
    in, ``chunk_size`` and ``max_pixels`` numbers, and ``classes`` ``None`` for the prediction.
    """

    model: str
    input: str
    output: str
    batch_size: int
    concurrency: int | None
    topk: int
    use_gpu: bool
    chunk_size: int | None
    max_pixels: int | None
    image_column: str
    id_column: str
    classes: int | str | None
    view: str
    maps: str
    address: str | None
    progress: bool
    tracking_uri: str | None


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
    job = ExplainJob(
        model=model, input=input, output=output, batch_size=batch_size, concurrency=concurrency, topk=topk,
        use_gpu=use_gpu, chunk_size=chunk_size, max_pixels=max_pixels, image_column=image_column,
        id_column=id_column, classes=classes, view=view, maps=maps, address=address, progress=progress,
        tracking_uri=tracking_uri,
    )  # fmt: skip
    _check_job(job)
    start = time.perf_counter()
    job, source, explainer = _pin_job(job)
    chunks, num_inputs, already = _plan_job(job, source)
    if chunks is None:  # an addition with nothing new
        return ExplainSummary(output, job.model, 0, 0, time.perf_counter() - start, 0, 0, num_inputs, already)
    pending = _pending_chunks(job, chunks, num_inputs)
    skipped = len(chunks) - len(pending)
    if not pending:
        return ExplainSummary(output, job.model, 0, 0, time.perf_counter() - start, 0, skipped, num_inputs, already)
    from ptame.pipeline import run_pipeline

    images, errors, written = run_pipeline(job, pending, source, explainer.preprocessing.to_dict())
    seconds = time.perf_counter() - start
    _check_written(job.output, chunks)
    summary = ExplainSummary(output, job.model, images, errors, seconds, written, skipped, num_inputs, already)
    logger.info(
        "explained %d images (%d errors) in %.1f s, %.2f images/s, into %s with %s%s",
        images, errors, seconds, summary.images_per_s, output, job.model,
        f" ({skipped} chunks were already done)" if skipped else "",
    )  # fmt: skip
    return summary


# ---------------------------------------------------------------------------------- steps


def _check_job(job: ExplainJob) -> None:
    """Refuse settings of the wrong type or value before anything is read."""
    for name in ("model", "input", "output"):
        value = getattr(job, name)
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    _check_positive(batch_size=job.batch_size, concurrency=job.concurrency, topk=job.topk, chunk_size=job.chunk_size,
                    max_pixels=job.max_pixels)  # fmt: skip
    _check_classes(job.classes)
    if job.maps not in MAPS:
        raise ValueError(f"maps must be one of {list(MAPS)}, got {job.maps!r}")
    from ptame.data import check_view

    check_view(job.view)


def _pin_job(job: ExplainJob) -> tuple[ExplainJob, Any, Any]:
    """``(job, input source, explainer)``: the job with its model pinned, its sizes filled (given, else
    the output's job's, else the defaults) and its class checked against the model and the input."""
    from ptame.explanations import read_manifest
    from ptame.classes import PREDICTED, resolve_class
    from ptame.registry import load_explainer
    from ptame.sources import resolve_source

    classes = None if job.classes == PREDICTED else job.classes  # -1: the prediction, the same job as the default
    model_uri, tracking_uri = _pin_model(job.model, job.tracking_uri)
    source = resolve_source(job.input, image_column=job.image_column, id_column=job.id_column)
    # loaded once here: a broken model fails now, with its own message, not inside an actor
    explainer = load_explainer(model_uri).explainer
    if isinstance(classes, str):
        _check_class_column(source, classes)
    elif classes is not None:
        resolve_class(classes, explainer.class_names)  # a class the model lacks: refused before the manifest
    previous = read_manifest(job.output) or {}
    job = replace(
        job, model=model_uri, tracking_uri=tracking_uri, classes=classes,
        chunk_size=job.chunk_size or previous.get("chunk_size") or DEFAULT_CHUNK_SIZE,
        max_pixels=job.max_pixels or previous.get("max_pixels") or _default_max_pixels(),
    )  # fmt: skip
    return job, source, explainer


def _manifest(job: ExplainJob, source: Any, num_inputs: int, num_chunks: int, fingerprint: str) -> dict[str, Any]:
    """The manifest of a pinned job over ``source``: the model, the input and the settings its rows depend on."""
    return {
        "format": MANIFEST_FORMAT,
        "model_uri": job.model,
        "input": absolute(job.input),
        "input_kind": source.kind,
        "image_column": job.image_column,
        "id_column": job.id_column,
        "num_inputs": num_inputs,
        "chunk_size": job.chunk_size,
        "num_chunks": num_chunks,
        "fingerprint": fingerprint,
        "topk": job.topk,
        "max_pixels": job.max_pixels,
        "classes": job.classes,
        "view": job.view,
        "maps": job.maps,
    }


def _plan_job(job: ExplainJob, source: Any) -> tuple[list[dict[str, Any]] | None, int, int]:
    """``(chunks of this run, number of inputs, inputs already explained)``, recorded in the manifest
    before any chunk is written: a new job, a rerun, an addition started or an addition finished.
    ``chunks`` is ``None`` when an addition finds nothing new.

    Raises:
        ValueError: ``output`` holds another job (another model or setting) or foreign files.
        RuntimeError: the part files an unfinished addition was planned from have changed.
    """
    fs, root = output_filesystem(job.output)
    chunks, fingerprint, num_inputs = plan_chunks(source, job.chunk_size)
    manifest = _manifest(job, source, num_inputs, len(chunks), fingerprint)
    existing = check_output(fs, root, job.output, manifest)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    generation = {k: manifest[k] for k in ("input", "input_kind", "num_inputs", "fingerprint")}
    already = 0
    if existing is None:
        fs.makedirs(root, exist_ok=True)
        manifest |= {"created": now, "generations": [{**generation, "first_chunk": 0, "num_chunks": len(chunks), "started": now}]}
        write_atomically(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    elif (last := manifest_generations(existing)[-1])["fingerprint"] != fingerprint:
        chunks, already = start_addition(fs, root, job.output, source, job.chunk_size, existing, manifest, generation, now)
        if not chunks:
            return None, num_inputs, already
    elif last["first_chunk"]:  # finishing an addition: the same chunks as when it started
        chunks, digest, already = plan_addition(source, job.chunk_size, last["first_chunk"], explained_ids(fs, root, last["first_chunk"]))
        if digest != last["digest"] or len(chunks) != last["num_chunks"]:
            raise RuntimeError(
                f"the explanations before {chunk_file(last['first_chunk'])} in {job.output!r} changed since the addition "
                f"of {last['input']!r} started (part files deleted or replaced?), so it cannot be finished exactly "
                "once; explain into a new --output."
            )
    return chunks, num_inputs, already


def _pending_chunks(job: ExplainJob, chunks: list[dict[str, Any]], num_inputs: int) -> list[dict[str, Any]]:
    """The ``chunks`` whose file does not exist yet; before they run, the temporaries of a killed run are removed."""
    fs, root = output_filesystem(job.output)
    done = finished_chunks(fs, root)
    pending = [c for c in chunks if c["chunk"] not in done]
    skipped = len(chunks) - len(pending)
    if not pending:
        logger.info("nothing to do: all %d chunks (%d inputs) in %s are done with %s", len(chunks), num_inputs, job.output, job.model)
        return pending
    if skipped:
        logger.info("resuming: %d of %d chunks already done, %d to go", skipped, len(chunks), len(pending))
    for name in filter(TEMPORARY.match, list_names(fs, root)):
        fs.rm(f"{root}/{name}")  # left by a killed run: never a finished chunk
    return pending


def _check_written(output: str, chunks: list[dict[str, Any]]) -> None:
    """Every one of this run's ``chunks`` has its file in ``output``."""
    fs, root = output_filesystem(output)
    missing = len({c["chunk"] for c in chunks} - finished_chunks(fs, root))
    if missing:
        raise RuntimeError(f"{missing} chunks of {output} were not written; rerun the same command to finish them")


# ---------------------------------------------------------------------------------- checks


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


def _default_max_pixels() -> int:
    from ptame.data import DEFAULT_MAX_PIXELS  # imports torch: only when a job starts

    return DEFAULT_MAX_PIXELS


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
