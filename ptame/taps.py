"""Feature maps tapped out of a network's forward pass with forward hooks.

One mechanism (:class:`OutputTaps`) serves both users: a torchvision classifier turned into the
auxiliary's feature pyramid (:class:`HookPyramid`), and the backbone's own feature maps read during
its prediction pass (:class:`BackboneTaps`, ``auxiliary: backbone``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ptame.models import Classifier

__all__ = [
    "BACKBONE_AUX",
    "BackboneTaps",
    "HookPyramid",
    "OutputTaps",
    "backbone_taps",
    "classifier_weight",
    "default_taps",
    "probe_input",
    "stride_blocks",
]

#: the ``auxiliary`` URI that taps the backbone's own feature maps instead of a second network
BACKBONE_AUX = "backbone"

T = TypeVar("T")


def probe_input(model: nn.Module, size: int) -> Tensor:
    """A ``(1, 3, size, size)`` zero image on the model's device and floating dtype, for shape probes.

    A probe on the CPU fails once the model lives on a GPU (or in half precision).
    """
    device, dtype = torch.device("cpu"), torch.float32
    for t in itertools.chain(model.parameters(), model.buffers()):
        device = t.device
        if t.is_floating_point():
            dtype = t.dtype
            break
    return torch.zeros(1, 3, size, size, device=device, dtype=dtype)


def default_taps(reductions: Sequence[int]) -> list[int]:
    """Stages with stride 4 to 32 (the paper's four ResNet stages); all stages if none qualify."""
    taps = [i for i, r in enumerate(reductions) if 4 <= r <= 32]
    return taps or list(range(len(reductions)))


def stride_blocks(model: nn.Module, size: int) -> list[tuple[str, int, int]]:
    """For each stride, the last top-level block (at most two name levels) that finishes at it.

    Returns ``(module name, reduction, channels)`` sorted by reduction.
    """
    last: dict[int, tuple[str, int, int]] = {}
    handles = []

    def record(name: str):  # noqa: ANN202 - hook factory
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1:
                red = size // out.shape[-1]
                last[red] = (name, red, int(out.shape[1]))

        return hook

    for name, module in model.named_modules():
        if name and name.count(".") <= 1:
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.inference_mode():
            model(probe_input(model, size))
    finally:
        for h in handles:
            h.remove()
    return [last[r] for r in sorted(last)]


class OutputTaps:
    """Forward hooks on ``model``'s submodules ``names`` that keep their outputs during :meth:`run` only."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self._capture = False
        self._outputs: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        for name in self.names:
            modules[name].register_forward_hook(self._keep(name))

    def _keep(self, name: str):  # noqa: ANN202 - hook factory
        def hook(_m: nn.Module, _i: object, out: Tensor) -> None:
            if self._capture:
                self._outputs[name] = out

        return hook

    def run(self, call: Callable[[], T]) -> tuple[T, list[Tensor]]:
        """``call()``'s result and the tapped outputs it produced, in the order of ``names``; hooks stay off otherwise."""
        self._capture = True
        try:
            result = call()
            return result, [self._outputs[n] for n in self.names]
        finally:
            self._capture = False
            self._outputs = {}


class HookPyramid(nn.Module):
    """Runs a whole model and returns the outputs of the named submodules, in order."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self._taps = OutputTaps(model, self.names)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self._taps.run(lambda: self.model(x))[1]


class BackboneTaps(nn.Module):
    """The backbone's own feature maps as the auxiliary pyramid (``auxiliary: backbone``).

    As in TAME, the head reads the features of the network it explains, so one backbone pass gives
    both the prediction and the head's input (:meth:`logits_and_features`): an explanation costs
    one forward pass instead of two. Needs a CNN backbone (spatial feature maps).
    """

    shares_backbone = True

    def __init__(self, backbone: Classifier, stages: Sequence[int] | None = None) -> None:
        super().__init__()
        blocks = stride_blocks(backbone.model, backbone.preprocessing.input_size)
        if not blocks:
            raise ValueError(
                f"auxiliary 'backbone': {backbone.uri or type(backbone.model).__name__} has no spatial feature "
                "maps to tap (a vision transformer?); use a CNN auxiliary such as builtin:efficientnet_lite0"
            )
        taps = list(stages) if stages is not None else default_taps([r for _, r, _ in blocks])
        bad = [t for t in taps if not 0 <= t < len(blocks)]
        if bad:
            raise ValueError(f"stages {bad} out of range: the backbone has {len(blocks)} tappable stages {blocks}")
        chosen = [blocks[i] for i in taps]
        self.backbone = backbone
        self.names = [n for n, _, _ in chosen]
        self.channels = [c for _, _, c in chosen]
        self.reductions = [r for _, r, _ in chosen]
        self.preprocessing = backbone.preprocessing
        self.uri = BACKBONE_AUX
        self._taps = OutputTaps(backbone.model, self.names)
        self.train(False)

    def train(self, mode: bool = True) -> BackboneTaps:
        return super().train(False)

    def logits_and_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """One backbone pass: its logits ``(B, K)`` and the tapped maps."""
        return self._taps.run(lambda: self.backbone(images))

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.logits_and_features(images)[1]


def backbone_taps(backbone: Classifier, stages: Sequence[int] | None = None) -> BackboneTaps:
    """The backbone's stride 4..32 blocks (the last at each stride) as the auxiliary pyramid."""
    return BackboneTaps(backbone, stages)


def classifier_weight(backbone: Classifier, channels: int) -> Tensor | None:
    """``(K, channels)`` weights of the backbone's final linear layer, if it maps pooled features of
    ``channels`` channels to its ``K`` classes (the layer class activation maps are made of)."""
    linears = [m for m in backbone.model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    last = linears[-1]
    if last.out_features != backbone.num_classes or last.in_features != channels:
        return None
    return last.weight.detach()
