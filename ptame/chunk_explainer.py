"""The explain stage of ``ptame explain``: an actor that loads the pinned explainer once, then
explains chunk after chunk into one Parquet file each. No Ray here: :mod:`ptame.pipeline` runs it as
a Ray Data actor pool."""

from __future__ import annotations

from typing import Any

from ptame.chunks import ChunkReader, read_and_prepare, unpack_chunk
from ptame.explanations import output_filesystem
from ptame.jobs import chunk_file, write_atomically

__all__ = ["ChunkExplainer"]


class ChunkExplainer:
    """Actor stage: loads the pinned explainer once, then explains chunk after chunk.

    ``reader``: the job and how its chunks are read; a CPU actor reads and decodes its chunks itself
    (:func:`ptame.chunks.read_and_prepare`), a GPU actor (``job.use_gpu``) gets them from a decode stage
    before it. Each chunk lands in the job's output as one Parquet file (:data:`ptame.explanations.SCHEMA`),
    written atomically by the actor (a separate write stage would start a fresh Ray worker for many of
    its writes); with ``write`` off (a folder other nodes do not see) the file's bytes go back to the
    driver, which writes them. ``shipped``: the explainer as bytes (:func:`ptame.cluster.ship_explainer`),
    for actors on nodes that cannot load the job's model themselves.
    """

    def __init__(
        self,
        reader: ChunkReader,
        threads: int | None = None,
        write: bool = True,
        shipped: dict[str, Any] | None = None,
    ) -> None:
        import torch

        job = reader.job
        if threads:
            torch.set_num_threads(threads)
        if job.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("use_gpu was set but this actor sees no CUDA device")
        loaded = _load(job.model, job.tracking_uri, "cuda" if job.use_gpu else "cpu", shipped)
        if loaded.model_uri != job.model:
            raise RuntimeError(f"asked for {job.model}, the registry gave {loaded.model_uri}")
        self.explainer = loaded.explainer
        self.reader = reader
        self.write = write

    def __call__(self, chunk: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ptame.explanations import explanations_table

        job = self.reader.job
        if job.use_gpu:
            ids, items, wanted = unpack_chunk(chunk, self.explainer.preprocessing)
        else:
            ids, items, wanted = read_and_prepare(chunk, self.reader)
        rows = self._explain(items, wanted)
        table = explanations_table(ids, rows, job.model)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        done = {"chunk": chunk["chunk"], "images": len(rows), "errors": sum(r["error"] is not None for r in rows)}
        if not self.write:
            return {**done, "table": sink.getvalue().to_pybytes()}
        fs, root = output_filesystem(job.output)
        write_atomically(fs, f"{root}/{chunk_file(chunk['chunk'])}", sink.getvalue().to_pybytes())
        return done

    def _explain(self, items: list[Any], wanted: list[Any]) -> list[dict[str, Any]]:
        """The rows of prepared ``items``, batch after batch; a wanted class the model lacks is the item's error."""
        from ptame.classes import resolve_class
        from ptame.data import Prepared
        from ptame.records import explain_prepared

        job = self.reader.job
        classes: list[int | None] = []
        for i, (item, want) in enumerate(zip(items, wanted)):
            try:
                classes.append(None if item.error is not None or want is None else resolve_class(want, self.explainer.class_names))
            except ValueError as e:
                items[i] = Prepared(None, item.width, item.height, None, str(e))
                classes.append(None)
        rows: list[dict[str, Any]] = []
        for i in range(0, len(items), job.batch_size):
            window = slice(i, i + job.batch_size)
            rows.extend(
                explain_prepared(
                    self.explainer, items[window], topk=job.topk, classes=classes[window], topk_maps=job.maps == "topk"
                )
            )
        return rows


def _load(model: str, tracking_uri: str | None, device: str, shipped: dict[str, Any] | None) -> Any:
    """The :class:`ptame.registry.LoadedExplainer` of ``model`` on ``device``: from ``shipped`` bytes when
    given (never a registry lookup on a node without the registry's files), else from ``model`` itself."""
    if shipped is not None:
        from ptame.cluster import load_shipped

        return load_shipped(shipped, device)
    from ptame.registry import load_explainer

    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return load_explainer(model, map_location=device)
