"""An output folder of ``ptame explain``, kept exactly once: chunk plans, the job manifest, additions.

Inputs are sorted by image id and cut into fixed chunks; a chunk is written to a hidden temporary
file and renamed to ``part-<chunk>.parquet`` only once complete, so a file under its final name
always holds a whole chunk, and a rerun skips exactly the chunks whose file exists. The manifest
pins the model version, the input and the settings; each run that adds inputs is a *generation*
recorded in it before any of its chunks is written, so a killed addition resumes exactly once.
No Ray here: :mod:`ptame.batch` runs these plans through :mod:`ptame.pipeline`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from typing import Any

from ptame.explanations import MANIFEST

__all__ = [
    "MANIFEST_FORMAT",
    "TEMPORARY",
    "check_output",
    "chunk_file",
    "explained_ids",
    "finished_chunks",
    "list_names",
    "manifest_generations",
    "plan_addition",
    "plan_chunks",
    "start_addition",
    "write_atomically",
]

logger = logging.getLogger("ptame.batch")  # one logger for the whole ``ptame explain`` job


MANIFEST_FORMAT = 1
_PART = re.compile(r"^part-(\d+)\.parquet$")
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # see write_atomically
#: settings that change the rows or their files: a rerun must use the same ones
_SETTINGS = ("chunk_size", "topk", "max_pixels", "image_column", "id_column", "classes", "view", "maps")
#: values of settings that manifests older than the setting were written with
_SETTING_DEFAULTS: dict[str, Any] = {"view": "crop", "maps": "pred"}


def chunk_file(index: int) -> str:
    """Name of the data file of chunk ``index``."""
    return f"part-{index:08d}.parquet"


def _file_pairs(source: Any) -> dict[str, str]:
    """``{image_id: path}`` of a files source, deduplicated (the first path of an id wins)."""
    pairs: dict[str, str] = {}
    for image_id, path in zip(source.ids, source.paths):
        if image_id in pairs:
            logger.warning("input %r is listed more than once; explaining it once", image_id)
            continue
        pairs[image_id] = path
    return pairs


def _plan_files(source: Any, chunk_size: int) -> tuple[list[dict[str, Any]], list[str]]:
    pairs = _file_pairs(source)
    ids = sorted(pairs)
    chunks = [
        {"chunk": i // chunk_size, "ids": ids[i : i + chunk_size], "paths": [pairs[k] for k in ids[i : i + chunk_size]]}
        for i in range(0, len(ids), chunk_size)
    ]
    return chunks, ids


def _plan_parquet(source: Any, chunk_size: int) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow.parquet as pq

    chunks: list[dict[str, Any]] = []
    keys: list[str] = []
    for path, file_id in sorted(zip(source.paths, source.ids)):
        with source.filesystem.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names, rows = pf.schema_arrow.names, pf.metadata.num_rows
        if source.image_column not in names:
            raise ValueError(
                f"{path} has no image column {source.image_column!r} (columns: {names}); pass --image-column"
            )
        keys.append(f"{file_id}\t{rows}")
        for start in range(0, rows, chunk_size):
            chunks.append({"chunk": len(chunks), "file": path, "start": start, "stop": min(start + chunk_size, rows)})
    return chunks, keys


def plan_chunks(source: Any, chunk_size: int) -> tuple[list[dict[str, Any]], str, int]:
    """Cut ``source`` into deterministic chunks.

    Files are sorted by image id and deduplicated; Parquet inputs are cut into row ranges of each
    file (sorted by path). The fingerprint names the input and the chunking, so a rerun can tell
    whether its chunk ``i`` is the same as the one already written.

    Returns:
        ``(chunks, fingerprint, number of inputs)``; each chunk is a dict with ``chunk`` (its index)
        and either ``ids``/``paths`` or ``file``/``start``/``stop``.
    """
    plan = _plan_files if source.kind == "files" else _plan_parquet
    chunks, keys = plan(source, chunk_size)
    digest = hashlib.sha256(f"{source.kind}\n{chunk_size}\n".encode())
    for key in keys:
        digest.update(key.encode() + b"\n")
    if source.kind == "files":
        count = len(keys)
    else:
        count = sum(c["stop"] - c["start"] for c in chunks)
    return chunks, digest.hexdigest(), count


def _parquet_ids(source: Any, path: str) -> list[str]:
    """Image ids of one Parquet input file, read from its id column only (else ``<file>#<row>``)."""
    import pyarrow.parquet as pq

    with source.filesystem.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if source.id_column in pf.schema_arrow.names:
            return [str(v) for v in pf.read(columns=[source.id_column]).column(0).to_pylist()]
        name = path.rsplit("/", 1)[-1]
        return [f"{name}#{row}" for row in range(pf.metadata.num_rows)]


def plan_addition(
    source: Any, chunk_size: int, first_chunk: int, explained: set[str]
) -> tuple[list[dict[str, Any]], str, int]:
    """Chunks, numbered from ``first_chunk``, of the inputs whose id is not in ``explained``.

    Files are sorted by image id; Parquet rows stay in file order, a chunk within one file. An id
    listed twice is planned once.

    Returns:
        ``(chunks, digest of the planned ids, number of inputs already in explained)``.
    """
    digest = hashlib.sha256(f"{source.kind}\n{chunk_size}\n".encode())
    planned: set[str] = set()
    present: set[str] = set()  # inputs already explained
    chunks: list[dict[str, Any]] = []
    if source.kind == "files":
        pairs = _file_pairs(source)
        present = {k for k in pairs if k in explained}
        ids = sorted(k for k in pairs if k not in explained)
        for i in range(0, len(ids), chunk_size):
            part = ids[i : i + chunk_size]
            chunks.append({"chunk": first_chunk + len(chunks), "ids": part, "paths": [pairs[k] for k in part]})
        planned.update(ids)
    else:
        for path, _ in sorted(zip(source.paths, source.ids)):
            rows = []
            for row, image_id in enumerate(_parquet_ids(source, path)):
                if image_id in explained:
                    present.add(image_id)
                elif image_id not in planned:
                    planned.add(image_id)
                    rows.append(row)
                    digest.update(f"{path}\t{row}\n".encode())
            for i in range(0, len(rows), chunk_size):
                chunks.append({"chunk": first_chunk + len(chunks), "file": path, "rows": rows[i : i + chunk_size]})
    for image_id in sorted(planned):
        digest.update(image_id.encode() + b"\n")
    return chunks, digest.hexdigest(), len(present)


def write_atomically(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to a hidden temporary beside ``path``, then rename it into place."""
    directory, name = path.rsplit("/", 1)
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open(temporary, "wb") as f:
        f.write(data)
    fs.mv(temporary, path)


def list_names(fs: Any, root: str) -> list[str]:
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.isdir(root) else []


def finished_chunks(fs: Any, root: str) -> set[int]:
    return {int(m.group(1)) for m in map(_PART.match, list_names(fs, root)) if m}


def explained_ids(fs: Any, root: str, below: int | None = None) -> set[str]:
    """Image ids in the part files of ``root`` (those of chunks before ``below``); only that column is read."""
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    def read(name: str) -> list[str]:
        with fs.open(f"{root}/{name}", "rb") as f:
            return pq.ParquetFile(f).read(columns=["image_id"]).column(0).to_pylist()

    names = [chunk_file(i) for i in sorted(finished_chunks(fs, root)) if below is None or i < below]
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores answer slowly, one file at a time
        return {image_id for ids in pool.map(read, names) for image_id in ids}


def manifest_generations(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs recorded in a manifest; one written before additions existed is one run from chunk 0."""
    if "generations" in manifest:
        return list(manifest["generations"])
    keys = ("input", "input_kind", "num_inputs", "num_chunks", "fingerprint")
    return [{"first_chunk": 0, **{k: manifest.get(k) for k in keys}}]


def check_output(fs: Any, root: str, output: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Compare the planned job's model and settings with those of the job already in ``output``; refuse a mismatch.

    Returns:
        The existing manifest, or ``None`` when ``output`` is new or empty.
    """
    from ptame.explanations import read_manifest

    existing = read_manifest(output)
    if existing is None:
        if any(not TEMPORARY.match(name) for name in list_names(fs, root)):
            raise ValueError(
                f"output {output!r} is not empty and holds no {MANIFEST}: it was not written by `ptame explain`. "
                "Choose an empty or new --output directory."
            )
        return None
    if existing.get("model_uri") != manifest["model_uri"]:
        raise ValueError(
            f"output {output!r} already holds explanations made by {existing.get('model_uri')}, not "
            f"{manifest['model_uri']}; results of two models are never mixed. Choose another --output "
            f"(or pass --model {existing.get('model_uri')} to finish or add to that job)."
        )
    for key in _SETTINGS:
        if existing.get(key, _SETTING_DEFAULTS.get(key)) != manifest[key]:
            raise ValueError(
                f"output {output!r} was written with {key}={existing.get(key, _SETTING_DEFAULTS.get(key))!r}, "
                f"this run asks for {manifest[key]!r}; rerun with the same setting or choose another --output."
            )
    return existing


def start_addition(
    fs: Any,
    root: str,
    output: str,
    source: Any,
    chunk_size: int,
    existing: dict[str, Any],
    manifest: dict[str, Any],
    generation: dict[str, Any],
    now: str,
) -> tuple[list[dict[str, Any]], int]:
    """Plan the inputs that ``output`` lacks and record them as a new generation before any is written.

    Returns:
        ``(chunks, number of inputs already explained)``; no chunks when nothing is new.
    """
    generations = manifest_generations(existing)
    last = generations[-1]
    explained = explained_ids(fs, root)
    done = finished_chunks(fs, root)
    first = max([last["first_chunk"] + (last["num_chunks"] or 0), *(i + 1 for i in done)])
    unfinished = set(range(last["first_chunk"], last["first_chunk"] + (last["num_chunks"] or 0))) - done
    if unfinished:
        logger.warning(
            "the last run into %s (input %s) left %d of its chunks unwritten; it is not resumed, its "
            "images that %s still holds are explained now",
            output, last["input"], len(unfinished), manifest["input"],
        )  # fmt: skip
    chunks, digest, already = plan_addition(source, chunk_size, first, explained)
    new = sum(len(c["ids"]) if "ids" in c else len(c["rows"]) for c in chunks)
    gone = len(explained) - already
    if not chunks:
        logger.info("nothing new: all %d inputs of %s are already explained in %s", already, manifest["input"], output)
        return [], already
    logger.info(
        "%d images already explained in %s, explaining %d new%s", already, output, new,
        f" ({gone} explained images are no longer in the input; their rows are kept)" if gone > 0 else "",
    )  # fmt: skip
    generations.append(
        {**generation, "first_chunk": first, "num_chunks": len(chunks), "num_new": new, "digest": digest, "started": now}
    )
    updated = {**existing, **{k: manifest[k] for k in generation}, "num_chunks": first + len(chunks), "generations": generations}
    write_atomically(fs, f"{root}/{MANIFEST}", json.dumps(updated, indent=2).encode())  # before any chunk of it
    return chunks, already
