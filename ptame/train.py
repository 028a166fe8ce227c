"""Train a P-TAME head with Ray Train: data-parallel over the head, data streamed by Ray Data.

The method itself is :meth:`ptame.explainer.Explainer.training_step`; this module only scales it
out. One :class:`TrainConfig` goes in (``train_loop_config=asdict(cfg)`` and rebuilt in each
worker), one :class:`TrainResult` comes out:

- the prepared Parquet data (``image`` bytes) is read with ``ray.data.read_parquet``, decoded,
  resized and augmented on CPU in ``map_batches``, streamed and sharded equally across workers;
  undecodable rows are dropped with a logged warning naming them, never crash the run;
- every worker builds the same :class:`~ptame.explainer.Explainer`; only the head is wrapped in
  DDP (``ray.train.torch.prepare_model``), the frozen backbone and auxiliary stay plain modules;
- AdamW (AMSGrad) with a one-cycle schedule stepped per batch, as in the paper;
- rank 0 checkpoints the head (safetensors), optimiser, schedule and step every
  ``checkpoint_every`` steps; a restarted worker group (``FailureConfig(max_failures)``) resumes
  from the latest checkpoint and never repeats or skips a step.

The run directory is ``<storage_path>/<run_name>-<fingerprint>`` where the fingerprint hashes the
settings and the data files (names, sizes, modification times) that decide the result: rerunning a
killed job with the same settings resumes it, rerunning a finished one reuses its final checkpoint
without starting Ray, and changing anything starts a fresh run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptame.heartbeat import Heartbeat
from ptame.losses import LossWeights
from ptame.models import Preprocessing
from ptame.precision import check_amp, choose_precision, precision_for

__all__ = ["TrainConfig", "TrainResult", "train"]

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
HEAD_FILE = "head.safetensors"
OPTIM_FILE = "optimizer.pt"
LOSS_TERMS = ("loss", "ce", "area", "tv", "deletion")
HEAD_INITS = ("random", "cam")
_PREP_FIELDS = {f.name for f in fields(Preprocessing)}
#: settings that do not change what is learned: left out of the run fingerprint
_NOT_FINGERPRINTED = {
    "output_dir", "use_gpu", "storage_path", "run_name", "checkpoint_every", "max_failures",
    "ray_address", "log_every", "fail_at_step", "resume", "cpus_per_worker", "placement_strategy", "cache_gb",
    "amp",  # numerics only: a run resumed on other hardware may change precision
    "smoothing", "cam_weight", "activity_weight",  # explain-time map settings: applied when saving, never trained
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; plain values only, so it travels as ``asdict(cfg)``.

    Attributes:
        backbone: URI of the classifier to explain, e.g. ``"builtin:efficientnet_lite2"``.
        auxiliary: URI of the auxiliary feature pyramid, e.g. ``"builtin:efficientnet_lite0"``.
        data: prepared Parquet dataset (file or folder, local path or URI) with a binary
            ``image`` column of encoded PNG/JPEG bytes (and usually ``image_id``); or any other
            ``data.source`` of params.yaml (image folder, glob, ``.txt`` list), prepared once with
            :func:`ptame.prepare.prepare_source` under ``storage_path`` (every image trains).
        output_dir: where the trained explainer is written with :meth:`Explainer.save`.
        stages: auxiliary stages to tap (default: strides 4 to 32).
        preprocessing: overrides of the backbone's :class:`Preprocessing` fields (``input_size``,
            ``resize``, ``mean``, ``std``).
        crop_scale: side of the training crops as a share of the backbone's ``input_size`` (in
            ``(0, 1]``; 1: the paper); the images are resized in proportion, so objects keep their
            scale relative to the crop. Smaller trains faster; the saved explainer still
            explains at ``input_size`` (the head is resolution-free: 1x1 convolutions).
        class_names: one name per output of the classifier, stored in the saved explainer so that
            bulk rows, HTTP answers and overlays say them (default: ImageNet names for 1000 outputs).
        epochs: passes over the data.
        max_steps: stop after this many optimiser steps (global) if set.
        batch_size: images per worker per step (the global batch is ``batch_size * num_workers``).
        lr: maximum learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        loss: :class:`LossWeights` fields.
        augment: resize, random crop and horizontal flip (method.md); off: resize + centre crop.
        num_workers: Ray Train workers (one process each, DDP over the head).
        use_gpu: one GPU per worker.
        amp: mixed precision (:func:`ptame.precision.choose_precision`): ``"auto"`` autocasts to
            bf16 only where the hardware has it natively (CPUs with AVX512-BF16/AMX/Arm BF16, GPUs
            from Ampere on; fp16 + GradScaler on older GPUs), else float32; ``True`` forces it.
        storage_path: where Ray Train keeps checkpoints (local directory, made absolute, or a
            shared/cloud URI; multi-node clusters need storage every node can reach).
        run_name: prefix of the run directory under ``storage_path``.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        max_failures: worker-group restarts allowed (``FailureConfig``; -1 for unlimited).
        seed: seeds the head's initialisation (identical on every worker).
        ray_address: Ray cluster to join; ``None`` uses ``$RAY_ADDRESS`` or starts a local Ray.
        log_every: steps between entries of the loss history (and progress updates).
        pretrained: let ``timm:``/``torchvision:`` URIs load pretrained weights (needs a hub/cache).
        image_column: name of the encoded-image column in ``data``.
        cpus_per_worker: CPUs reserved per training worker (torch threads follow it); ``None``: 1.
        placement_strategy: how workers are placed on nodes (``ScalingConfig``): ``"PACK"``,
            ``"SPREAD"`` or ``"STRICT_SPREAD"`` (one worker per node).
        resume: continue the run directory of identical settings if one exists; ``False`` always
            starts a fresh run directory.
        head_init: ``"random"`` (the paper) or ``"cam"``: the head starts as the backbone's class
            activation maps (needs ``auxiliary="backbone"``; see
            :meth:`~ptame.explainer.Explainer.init_head_from_classifier`).
        cam_scale: scale of the classifier weights in the ``"cam"`` initialisation.
        smoothing: the saved explainer's map blur (std in map pixels; see
            :class:`~ptame.explainer.Explainer`); does not change training.
        cam_weight: the saved explainer's weight of the backbone's class activation maps in its
            maps (see :class:`~ptame.explainer.Explainer`); does not change training.
        activity_weight: the saved explainer's weight of the backbone's activity where its maps are
            off (see :class:`~ptame.explainer.Explainer`); does not change training.
        cache_gb: decoded training images are kept in each worker's memory (decoded once, then
            cropped per step) when its shard fits in this many GiB; otherwise Ray Data streams
            and decodes them again every epoch.
        fail_at_step: for tests only: the last worker dies (``os._exit``) once, at this step of
            the first attempt, to exercise restart and resume.
    """

    backbone: str
    auxiliary: str
    data: str
    output_dir: str
    stages: list[int] | None = None
    preprocessing: dict | None = None
    crop_scale: float = 1.0
    class_names: list[str] | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 2.43e-4
    loss: dict = field(default_factory=lambda: asdict(LossWeights()))
    augment: bool = True
    num_workers: int = 1
    use_gpu: bool = False
    amp: bool | str = "auto"
    storage_path: str = "ray_results"
    run_name: str = "ptame-train"
    checkpoint_every: int = 50
    max_failures: int = 2
    seed: int = 0
    ray_address: str | None = None
    log_every: int = 1
    pretrained: bool = False
    image_column: str = "image"
    cpus_per_worker: float | None = None
    placement_strategy: str = "PACK"
    resume: bool = True
    head_init: str = "random"
    cam_scale: float = 0.2
    smoothing: float = 0.0
    cam_weight: float = 0.0
    activity_weight: float = 0.0
    cache_gb: float = 2.0
    fail_at_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("backbone", "auxiliary", "data", "output_dir", "storage_path", "run_name", "image_column"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"TrainConfig.{name} must be a string, got {type(value).__name__}")
            if not value:
                raise ValueError(f"TrainConfig.{name} must not be empty")
        for name, low in (("epochs", 1), ("batch_size", 1), ("num_workers", 1), ("checkpoint_every", 1),
                          ("log_every", 1), ("max_failures", -1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"TrainConfig.{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"TrainConfig.{name} must be >= {low}, got {value}")
        check_amp(self.amp, "TrainConfig.amp")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"TrainConfig.crop_scale must be in (0, 1] (a share of the input size), got {self.crop_scale}")
        for name in ("max_steps", "fail_at_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be None or a positive int, got {value!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"TrainConfig.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                f"got {self.placement_strategy!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"TrainConfig.head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if not self.cam_scale > 0:
            raise ValueError(f"TrainConfig.cam_scale must be > 0, got {self.cam_scale}")
        if self.cache_gb < 0:
            raise ValueError(f"TrainConfig.cache_gb must be >= 0, got {self.cache_gb}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"TrainConfig.cpus_per_worker must be None or > 0, got {self.cpus_per_worker}")
        if not isinstance(self.loss, dict):
            raise TypeError(f"TrainConfig.loss must be a dict of LossWeights fields, got {type(self.loss).__name__}")
        try:
            LossWeights(**self.loss)
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig.loss: {e}") from None
        if self.class_names is not None and (
            not isinstance(self.class_names, list) or not all(isinstance(n, str) and n for n in self.class_names)
        ):
            raise TypeError("TrainConfig.class_names must be a list of non-empty strings (see models.read_class_names)")
        if self.preprocessing is not None:
            if not isinstance(self.preprocessing, dict):
                raise TypeError(f"TrainConfig.preprocessing must be a dict or None, got {type(self.preprocessing).__name__}")
            unknown = set(self.preprocessing) - _PREP_FIELDS
            if unknown:
                raise ValueError(f"TrainConfig.preprocessing has unknown keys {sorted(unknown)}; use {sorted(_PREP_FIELDS)}")


@dataclass(frozen=True)
class TrainResult:
    """What a run produced.

    Attributes:
        explainer_dir: the saved explainer (``output_dir``), loadable with :meth:`Explainer.load`.
        history: one entry per logged step: ``step``, ``loss``, ``ce``, ``area``, ``tv`` (averaged
            over workers), ``lr`` and ``elapsed`` (seconds since the worker group that did the step
            started training); complete and without repeats across restarts.
        checkpoint: path (or URI) of the final Ray Train checkpoint.
        steps: optimiser steps done in total.
        seconds: wall time of :func:`train`.
        resumed_from: the step each restart (or rerun) resumed at, in order; empty if none.
        worker_nodes: Ray node id of each worker (by rank) in the attempt that finished.
        run_path: the Ray Train run directory (checkpoints live under it).
    """

    explainer_dir: str
    history: list[dict[str, float]]
    checkpoint: str | None
    steps: int
    seconds: float
    resumed_from: tuple[int, ...] = ()
    worker_nodes: tuple[str, ...] = ()
    run_path: str = ""


# --------------------------------------------------------------------------- driver side


def _is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    return path if _is_uri(path) else str(Path(path).expanduser().resolve())


def _data_files(data: str) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of the Parquet files under ``data``; refuses a missing path."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(data)
    except (pafs.ArrowInvalid, ValueError, TypeError) as e:
        raise ValueError(f"TrainConfig.data: cannot open {data!r}: {e}") from None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"TrainConfig.data: {data!r} does not exist; run the prepare stage or fix the path")
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        (i.path, int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos
        if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
    )
    if not files:
        raise ValueError(f"TrainConfig.data: no Parquet files under {data!r}")
    return files


def _training_data(cfg: TrainConfig) -> str:
    """``cfg.data`` as Parquet: Parquet files as they are; images (folder, glob, ``.txt`` list) prepared once.

    Other sources go through :func:`ptame.prepare.prepare_source` (what ``dvc repro``'s prepare stage
    runs, with every image for training) into ``<storage_path>/prepared/<key>``; the key hashes the
    source's files (names, sizes, modification times), so a rerun reuses the shards and resumes.
    """
    from ptame.prepare import prepare_source
    from ptame.sources import PARQUET_SUFFIXES, resolve_source

    data = cfg.data
    if not any(ch in data for ch in "*?[") and not data.endswith(".txt"):
        if all(path.endswith(PARQUET_SUFFIXES) for path, _, _ in _data_files(data)):
            return data
    try:
        source = resolve_source(data, image_column=cfg.image_column)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"TrainConfig.data: {e}; fix the path") from None
    if _is_uri(cfg.storage_path):
        raise ValueError(
            f"TrainConfig.data {data!r} is not Parquet and storage_path is a URI: prepare the images first with "
            f"ptame.prepare.prepare_source({data!r}, out_dir, eval_fraction=0.0) and pass data=out_dir + '/train'"
        )
    listing = []
    for path in source.paths:
        info = source.filesystem.info(path)
        listing.append((path, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")))
    key = hashlib.sha256(json.dumps([data, source.image_column, listing], default=str).encode()).hexdigest()[:10]
    out = Path(cfg.storage_path) / "prepared" / key
    if (out / "report.json").is_file():
        logger.info("TrainConfig.data %s: reusing its prepared shards in %s", data, out)
    else:
        logger.info("TrainConfig.data %s is not Parquet: preparing it into %s (ptame.prepare.prepare_source)", data, out)
        staging = out.with_name(f".{key}-{os.getpid()}")
        report = prepare_source(data, staging, eval_fraction=0.0)
        (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        os.replace(staging, out)
    return str(out / "train")


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
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    blob = json.dumps({"settings": settings, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _run_directory(cfg: TrainConfig, files: list[tuple[str, int, int]]) -> str:
    """The run directory under ``storage_path``: fixed for identical settings and data."""
    suffix = _fingerprint(cfg, files)
    if not cfg.resume:
        suffix += time.strftime("-%Y%m%d-%H%M%S")
    return f"{cfg.run_name}-{suffix}"


def _inspect(cfg: TrainConfig) -> tuple[int, list[str]]:
    """Row count and columns of the Parquet data, from the file footers (nothing decoded)."""
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(cfg.data, format="parquet")
        names, rows = list(dataset.schema.names), dataset.count_rows()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"TrainConfig.data {cfg.data!r} is not a readable Parquet dataset: {e}") from None
    if cfg.image_column not in names:
        raise ValueError(
            f"TrainConfig.data {cfg.data!r} has no column {cfg.image_column!r} (columns: {names}); "
            "set TrainConfig.image_column"
        )
    return rows, names


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
    cfg = replace(config, data=_absolute(config.data), storage_path=_absolute(config.storage_path),
                  output_dir=str(Path(config.output_dir).expanduser().resolve()))
    _require_shared_storage(cfg)  # on the caller's cluster: before any images are prepared
    cfg = replace(cfg, data=_training_data(cfg))
    files = _data_files(cfg.data)
    rows, names = _inspect(cfg)
    per_epoch, total = _train_total_steps(rows, cfg)
    cfg = replace(cfg, preprocessing=_resolve_preprocessing(cfg))
    name = _run_directory(cfg, files)
    logger.info(
        "training %s on %d images (%d files): %d workers x batch %d at %d px, %d steps (%d per epoch), run %s/%s",
        cfg.backbone, rows, len(files), cfg.num_workers, cfg.batch_size, _training_preprocessing(cfg)["input_size"],
        total, per_epoch, cfg.storage_path, name,
    )
    columns = [cfg.image_column] + (["image_id"] if "image_id" in names and cfg.image_column != "image_id" else [])

    finished = _finished_checkpoint(cfg, name, total)
    if finished is not None:  # a rerun of a finished job: nothing to train, no Ray to start
        logger.info("run %s already finished (step %s); reusing its final checkpoint", name, finished.metrics["step"])
        return _save_result(cfg, finished, None, start, rerun=True)

    import ray

    from ptame.process import init_ray

    cache = _fits_cache(cfg, rows)
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


def _training_preprocessing(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved preprocessing at the training crop size (``crop_scale`` x ``input_size``), resize scaled alike."""
    prep = dict(cfg.preprocessing)
    if cfg.crop_scale != 1:
        side = max(1, round(prep["input_size"] * cfg.crop_scale))
        prep.update(input_size=side, resize=max(side, round(prep["resize"] * cfg.crop_scale)))
    return prep


def _require_shared_storage(cfg: TrainConfig) -> None:
    """Refuse a local ``storage_path`` that a node of the connected Ray cluster does not see."""
    from ptame.cluster import require_shared

    why = "Ray Train writes the checkpoints there from a worker's node and resumes from them"
    require_shared("train.storage_path", cfg.storage_path, why)


def _fits_cache(cfg: TrainConfig, rows: int) -> bool:
    """Whether one worker's decoded shard (uint8, ``resize`` x ``resize``) fits in ``cache_gb``."""
    prep = Preprocessing.from_dict(_training_preprocessing(cfg))
    side = prep.resize if cfg.augment else prep.input_size
    gib = rows / cfg.num_workers * 3 * side * side / 2**30
    cache = gib <= cfg.cache_gb
    logger.info("training images: %.2f GiB decoded per worker: %s", gib,
                "decoded once and kept in memory" if cache else f"streamed every epoch (over cache_gb={cfg.cache_gb})")
    return cache


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
    """Build the Ray Data pipeline and the trainer, run it, save the explainer.

    With ``cache``, the decoded images are materialised before the workers start, so decoding
    never competes with training for the CPUs.
    """
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ptame.cluster import nodes_missing, read_parquet_here
    from ptame.process import quiet_ray_data

    quiet_ray_data()  # the workers log ptame's own progress; Ray Train's set-up chatter stays in its log files
    if nodes_missing(cfg.data):  # only this node has the data: read here, decoded and trained on anywhere
        images = read_parquet_here([path for path, _, _ in _data_files(cfg.data)], columns)
    else:
        images = ray.data.read_parquet(cfg.data)
    images = images.select_columns(columns).randomize_block_order(seed=cfg.seed).map_batches(
        _decode_batch,
        fn_kwargs={"image_column": cfg.image_column, "prep": _training_preprocessing(cfg), "augment": cfg.augment},
        batch_size=64,
        batch_format="numpy",
    )
    if cache:
        images = images.materialize()
    loop_config = {**asdict(cfg), "_steps_per_epoch": per_epoch, "_total_steps": total, "_cache": cache,
                   "_marker": f"{cfg.storage_path}/{name}/.fault-injected"}
    resources = {"CPU": cfg.cpus_per_worker} if cfg.cpus_per_worker else None
    trainer = TorchTrainer(
        _train_loop_per_worker,
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
    return _save_result(cfg, result, result.return_value, start)


def _finished_checkpoint(cfg: TrainConfig, name: str, total: int):  # -> ray.train.Result | None
    """The earlier run of identical settings if its latest checkpoint is its last (step or epoch)."""
    from ray.train import Result

    try:
        result = Result.from_path(f"{cfg.storage_path}/{name}")
    except RuntimeError:  # no such run (or no snapshot yet)
        return None
    metrics = result.metrics or {}
    done = int(metrics.get("step", -1)) >= total or int(metrics.get("epoch", -1)) >= cfg.epochs
    return result if result.checkpoint is not None and done else None


def _save_result(cfg: TrainConfig, result, final_state: dict | None, start: float, rerun: bool = False) -> TrainResult:
    """Save the checkpoint's head as the explainer in ``output_dir`` and describe the run."""
    explainer, state = _load_checkpoint(cfg, result.checkpoint)
    if isinstance(final_state, dict):  # rank 0's state at the end: also knows a resume with nothing to do
        state = final_state
    if rerun:
        state["resumed_from"].append(state["step"])
    explainer.save(cfg.output_dir, extra={"train": {
        "steps": state["step"], "checkpoint": result.checkpoint.path, "run": result.path,
        "data": cfg.data, "lr": cfg.lr, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
    }})
    return TrainResult(
        explainer_dir=cfg.output_dir,
        history=state["history"],
        checkpoint=result.checkpoint.path,
        steps=int(state["step"]),
        seconds=time.perf_counter() - start,
        resumed_from=tuple(state["resumed_from"]),
        worker_nodes=tuple(state["nodes"]),
        run_path=result.path,
    )


def _build_explainer(cfg: TrainConfig):  # -> Explainer
    from ptame.explainer import Explainer

    explainer = Explainer.from_uris(
        cfg.backbone, cfg.auxiliary, stages=cfg.stages, pretrained=cfg.pretrained,
        loss_weights=LossWeights(**cfg.loss), preprocessing=Preprocessing.from_dict(cfg.preprocessing),
        class_names=cfg.class_names, smoothing=cfg.smoothing, cam_weight=cfg.cam_weight,
        activity_weight=cfg.activity_weight,
    )
    if cfg.head_init == "cam":
        explainer.init_head_from_classifier(cfg.cam_scale)
    return explainer


def _load_checkpoint(cfg: TrainConfig, checkpoint):  # -> tuple[Explainer, dict]
    from safetensors.torch import load_file

    explainer = _build_explainer(cfg)
    with checkpoint.as_directory() as d:
        explainer.head.load_state_dict(load_file(os.path.join(d, HEAD_FILE)))
        state = json.loads(Path(d, STATE_FILE).read_text())
    return explainer, state


# --------------------------------------------------------------------------- data (Ray Data tasks)


def _decode_batch(batch: dict[str, np.ndarray], image_column: str, prep: dict, augment: bool) -> dict[str, np.ndarray]:
    """Encoded images -> ``(n, 3, S, S)`` uint8, decoded once; undecodable rows are dropped and logged.

    ``S`` is ``resize`` when augmenting (shorter side resized, centre square; the worker cuts a
    random ``input_size`` crop and flip per step), else ``input_size`` (resize + centre crop).
    """
    from ptame.data import ImageDecodeError, decode_image, preprocess

    p = Preprocessing.from_dict(prep)
    view = replace(p, input_size=p.resize) if augment else p
    ids = batch.get("image_id")
    out, kept, bad = [], [], []
    for i, data in enumerate(batch[image_column]):
        name = str(ids[i]) if ids is not None else f"row {i}"
        try:
            image = decode_image(bytes(data) if data is not None else b"")
        except ImageDecodeError as e:
            bad.append(f"{name} ({e})")
            continue
        out.append(preprocess(image, view)[0].mul(255).round_().to(torch.uint8).numpy())
        kept.append(name)
    if bad:
        logger.warning("dropped %d undecodable image(s) of %d: %s", len(bad), len(batch[image_column]), "; ".join(bad))
    s = view.input_size
    return {"image": np.stack(out) if out else np.zeros((0, 3, s, s), np.uint8), "image_id": np.array(kept, dtype=object)}


def _crop_flip(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """method.md's augmentation on decoded ``(B, 3, R, R)`` uint8: random ``size`` crop and h-flip
    per image, seeded; returns float in ``[0, 1]``."""
    b, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (b,), generator=generator).tolist()
    left = torch.randint(0, w - size + 1, (b,), generator=generator).tolist()
    flip = (torch.rand(b, generator=generator) < 0.5).tolist()
    crops = []
    for x, t, l, f in zip(images, top, left, flip):
        c = x[:, t : t + size, l : l + size]
        crops.append(c.flip(-1) if f else c)
    return torch.stack(crops).to(torch.float32).div_(255.0)


class _ShardImages:
    """One worker's training images, batch by batch, in an order fixed by the seed.

    Cached: the shard is read once into memory (sorted by ``image_id``), and each epoch is a seeded
    permutation of it, so a run is repeatable and a resumed epoch continues with the very batches
    it still owed. Streamed: Ray Data decodes the shard again every epoch (local shuffle, seeded).
    """

    def __init__(self, shard, cfg: TrainConfig, rank: int, cache: bool) -> None:
        self.shard, self.cfg, self.rank, self.cache = shard, cfg, rank, cache
        self.size = _training_preprocessing(cfg)["input_size"]
        self._images: torch.Tensor | None = None

    def _seed(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.seed, self.rank, *parts)) % 2**63)

    def _load(self) -> torch.Tensor:
        if self._images is None:
            chunks, ids = [], []
            for b in self.shard.iter_batches(batch_size=256, batch_format="numpy"):
                chunks.append(b["image"])  # read-only views of the object store: copied once below
                ids.extend(str(i) for i in b["image_id"])
            order = sorted(range(len(ids)), key=ids.__getitem__)
            self._images = torch.from_numpy(np.concatenate(chunks)[order]) if chunks else torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
            logger.info("worker %d: %d training images decoded once and kept in memory (%.0f MiB)",
                        self.rank, len(ids), self._images.numel() / 2**20)
        return self._images

    def epoch(self, epoch: int, skip: int, steps: int):  # -> Iterator[torch.Tensor]
        """Batches ``skip..steps-1`` of ``epoch`` as float ``(B, 3, S, S)`` in ``[0, 1]`` on the CPU."""
        bs = self.cfg.batch_size
        if self.cache:
            images = self._load()
            order = torch.randperm(images.shape[0], generator=self._seed(epoch))
            for i in range(skip, min(steps, images.shape[0] // bs)):
                yield self._augment(images[order[i * bs : (i + 1) * bs]], epoch, i)
            return
        batches = self.shard.iter_batches(
            batch_size=bs, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=4 * bs,
            local_shuffle_seed=self.cfg.seed + epoch,
        )
        for i, batch in enumerate(batches, start=skip):
            if i >= steps:
                return
            yield self._augment(torch.from_numpy(batch["image"]), epoch, i)

    def _augment(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if not self.cfg.augment:
            return images.to(torch.float32).div_(255.0)
        return _crop_flip(images, self.size, self._seed(epoch, step))


# --------------------------------------------------------------------------- training (each worker)


def _save_state(directory: str, head: torch.nn.Module, optimizer, scheduler, scaler, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, os.path.join(directory, HEAD_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
               os.path.join(directory, OPTIM_FILE))
    Path(directory, STATE_FILE).write_text(json.dumps(state))


def _restore_state(directory: str, head: torch.nn.Module, optimizer, scheduler, scaler, device) -> dict:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(os.path.join(directory, HEAD_FILE), device=str(device)))
    saved = torch.load(os.path.join(directory, OPTIM_FILE), map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:  # empty when saved without fp16 (another GPU kind may resume the run)
        scaler.load_state_dict(saved["scaler"])
    return json.loads(Path(directory, STATE_FILE).read_text())


def _inject_fault(marker: str, step: int) -> None:
    """Testing only: die once (the marker file prevents a second death after the restart)."""
    import pyarrow.fs as pafs

    import ray.train
    from ray.train import CheckpointConsistencyMode

    fs, path = pafs.FileSystem.from_uri(marker)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return
    with fs.open_output_stream(path) as f:
        f.write(str(step).encode())
    # The controller collects reports every few seconds; wait for it so that the checkpoint just
    # reported is the one the restart resumes from (a real crash may lose the latest report).
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    logger.warning("fail_at_step=%d: this worker exits now (fault injection for tests)", step)
    os._exit(1)


def _worker_logging() -> None:
    """Progress lines of rank 0 reach the driver through the worker's stderr."""
    log = logging.getLogger("ptame")
    log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def _mean_terms(values: torch.Tensor) -> list[list[float]]:
    """Rows of loss terms averaged over the workers, reduced where they live, then read once.

    A collective when a process group is up (every rank calls it): NCCL refuses CPU tensors, so the
    reduction runs on the worker's device and only the result is copied to the host.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values.cpu().tolist()


class _LossLog:
    """Loss terms of the logged steps, kept on the device until :meth:`flush` reduces them all in one
    collective: a per-step history without a host sync or a collective in every step."""

    def __init__(self) -> None:
        self._terms: list[torch.Tensor] = []
        self._rows: list[dict[str, float]] = []
        self._keep: list[bool] = []

    def add(self, out: dict[str, torch.Tensor], row: dict[str, float], keep: bool = True) -> None:
        """Queue this step's terms; ``row`` (step, lr, ...) gets them at the flush; ``keep=False``:
        reported with a checkpoint but not part of the history."""
        self._terms.append(torch.stack([out[k].detach().float() for k in LOSS_TERMS]))
        self._rows.append(row)
        self._keep.append(keep)

    def flush(self) -> tuple[list[dict[str, float]], dict[str, float]]:
        """``(history rows, terms of the latest step)``; a collective: every rank calls it at the same step."""
        if not self._terms:
            return [], {}
        values = _mean_terms(torch.stack(self._terms))
        rows = [{"step": row["step"], **dict(zip(LOSS_TERMS, v)), **row} for row, v in zip(self._rows, values)]
        kept = [r for r, keep in zip(rows, self._keep) if keep]
        self._terms, self._rows, self._keep = [], [], []
        return kept, {k: rows[-1][k] for k in (*LOSS_TERMS, "lr")}


def _prepare_worker(cfg: TrainConfig, total: int, device: torch.device, precision):
    """The explainer with its head wrapped for DDP, and the optimiser, schedule and grad scaler."""
    import ray.train.torch

    torch.manual_seed(cfg.seed)  # the same initial head on every worker
    explainer = _build_explainer(cfg).to(device)
    head = explainer.head
    if cfg.num_workers > 1 and device.type == "cuda":
        head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(head)
    # Only the head trains, so only the head is wrapped in DDP and the explainer calls the
    # wrapper; backbone and auxiliary stay plain frozen modules. On CPU, BatchNorm statistics are
    # per worker (SyncBatchNorm needs GPUs) and DDP broadcasts rank 0's running statistics.
    explainer.head = ray.train.torch.prepare_model(head)
    explainer.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    return explainer, head, optimizer, scheduler, scaler


def _train_loop_per_worker(raw: dict[str, Any]) -> dict[str, Any]:
    """The per-worker loop: Ray Data shard in, DDP step, checkpoints out; resumes a restarted run."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    per_epoch, total, marker = raw.pop("_steps_per_epoch"), raw.pop("_total_steps"), raw.pop("_marker")
    cache = raw.pop("_cache")
    cfg = TrainConfig(**raw)
    _worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.cpus_per_worker:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    precision = precision_for(cfg.amp, device, f"training worker {rank}:") if rank == 0 else choose_precision(cfg.amp, device)
    explainer, head, optimizer, scheduler, scaler = _prepare_worker(cfg, total, device, precision)

    state = {"step": 0, "epoch": 0, "epoch_step": 0, "history": [], "resumed_from": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = _restore_state(d, head, optimizer, scheduler, scaler, device)
        state["resumed_from"].append(state["step"])
        if rank == 0:
            logger.warning("resuming from the checkpoint at step %d of %d", state["step"], total)
    last_reported = state["step"]
    nodes = [ray.get_runtime_context().get_node_id()] * world
    if world > 1:
        dist.all_gather_object(nodes, nodes[0])
    state["nodes"] = nodes
    if rank == 0:
        logger.info("%d worker(s) on %d node(s), device %s, %d torch thread(s) each, steps %d..%d",
                    world, len(set(nodes)), device, torch.get_num_threads(), state["step"] + 1, total)

    def report(terms: dict[str, float]) -> None:
        """All ranks report the metrics (a barrier); rank 0 attaches the checkpoint."""
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                _save_state(d, head, optimizer, scheduler, scaler, state)
                ckpt = ray.train.Checkpoint.from_directory(d)
            metrics = {"step": state["step"], "epoch": state["epoch"], **terms}
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state['step']:07d}")

    shard = _ShardImages(ray.train.get_dataset_shard("train"), cfg, rank, cache)
    progress_every = cfg.log_every * max(1, total // 20 // cfg.log_every)  # progress lines on logged steps
    terms: dict[str, float] = {}
    losses = _LossLog()
    started, first_step = time.perf_counter(), state["step"]
    first_done = started
    heartbeat = Heartbeat(total, cfg.batch_size * world, first_step)  # a line every ~30 s between progress lines
    while state["epoch"] < cfg.epochs and state["step"] < total:
        # A resumed epoch continues with the batches it still owes (cached: the same ones; streamed:
        # a fresh pass, as Ray Data streams in no fixed order): no step is ever done twice.
        for images in shard.epoch(state["epoch"], state["epoch_step"], per_epoch):
            images = images.to(device, non_blocking=True)
            with precision.autocast(device):
                out = explainer.training_step(images)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state["step"] += 1
            state["epoch_step"] += 1
            step = state["step"]
            log, save = step % cfg.log_every == 0 or step == total, step % cfg.checkpoint_every == 0 or step == total
            if log or save:
                losses.add(out, {"step": step, "lr": lr, "elapsed": time.perf_counter() - started}, keep=log)
            progress = step % progress_every == 0 or step == total
            if save or progress:  # the only steps that read the terms: one collective for all queued
                rows, terms = losses.flush()
                state["history"].extend(rows)
            if step == first_step + 1:  # throughput counts from the first step on (start-up excluded)
                first_done = time.perf_counter()
            if rank == 0 and progress:
                rate = (step - first_step - 1) * cfg.batch_size * world / max(time.perf_counter() - first_done, 1e-9)
                logger.info("step %d/%d  loss %.4f (ce %.4f area %.4f tv %.4f deletion %.4f)  lr %.3g  %.1f img/s",
                            step, total, *(terms.get(k, float("nan")) for k in LOSS_TERMS), lr, rate)
            if rank == 0 and (line := heartbeat.tick(step, logged=progress)):
                logger.info("%s", line)
            if save:
                report(terms)
                last_reported = step
            if cfg.fail_at_step == step and rank == world - 1:
                _inject_fault(marker, step)
            if state["epoch_step"] >= per_epoch or step >= total:
                break
        state["epoch"] += 1
        state["epoch_step"] = 0
    rows, last = losses.flush()  # queued steps after the last flush (the data ran short)
    state["history"].extend(rows)
    if state["step"] != last_reported:  # the data ran short of the planned steps (dropped rows)
        report(last or terms)
    return state
