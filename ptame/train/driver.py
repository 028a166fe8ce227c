"""The driver of a training run: check the settings and data, find or start the run, fit, save.

:func:`train` resolves the settings (absolute paths, the backbone's preprocessing, the steps) and
names the run directory ``<storage_path>/<run_name>-<fingerprint>``, where the fingerprint hashes
the settings and the data files (names, sizes, modification times) that decide the result:
rerunning a killed job with the same settings resumes it, rerunning a finished one reuses its final
checkpoint without starting Ray, and changing anything starts a fresh run. Otherwise it joins or
starts Ray and runs a ``TorchTrainer`` of :func:`~ptame.train.worker.train_loop_per_worker`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ptame.models import Preprocessing
from ptame.precision import choose_precision
from ptame.sources import absolute
from ptame.train.checkpoints import finished_checkpoint, save_result
from ptame.train.config import NOT_FINGERPRINTED, TrainConfig, TrainResult, training_preprocessing
from ptame.train.feed import data_files, fits_cache, inspect_data, training_data, training_images
from ptame.train.worker import train_loop_per_worker

__all__ = ["train"]

logger = logging.getLogger(__package__)


def _resolve_preprocessing(cfg: TrainConfig) -> dict[str, Any]:
    """The backbone's own preprocessing with ``cfg.preprocessing`` applied; fails early on a bad URI or class names."""
    from ptame.models import load_backbone

    try:
        backbone = load_backbone(cfg.backbone, pretrained=cfg.pretrained)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise ValueError(f"TrainConfig.backbone {cfg.backbone!r}: {e}") from e
    if cfg.class_names is not None and len(cfg.class_names) != backbone.num_classes:
        raise ValueError(
            f"TrainConfig.class_names has {len(cfg.class_names)} names but {cfg.backbone} has {backbone.num_classes} "
            "outputs; give one name per output"
        )
    own = backbone.preprocessing
    merged = {**own.to_dict(), **(cfg.preprocessing or {})}
    try:
        return Preprocessing.from_dict(merged).to_dict()
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"TrainConfig.preprocessing {cfg.preprocessing!r}: {e}") from None


