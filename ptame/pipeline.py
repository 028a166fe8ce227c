"""The Ray Data pipeline of a ``ptame explain`` job: actors laid out on the nodes, stages chained,
chunks streamed to their files.

Stages (:mod:`ptame.chunks`, :mod:`ptame.chunk_explainer`), one Ray Data row per chunk::

    chunk -> [read on the driver's node: an input other nodes do not see]
          -> [decode on the CPUs: GPU actors only]
          -> ChunkExplainer actor pool -> part-<chunk>.parquet (or its bytes, written here)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ptame.chunk_explainer import ChunkExplainer
from ptame.chunks import ChunkReader, prepare_chunk, read_here
from ptame.explanations import MANIFEST, output_filesystem
from ptame.jobs import chunk_file, finished_chunks, write_atomically

if TYPE_CHECKING:
    from ptame.batch import ExplainJob

__all__ = ["actor_layout", "run_pipeline"]

logger = logging.getLogger("ptame.batch")  # one logger for the whole ``ptame explain`` job


def run_pipeline(
    job: ExplainJob, pending: list[dict[str, Any]], source: Any, preprocessing: dict[str, Any]
) -> tuple[int, int, int]:
    """Build and stream the Ray Data pipeline over ``pending`` chunks: ``(images, errors, chunks)``.

    Uses the running Ray instance, or starts one (:func:`_start_ray`) and stops it at the end.
    """
    import ray

    from ptame.process import quiet_ray_data

    started = _start_ray(job.address)
    try:
        quiet_ray_data()
        return _stream(job, pending, _dataset(job, pending, source, preprocessing))
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: say how far the job got and how to finish it
        if started:
            ray.shutdown()  # first, so that no chunk lands after the count
        e.add_note(_progress_note(job.output))
        raise
    finally:
        if started:
            ray.shutdown()


def _start_ray(address: str | None) -> bool:
    """Start Ray unless it runs in this process already; whether it was started here."""
    import ray

    from ptame.process import init_ray

    if ray.is_initialized():
        return False
    # the design's rule: an explicit address, else RAY_ADDRESS, else a new local Ray (never
    # whichever cluster happens to run on this machine)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {"include_dashboard": False} if address == "local" else {}
    init_ray(address, **local)
    return True


def _dataset(job: ExplainJob, pending: list[dict[str, Any]], source: Any, preprocessing: dict[str, Any]) -> Any:
    """The lazy Ray Data dataset of ``pending`` chunks through every stage, one row per explained chunk."""
    import ray

    from ptame.cluster import driver_node, driver_only, multi_node, ship_explainer, stage_on_node

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    concurrency, threads = actor_layout(nodes, job.concurrency, job.use_gpu, len(pending))
    logger.info("explaining %d chunks with %d %s actor(s), %d torch thread(s) each", len(pending), concurrency,
                "GPU" if job.use_gpu else "CPU", threads)  # fmt: skip
    fs, root = output_filesystem(job.output)
    reader = ChunkReader(job, source.filesystem, preprocessing)
    ds = ray.data.from_items(pending, override_num_blocks=min(len(pending), 10_000))
    if driver_only(source.filesystem, source.paths[0]):  # read where the files are, explained anywhere
        logger.info("other nodes do not see %s: its files are read on this node and reach them through Ray", source.paths[0])
        ds = ds.map(read_here, fn_kwargs={"reader": reader}, **stage_on_node(driver_node()))
    elif multi_node():
        reader = replace(reader, driver=driver_node())
    write_here = driver_only(fs, f"{root}/{MANIFEST}")
    if job.use_gpu:
        ds = ds.map(
            prepare_chunk,
            fn_kwargs={"reader": reader},
            num_cpus=1,
            # room for the largest image a task accepts and its chunk; also keeps Ray Data from
            # fusing decoding into the explain actors (decoding on the CPUs must overlap the GPUs)
            memory=_decode_memory(job.max_pixels, job.chunk_size, preprocessing, ray),
        )
    return ds.map(
        ChunkExplainer,
        fn_constructor_kwargs={
            "reader": reader,
            "threads": threads,
            "write": not write_here,  # other nodes do not see the output: chunks come back here
            "shipped": ship_explainer(job.model, job.tracking_uri),
        },
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1 if job.use_gpu else threads,
        num_gpus=1 if job.use_gpu else 0,
    )


def _stream(job: ExplainJob, pending: list[dict[str, Any]], ds: Any) -> tuple[int, int, int]:
    """Run ``ds``, writing here the chunks that came back as bytes: ``(images, errors, chunks)``."""
    from tqdm.auto import tqdm

    fs, root = output_filesystem(job.output)
    images = errors = written = 0
    total = sum(len(c["ids"]) if "ids" in c else len(c["rows"]) if "rows" in c else c["stop"] - c["start"] for c in pending)
    with tqdm(total=total, unit="img", desc="explain", disable=None if job.progress else True) as bar:
        for row in ds.iter_rows():
            if row.get("table") is not None:
                write_atomically(fs, f"{root}/{chunk_file(row['chunk'])}", row["table"])
            images += row["images"]
            errors += row["errors"]
            written += 1
            bar.update(row["images"])
            bar.set_postfix(errors=errors, refresh=False)
    return images, errors, written


def _decode_memory(max_pixels: int, chunk_size: int, preprocessing: dict[str, Any], ray: Any) -> int:
    """Heap bytes a decode task may need: ~20 bytes per pixel of the largest image (RGB, float
    tensor, resize buffers) plus the chunk's float32 output twice; at most a quarter of the cluster's."""
    size = int(preprocessing["input_size"])
    need = 20 * max_pixels + 2 * chunk_size * 3 * size * size * 4
    available = int(ray.cluster_resources().get("memory", need * 4))
    return max(1, min(need, available // 4))


def actor_layout(
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
