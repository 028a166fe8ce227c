"""Ray clusters whose nodes share no disk: what lives on the driver reaches workers through Ray, or
the command refuses at start.

A local path is *shared* when every alive node sees the same file there (same size and
modification time; an NFS mount at the same place): such paths are read and written where the
work runs, as on one machine. Anything else on the driver's disk travels through Ray: a saved
explainer as the bytes of its files (:func:`ship_explainer`), inputs read by tasks pinned to the
driver's node (:func:`stage_on_node`), outputs returned to the driver to write. Where that cannot work
(Ray Train's checkpoints), :func:`require_shared` refuses with one line naming the path.
URIs (``s3://``, ``gs://``, ...) reach every node and are never checked.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "driver_node",
    "driver_only",
    "is_uri",
    "load_shipped",
    "multi_node",
    "nodes_missing",
    "on_node",
    "read_parquet_here",
    "refusal",
    "require_shared",
    "reread_on_driver",
    "ship_explainer",
    "stage_on_node",
]

logger = logging.getLogger(__name__)

#: how long a check on the other nodes may take (a node that cannot schedule a task is dead or full)
PROBE_TIMEOUT_S = 60.0


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``: storage every node reaches (``file://`` is this machine's disk)."""
    return "://" in path and not path.startswith("file://")


def _alive_nodes() -> list[str]:
    """Ids of the alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [node["NodeID"] for node in ray.nodes() if node.get("Alive")]


def multi_node() -> bool:
    """Whether this process is connected to a Ray cluster of more than one alive node."""
    import ray

    return ray.is_initialized() and len(_alive_nodes()) > 1


def driver_node() -> str:
    """The id of the Ray node this process (the driver) runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def on_node(node_id: str) -> dict[str, Any]:
    """Ray remote options that run a task or actor on ``node_id`` and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def stage_on_node(node_id: str, tasks: int = 2) -> dict[str, Any]:
    """Ray Data ``map``/``map_batches`` options: at most ``tasks`` tasks at once, taking no CPU, on ``node_id`` only."""
    import inspect

    import ray.data

    params = inspect.signature(ray.data.Dataset.map).parameters
    pool = getattr(ray.data, "TaskPoolStrategy", None)
    if pool is not None and "size" in inspect.signature(pool).parameters:
        limit: dict[str, Any] = {"compute": pool(size=tasks)}
    else:  # Ray < 2.51
        limit = {"concurrency": tasks}
    if "label_selector" in params:  # every node carries its id as a label; the strategy is deprecated here
        return {"num_cpus": 0, "label_selector": {"ray.io/node-id": node_id}, **limit}
    return {"num_cpus": 0, **on_node(node_id), **limit}


def _read_parquet_files(batch: Any, columns: list[str]) -> Any:
    """The ``columns`` of the Parquet files named in the ``path`` column of ``batch`` (a ``pyarrow.Table``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path, columns=columns) for path in batch["path"].to_pylist()])


def read_parquet_here(paths: list[str], columns: list[str]) -> Any:
    """A Ray Data dataset of the ``columns`` of local Parquet files, read on this node (the driver's,
    which has them) and used anywhere: one block per file."""
    import ray.data

    items = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    return items.map_batches(_read_parquet_files, fn_kwargs={"columns": columns}, batch_size=1,
                             batch_format="pyarrow", **stage_on_node(driver_node()))  # fmt: skip


def _signature(path: str) -> tuple[int, int, bool] | None:
    """``(size, mtime_ns, is_dir)`` of ``path`` on the node this runs on; ``None`` if it cannot see it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, os.path.isdir(path)


def nodes_missing(path: str) -> list[str]:
    """The alive nodes other than the driver's that do not see ``path`` as the driver does (``[]``
    for a URI, on one node, or without Ray)."""
    import ray

    if is_uri(path) or not multi_node():
        return []
    here = _signature(path)
    me = driver_node()
    others = [n for n in _alive_nodes() if n != me]
    probe = ray.remote(num_cpus=0, max_retries=0)(_signature)
    seen = ray.get([probe.options(**on_node(n)).remote(path) for n in others], timeout=PROBE_TIMEOUT_S)
    return [n for n, sig in zip(others, seen) if here is None or sig != here]


def refusal(what: str, path: str, why: str) -> str:
    """The one-line refusal for a path on the driver's disk that a multi-node job cannot use."""
    return (
        f"{what} {path!r} is on this machine's disk, which other nodes of the Ray cluster do not see, and {why}: "
        "put it on storage every node reaches (s3://..., gs://..., or an NFS path mounted at the same place "
        "on every node) and pass that"
    )


