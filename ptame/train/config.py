"""The settings of a training run (:class:`TrainConfig`), what it produced (:class:`TrainResult`), and
what both the driver and the workers derive from the settings alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ptame.losses import LossWeights
from ptame.maps import MapSettings
from ptame.models import Preprocessing
from ptame.precision import check_amp

__all__ = [
    "HEAD_INITS", "LOSS_TERMS", "NOT_FINGERPRINTED", "TrainConfig", "TrainResult", "build_explainer", "is_uri",
    "training_preprocessing",
]  # fmt: skip

LOSS_TERMS = ("loss", "ce", "area", "tv", "deletion")
HEAD_INITS = ("random", "cam")
_PREP_FIELDS = {f.name for f in fields(Preprocessing)}
#: settings that do not change what is learned: left out of the run fingerprint
NOT_FINGERPRINTED = {
    "output_dir", "use_gpu", "storage_path", "run_name", "checkpoint_every", "max_failures",
    "ray_address", "log_every", "fail_at_step", "resume", "cpus_per_worker", "placement_strategy", "cache_gb",
    "amp",  # numerics only: a run resumed on other hardware may change precision
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; plain values (and :class:`MapSettings`, a dict in ``asdict(cfg)``), so it travels as ``asdict(cfg)``.

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
        maps: the saved explainer's :class:`~ptame.maps.MapSettings` (or a dict of its fields);
            trained on with ``loss["maps"] == "explained"``.
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
    maps: MapSettings = field(default_factory=MapSettings)
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
        if isinstance(self.maps, dict):  # as it travels, in asdict(cfg)
            object.__setattr__(self, "maps", MapSettings.from_dict(self.maps))
        if not isinstance(self.maps, MapSettings):
            raise TypeError(f"TrainConfig.maps must be a MapSettings or a dict of its fields, got {type(self.maps).__name__}")
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
            raise TypeError("TrainConfig.class_names must be a list of non-empty strings (see classes.read_class_names)")
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


def is_uri(path: str) -> bool:
    return "://" in path


def training_preprocessing(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved preprocessing at the training crop size (``crop_scale`` x ``input_size``), resize scaled alike."""
    prep = dict(cfg.preprocessing)
    if cfg.crop_scale != 1:
        side = max(1, round(prep["input_size"] * cfg.crop_scale))
        prep.update(input_size=side, resize=max(side, round(prep["resize"] * cfg.crop_scale)))
    return prep


def build_explainer(cfg: TrainConfig):  # -> Explainer
    """The untrained explainer these settings describe (the head seeded by the caller), as every worker builds it."""
    from ptame.explainer import Explainer

    explainer = Explainer.from_uris(
        cfg.backbone, cfg.auxiliary, stages=cfg.stages, pretrained=cfg.pretrained,
        loss_weights=LossWeights(**cfg.loss), preprocessing=Preprocessing.from_dict(cfg.preprocessing),
        class_names=cfg.class_names, maps=cfg.maps,
    )
    if cfg.head_init == "cam":
        explainer.init_head_from_classifier(cfg.cam_scale)
    return explainer
