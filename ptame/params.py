"""``params.yaml`` access for the pipeline: dotted keys, and errors that name the missing key.

Every DVC stage reads its knobs through :class:`Params` so that a missing or mistyped key fails
with ``params.yaml: missing key 'train.batch_size'`` instead of a bare ``KeyError`` deep inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ptame.losses import LossWeights
from ptame.maps import MapSettings

__all__ = [
    "CLASS_NAMES_DIR", "KNOWN_KEYS", "MissingParamError", "Params", "UnknownParamError", "check_class_names_file",
    "check_keys", "load_params",
]  # fmt: skip

_MISSING = object()


class MissingParamError(KeyError):
    """A key the pipeline needs is absent from the params file; the message names it."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class UnknownParamError(ValueError):
    """The params file holds a key the pipeline does not know (a typo); the message names the nearest one."""


#: a section whose keys are the user's own (method names, preprocessing overrides)
OPEN = "open"
#: every key of ``params.yaml``: a mapping is a section, ``None`` any value, :data:`OPEN` any sub-keys
KNOWN_KEYS: dict[str, Any] = {
    "model": {"backbone": None, "pretrained": None, "auxiliary": None, "stages": None, "preprocessing": OPEN, "class_names": None,
              **dict.fromkeys(f.name for f in fields(MapSettings))},  # the maps stage applies them
    "data": {
        "source": None, "eval_fraction": None, "split_seed": None, "max_images": None, "shard_rows": None,
        "demo": dict.fromkeys(("train_images", "grid_fraction", "eval_images", "single_images", "image_size", "seed", "eval_seed", "min_score")),
    },
    "train": {
        **dict.fromkeys((
            "epochs", "max_steps", "batch_size", "lr", "weight_decay", "head_init", "cam_scale", "augment", "num_workers",
            "cpus_per_worker", "cache_gb", "use_gpu", "amp", "storage_path", "run_name", "checkpoint_every",
            "max_failures", "seed", "ray_address", "log_every", "crop_scale",
        )),
        "loss": dict.fromkeys(f.name for f in fields(LossWeights)),  # whatever the loss accepts
    },
    "evaluate": {
        "seed": None, "max_images": None, "batch_size": None, "methods": OPEN,
        "road": dict.fromkeys(("percentages", "imputer", "noise_std", "seed")),
        "bootstrap": dict.fromkeys(("resamples", "seed")),
        "gallery": dict.fromkeys(("images", "methods")),
    },
    "register": dict.fromkeys(("name", "alias", "decide_by", "tracking_uri", "experiment")),
    "explain": dict.fromkeys(("batch_size", "concurrency", "topk", "use_gpu", "view", "maps")),
}  # fmt: skip


#: the folder ``dvc.yaml`` lists as a dependency of ``train``: ``model.class_names`` files live there
CLASS_NAMES_DIR = "classes"


def map_settings(params: "Params") -> MapSettings:
    """The explain-time :class:`MapSettings` from ``model.<field>`` (a missing one keeps its default, 0: the paper's maps)."""
    return MapSettings(**{f.name: float(params.get(f"model.{f.name}", f.default)) for f in fields(MapSettings)})


def check_class_names_file(value: Any, root: str | Path = ".") -> None:
    """Refuse a ``model.class_names`` file outside ``<root>/classes/``: DVC would not rerun train when it changes."""
    if not isinstance(value, (str, Path)):
        return  # a list in params.yaml (a tracked param) or null
    folder = (Path(root) / CLASS_NAMES_DIR).resolve()
    path = (Path(root) / value).resolve()
    if not path.is_relative_to(folder):
        raise ValueError(
            f"params.yaml: model.class_names {str(value)!r} lies outside {CLASS_NAMES_DIR}/, the folder dvc.yaml lists "
            f"as a dependency of train; move the file to {CLASS_NAMES_DIR}/ and set model.class_names: "
            f"{CLASS_NAMES_DIR}/{Path(value).name} so that editing it reruns training"
        )


def _known_paths(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of ``schema``, sections included."""
    out: list[str] = []
    for key, sub in schema.items():
        path = f"{prefix}.{key}" if prefix else key
        out.append(path)
        if isinstance(sub, Mapping):
            out += _known_paths(sub, path)
    return out


def _unknown(data: Mapping[str, Any], schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of ``data`` that ``schema`` does not know."""
    out: list[str] = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            out.append(path)
        elif isinstance(schema[key], Mapping) and isinstance(value, Mapping):
            out += _unknown(value, schema[key], path)
    return out


def _suggestion(path: str, known: list[str]) -> str:
    """`` (did you mean explain.topk?)`` for the nearest known key, or nothing."""
    import difflib

    parent = path.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    match = difflib.get_close_matches(path, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(path, known, n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def check_keys(params: "Params", schema: Mapping[str, Any] = KNOWN_KEYS) -> None:
    """Raise :class:`UnknownParamError` naming each unknown key of ``params`` and its nearest known key."""
    unknown = _unknown(params._data, schema)
    if unknown:
        known = _known_paths(schema)
        lines = [f"{k}{_suggestion(k, known)}" for k in unknown]
        raise UnknownParamError(f"{params.source}: unknown key{'s' if len(lines) > 1 else ''} " + "; ".join(lines))


class Params:
    """Read-only view of a nested params mapping with dotted-key lookup.

    Args:
        data: the parsed YAML mapping.
        source: file name used in error messages.
        prefix: dotted path of this view inside the file (for sub-sections).
    """

    def __init__(self, data: Mapping[str, Any], source: str = "params.yaml", prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            where = f"'{prefix}'" if prefix else "the top level"
            raise TypeError(f"{source}: {where} must be a mapping of keys to values, got {type(data).__name__}")
        self._data = data
        self.source = source
        self.prefix = prefix

    def _full(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value at dotted ``key``; ``default`` if given and absent, else :class:`MissingParamError`.

        Mappings come back as :class:`Params` views so that nested misses still name the full key.
        """
        node: Any = self._data
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, Mapping) or part not in node:
                if default is not _MISSING:
                    return default
                missing = self._full(".".join(parts[: i + 1]))
                raise MissingParamError(f"{self.source}: missing key '{missing}'")
            node = node[part]
        return Params(node, self.source, self._full(key)) if isinstance(node, Mapping) else node

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key, _MISSING_SENTINEL) is not _MISSING_SENTINEL

    def to_dict(self) -> dict[str, Any]:
        """A plain (deep) copy of this section."""
        return _plain(self._data)

    def flat(self) -> dict[str, Any]:
        """``{"train.batch_size": 8, ...}``: leaves by dotted key (for logging params to MLflow)."""
        out: dict[str, Any] = {}

        def walk(node: Mapping[str, Any], prefix: str) -> None:
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, Mapping):
                    walk(v, key)
                else:
                    out[key] = v

        walk(self._data, self.prefix)
        return out

    def __repr__(self) -> str:
        return f"Params({self.source!r}, prefix={self.prefix!r}, keys={list(self._data)})"


_MISSING_SENTINEL = object()


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse ``path`` (YAML) into :class:`Params`.

    Raises:
        FileNotFoundError: no such file (run from the project root, where ``dvc.yaml`` lives).
        ValueError: the file is not valid YAML or not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; run the stage from the project root (where dvc.yaml is)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{p} must hold a mapping of sections (prepare, train, ...), got {type(data).__name__}")
    return Params(data, source=p.name)
