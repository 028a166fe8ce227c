"""Where images come from: a folder (recursive), a glob, a text file of paths, or a Parquet dataset.

Paths may be local or any URI fsspec/pyarrow read (``s3://``, ``gs://``, ``file://``...). Every
file found is an input, image or not: a non-image file becomes an error row downstream, never a
silent skip. Image ids are stable (relative path for folders, the path as listed otherwise), so a
rerun of a job recognises work already done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ImageSource", "absolute", "iter_image_bytes", "resolve_source"]

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")


def absolute(spec: str) -> str:
    """A local path made absolute (``~`` expanded), so that it means the same from any working directory; a URI as is."""
    import os

    return spec if "://" in spec else os.path.abspath(os.path.expanduser(spec))


@dataclass(frozen=True)
class ImageSource:
    """A resolved input: image files (``ids[i]`` names ``paths[i]``) or Parquet files."""

    kind: Literal["files", "parquet"]
    paths: list[str]
    ids: list[str]
    filesystem: Any  # fsspec.AbstractFileSystem
    image_column: str = "image"
    id_column: str = "image_id"

    def __len__(self) -> int:
        return len(self.paths)

    def pyarrow_filesystem(self) -> Any:
        """The same filesystem as a ``pyarrow.fs.FileSystem`` (for Ray Data and pyarrow readers)."""
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

        if _is_local(self.filesystem):
            return LocalFileSystem()
        return PyFileSystem(FSSpecHandler(self.filesystem))


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _visible(path: str) -> bool:
    return not any(part.startswith(".") for part in path.split("/") if part)


def resolve_source(spec: str, image_column: str = "image", id_column: str = "image_id") -> ImageSource:
    """Resolve ``spec`` (folder, glob, ``.txt`` list of paths, Parquet file or folder of them).

    Raises:
        FileNotFoundError: nothing exists at ``spec`` or it holds no files.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(spec)
    if any(ch in root for ch in "*?["):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        return _files_or_parquet(paths, list(paths), fs, spec, image_column, id_column)
    if not fs.exists(root):
        raise FileNotFoundError(f"input {spec!r} does not exist")
    if fs.isdir(root):
        base = root.rstrip("/") + "/"
        found = sorted(p for p in fs.find(root) if _visible(p[len(base):]))
        ids = [p[len(base):] for p in found]
        return _files_or_parquet(found, ids, fs, spec, image_column, id_column)
    if root.endswith(".txt"):
        with fs.open(root, "rt") as f:
            listed = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not listed:
            raise FileNotFoundError(f"the list {spec!r} names no files")
        return ImageSource("files", listed, list(listed), fs, image_column, id_column)
    return _files_or_parquet([root], [root.rsplit("/", 1)[-1]], fs, spec, image_column, id_column)


def _files_or_parquet(
    paths: list[str], ids: list[str], fs: Any, spec: str, image_column: str, id_column: str
) -> ImageSource:
    if not paths:
        raise FileNotFoundError(f"input {spec!r} holds no files")
    if all(p.endswith(PARQUET_SUFFIXES) for p in paths):
        return ImageSource("parquet", paths, ids, fs, image_column, id_column)
    return ImageSource("files", paths, ids, fs, image_column, id_column)


def iter_image_bytes(source: ImageSource) -> Iterator[tuple[str, bytes | None, str | None]]:
    """Stream ``(image_id, data, error)`` from ``source``; unreadable inputs give ``error``."""
    if source.kind == "files":
        for image_id, path in zip(source.ids, source.paths):
            try:
                with source.filesystem.open(path, "rb") as f:
                    yield image_id, f.read(), None
            except OSError as e:
                yield image_id, None, f"cannot read {path}: {e}"
        return
    import pyarrow.parquet as pq

    for path in source.paths:
        with source.filesystem.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if source.image_column not in names:
                raise ValueError(f"{path} has no column {source.image_column!r} (columns: {names}); pass image_column")
            columns = [source.image_column] + ([source.id_column] if source.id_column in names else [])
            row = 0
            for batch in pf.iter_batches(columns=columns, batch_size=256):
                data = batch.column(source.image_column).to_pylist()
                ids = (
                    batch.column(source.id_column).to_pylist()
                    if source.id_column in names
                    else [f"{path.rsplit('/', 1)[-1]}#{row + i}" for i in range(len(data))]
                )
                row += len(data)
                for image_id, blob in zip(ids, data):
                    yield str(image_id), blob, None if blob else "empty image bytes"