def _fingerprint(cfg: TrainConfig, files: list[tuple[str, int, int]]) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    blob = json.dumps({"settings": settings, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _run_directory(cfg: TrainConfig, files: list[tuple[str, int, int]]) -> str:
    """The run directory under ``storage_path``: fixed for identical settings and data."""
    suffix = _fingerprint(cfg, files)
    if not cfg.resume:
        suffix += time.strftime("-%Y%m%d-%H%M%S")
    return f"{cfg.run_name}-{suffix}"


def _train_total_steps(rows: int, cfg: TrainConfig) -> tuple[int, int]:
    """``(steps per epoch, total steps)``: every worker takes the same number of full batches.

    Training stops at whichever of ``epochs`` / ``max_steps`` comes first; the log says which and how many."""
    per_epoch = rows // (cfg.batch_size * cfg.num_workers)
    if per_epoch == 0:
        raise ValueError(
            f"TrainConfig.data has {rows} rows, fewer than batch_size * num_workers = "
            f"{cfg.batch_size * cfg.num_workers}; lower batch_size or num_workers"
        )
    total = per_epoch * cfg.epochs
    if cfg.max_steps and cfg.max_steps < total:
        logger.info("training %d steps (max_steps; %d epochs would be %d)", cfg.max_steps, cfg.epochs, total)
        return per_epoch, cfg.max_steps
    limit = f"max_steps {cfg.max_steps} not reached" if cfg.max_steps else "no max_steps"
    logger.info("training %d epochs of %d steps = %d steps (epochs; %s)", cfg.epochs, per_epoch, total, limit)
    return per_epoch, total


def train(config: TrainConfig) -> TrainResult:
    """Train a P-TAME head with Ray Train and save the explainer to ``config.output_dir``.

    Joins the Ray cluster at ``config.ray_address`` (or ``$RAY_ADDRESS``), else starts a local Ray
    (shut down again at the end; a Ray the caller started is left running).

    Raises:
        TypeError, ValueError, FileNotFoundError: bad settings, naming the ``TrainConfig`` field.
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    start = time.perf_counter()
    logger.info("precision %s", _expected_precision(config))  # first: a 20x trap must show before anything runs
    cfg = replace(config, data=absolute(config.data), storage_path=absolute(config.storage_path),
                  output_dir=str(Path(config.output_dir).expanduser().resolve()))
    _require_shared_storage(cfg)  # on the caller's cluster: before any images are prepared
    cfg = replace(cfg, data=training_data(cfg))
    files = data_files(cfg.data)
    rows, names = inspect_data(cfg)
    per_epoch, total = _train_total_steps(rows, cfg)
    cfg = replace(cfg, preprocessing=_resolve_preprocessing(cfg))
    name = _run_directory(cfg, files)
    logger.info(
        "training %s on %d images (%d files): %d workers x batch %d at %d px, %d steps (%d per epoch), run %s/%s",
        cfg.backbone, rows, len(files), cfg.num_workers, cfg.batch_size, training_preprocessing(cfg)["input_size"],
        total, per_epoch, cfg.storage_path, name,
    )
    columns = [cfg.image_column] + (["image_id"] if "image_id" in names and cfg.image_column != "image_id" else [])

    finished = finished_checkpoint(cfg, name, total)
    if finished is not None:  # a rerun of a finished job: nothing to train, no Ray to start
        logger.info("run %s already finished (step %s); reusing its final checkpoint", name, finished.metrics["step"])
        return save_result(cfg, finished, None, start, rerun=True)

    import ray

    from ptame.process import init_ray

    cache = fits_cache(cfg, rows)
    started = not ray.is_initialized()
    if started:
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        init_ray(address, num_cpus=None if address else _local_cpus(cfg, cache))
    try:
        if started:  # a Ray the caller had started was checked before preparing anything
            _require_shared_storage(cfg)
        if cfg.cpus_per_worker is None:
            cfg = replace(cfg, cpus_per_worker=_cpus_per_worker(cfg, cache))
        return _fit(cfg, name, columns, per_epoch, total, start, cache)
    finally:
        if started:
            ray.shutdown()


def _expected_precision(cfg: TrainConfig) -> str:
    """The precision a worker will choose, as seen from the driver (each worker decides and logs its own)."""
    if cfg.use_gpu:
        return f"amp={cfg.amp} (decided on each worker's GPU)"
    return choose_precision(cfg.amp, "cpu").describe()


def _require_shared_storage(cfg: TrainConfig) -> None:
    """Refuse a local ``storage_path`` that a node of the connected Ray cluster does not see."""
    from ptame.cluster import require_shared

    why = "Ray Train writes the checkpoints there from a worker's node and resumes from them"
    require_shared("train.storage_path", cfg.storage_path, why)


def _cpus_per_worker(cfg: TrainConfig, cache: bool) -> float:
    """Default CPUs per worker: with cached images, the cluster's CPUs shared by the workers (at most
    one node's); when streaming, 1, leaving the rest to Ray Data's decoding."""
    import ray

    if not cache or cfg.use_gpu:
        return 1
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes)
    return float(max(1, min(max(nodes, default=1), total // cfg.num_workers)))


def _local_cpus(cfg: TrainConfig, cache: bool = False) -> int | None:
    """CPUs for a local Ray: the workers' share plus one for Ray Data, even on a small machine.

    With cached images Ray Data decodes before training starts, so the workers may take them all.
    """
    if cache and cfg.cpus_per_worker is None:
        return None
    needed = int(np.ceil(cfg.num_workers * (cfg.cpus_per_worker or 1))) + 1
    have = os.cpu_count() or 1
    if have >= needed:
        return None
    logger.warning("this machine has %d CPUs; starting the local Ray with %d logical CPUs so that %d "
                   "training workers and the Ray Data decoding can run side by side", have, needed, cfg.num_workers)
    return needed


def _fit(
    cfg: TrainConfig, name: str, columns: list[str], per_epoch: int, total: int, start: float, cache: bool
) -> TrainResult:
    """Build the Ray Data pipeline and the trainer, run it, save the explainer."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ptame.process import quiet_ray_data

    quiet_ray_data()  # the workers log ptame's own progress; Ray Train's set-up chatter stays in its log files
    images = training_images(cfg, columns, cache)
    loop_config = {**asdict(cfg), "_steps_per_epoch": per_epoch, "_total_steps": total, "_cache": cache,
                   "_marker": f"{cfg.storage_path}/{name}/.fault-injected"}
    resources = {"CPU": cfg.cpus_per_worker} if cfg.cpus_per_worker else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": images},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {result.path} finished without a checkpoint")
    return save_result(cfg, result, result.return_value, start)
