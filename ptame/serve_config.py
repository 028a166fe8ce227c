"""The settings of one served application, as one frozen object: model, registry, limits, batching, resources.

:class:`ServeConfig` is what ``ptame serve`` builds from its flags and what a Serve config file's
``args`` (a dict) become at the door (:meth:`ServeConfig.from_args`); the deployment and every
replica receive it whole. It holds two parts with their own life: :class:`ServeSettings` (per-request
limits, fixed for a replica's life) and :class:`BatchConfig` (the deployment's ``user_config``,
changed live through ``reconfigure``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["BatchConfig", "ServeConfig", "ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """Per-request limits and defaults of the server (passed to every replica).

    Attributes:
        max_body_bytes: larger request bodies are refused with 413.
        max_pixels: decoded images with more pixels are refused with 400 (decompression bombs).
        max_aspect_ratio: longer / shorter side above this is refused with 400 (the resize to the
            model's input would otherwise blow up the memory of a 1 x 100000 image).
        default_topk: top-k classes answered when a request does not say (capped at the classes).
        decode_threads: threads per replica that decode images and encode PNGs.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_aspect_ratio: float = 32.0
    default_topk: int = 5
    decode_threads: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{f.name} must be a number, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{f.name} must be >= 1, got {value}")


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching knobs; the deployment's ``user_config`` (changed without a restart)."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) or self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s!r}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything one served application is built from.

    Attributes:
        model: the operator's reference: ``models:/<name>@<alias>``, ``models:/<name>/<version>``
            or a saved explainer directory; the alias is resolved when a replica starts.
        tracking_uri: MLflow tracking/registry URI (``None``: ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db`` here).
        settings: per-request limits.
        batch: dynamic batching (the deployment's ``user_config``).
        replicas: model replicas.
        num_cpus: CPUs per replica, also its torch threads.
        use_gpu: one GPU per replica.
        max_ongoing_requests: requests a replica takes at once (``None``: twice ``max_batch_size``).
        max_queued_requests: requests waiting at the proxy before it answers 503 (-1: no limit).
    """

    model: str
    tracking_uri: str | None = None
    settings: ServeSettings = field(default_factory=ServeSettings)
    batch: BatchConfig = field(default_factory=BatchConfig)
    replicas: int = 1
    num_cpus: float = 1.0
    use_gpu: bool = False
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64

    def __post_init__(self) -> None:
        _check_model_named(self.model)
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ServeConfig:
        """The config of a flat dict (a Serve config file's ``args``; keys in ``deploy/serve.yaml``).

        ``model`` is required; the other keys are the fields here, the :class:`ServeSettings` and
        :class:`BatchConfig` fields, and ``revision`` (ignored, but changing it in a config file makes
        ``serve deploy`` restart the replicas, which then resolve the alias anew). Unknown keys fail.
        """
        if not isinstance(args, dict):
            raise TypeError(f"args must be a dict, got {type(args).__name__}")
        options = dict(args)
        model = options.pop("model", None)
        _check_model_named(model)
        settings = ServeSettings(**_take(options, ServeSettings))
        batch = BatchConfig(**_take(options, BatchConfig))
        config = cls(
            model,
            tracking_uri=options.pop("tracking_uri", None),
            settings=settings,
            batch=batch,
            replicas=int(options.pop("replicas", 1)),
            num_cpus=float(options.pop("num_cpus", 1)),
            use_gpu=bool(options.pop("use_gpu", False)),
            max_ongoing_requests=int(options.pop("max_ongoing_requests", None) or 2 * batch.max_batch_size),
            max_queued_requests=int(options.pop("max_queued_requests", 64)),
        )
        options.pop("revision", None)  # only there to change a config file: Serve then rolls the replicas
        if options:
            raise ValueError(f"unknown serve options {sorted(options)}")
        return config

    @classmethod
    def of(cls, app: ServeConfig | Mapping[str, Any]) -> ServeConfig:
        """``app`` itself, or the config of a Serve config file's ``args`` dict."""
        return app if isinstance(app, ServeConfig) else cls.from_args(app)

    @property
    def from_registry(self) -> bool:
        """Whether ``model`` is a registry URI (else a directory)."""
        return self.model.startswith("models:/")

    @property
    def device(self) -> str:
        """``"cuda"`` with ``use_gpu``, else ``"cpu"``."""
        return "cuda" if self.use_gpu else "cpu"

    @property
    def ongoing_limit(self) -> int:
        """``max_ongoing_requests``, by default twice the batch size (a second batch fills while one runs)."""
        return 2 * self.batch.max_batch_size if self.max_ongoing_requests is None else self.max_ongoing_requests

    def located(self) -> ServeConfig:
        """This config as replicas elsewhere read it: the registry's SQLite path or the directory made absolute."""
        if self.from_registry:
            from ptame.registry import DEFAULT_TRACKING_URI, absolute_sqlite

            uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
            return replace(self, tracking_uri=absolute_sqlite(uri))
        return replace(self, model=str(Path(self.model).resolve()))

    def connect_registry(self) -> None:
        """Point MLflow at ``tracking_uri`` when the model comes from a registry (replicas do not
        share the driver's working directory or environment)."""
        if not self.from_registry or not self.tracking_uri:
            return
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)


def _check_model_named(model: Any) -> None:
    if not model or not isinstance(model, str):
        raise ValueError("args must name the model: models:/<name>@<alias>, models:/<name>/<version> or a directory")


def _take(options: dict[str, Any], kind: type) -> dict[str, Any]:
    """The fields of dataclass ``kind`` popped out of ``options``."""
    return {f.name: options.pop(f.name) for f in fields(kind) if f.name in options}