def require_shared(what: str, path: str, why: str) -> None:
    """Refuse a local directory ``path`` that some node of a multi-node cluster does not see.

    Creates ``path`` and a probe file in it for the check; the probe is removed again.

    Raises:
        ValueError: ``path`` is local and not shared by every alive node (the message says ``why`` it must be).
    """
    if is_uri(path) or not multi_node():
        return
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".ptame-shared-{uuid.uuid4().hex}")
    Path(probe).write_bytes(b"")
    try:
        missing = nodes_missing(probe)
    finally:
        os.remove(probe)
    if missing:
        raise ValueError(refusal(what, path, why))


# ----------------------------------------------------------------------- explainers as bytes


def _tar(directory: Path) -> bytes:
    """The files of ``directory`` as an uncompressed tar archive (safetensors do not compress)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
    return buf.getvalue()


def _comes_from_this_disk(model: str, tracking_uri: str | None) -> bool:
    """A saved directory, or a version in a SQLite / ``file:`` registry: files only the driver may have."""
    if not model.startswith("models:/"):
        return True
    uri = tracking_uri or ""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def ship_explainer(model: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The explainer ``model`` as bytes for workers on other nodes (:func:`load_shipped`), or ``None``
    when every worker can load it itself (one node, or a registry server every node reaches).

    ``model``: a saved directory or a pinned ``models:/`` URI, read with the registry already
    connected to ``tracking_uri``.
    """
    if not multi_node() or not _comes_from_this_disk(model, tracking_uri):
        return None
    from ptame.registry import explainer_files

    directory, origin = explainer_files(model)
    files = _tar(Path(directory))
    logger.info("the explainer %s reaches the other nodes through Ray (%d KB)", origin["model_uri"], len(files) // 1024)
    return {"files": files, **origin}


def load_shipped(shipped: dict[str, Any], map_location: str = "cpu") -> Any:
    """The :class:`ptame.registry.LoadedExplainer` of :func:`ship_explainer`'s bytes, unpacked in a
    temporary directory of this node (removed once loaded)."""
    from ptame.explainer import Explainer
    from ptame.registry import LoadedExplainer

    origin = {k: v for k, v in shipped.items() if k != "files"}
    with tempfile.TemporaryDirectory(prefix="ptame-explainer-") as d:
        with tarfile.open(fileobj=io.BytesIO(shipped["files"]), mode="r") as tar:
            tar.extractall(d, filter="data")
        return LoadedExplainer(Explainer.load(d, map_location), **origin)


# ----------------------------------------------------------------------------- bulk inputs


def driver_only(filesystem: Any, path: str) -> bool:
    """Whether ``path`` of the fsspec ``filesystem`` is on the driver's disk and some node does not see it."""
    from ptame.sources import _is_local

    return _is_local(filesystem) and bool(nodes_missing(path))


def _read_files(paths: list[str], ids: list[str], filesystem: Any) -> list[tuple[str, bytes | None, str | None]]:
    """:func:`ptame.sources.iter_image_bytes` of these files, on the node this runs on."""
    from ptame.sources import ImageSource, iter_image_bytes

    return list(iter_image_bytes(ImageSource("files", paths, ids, filesystem)))


def reread_on_driver(
    entries: list[tuple[str, bytes | None, str | None]], paths: list[str], filesystem: Any, driver: str | None
) -> list[tuple[str, bytes | None, str | None]]:
    """``entries`` (read here from ``paths``) with the files this node could not read read again on
    the ``driver``'s node: a file only some nodes see is explained, never an error row for the others."""
    import ray

    failed = [i for i, e in enumerate(entries) if e[2] is not None]
    if not failed or driver is None or driver == driver_node():
        return entries
    task = ray.remote(num_cpus=0, max_retries=0)(_read_files).options(**on_node(driver))
    again = ray.get(task.remote([paths[i] for i in failed], [entries[i][0] for i in failed], filesystem), timeout=PROBE_TIMEOUT_S)
    fixed = list(entries)
    for i, entry in zip(failed, again):
        fixed[i] = entry
    logger.info("%d of %d files unreadable on node %s were read on the driver's", sum(e[2] is None for e in again), len(failed), driver_node())
    return fixed
