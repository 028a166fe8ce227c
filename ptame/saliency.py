"""One interface for P-TAME and its peers: ``saliency(method, model, images, classes)``.

``cam`` is P-TAME's own untrained starting point (the backbone's class activation map as the head,
the same map settings, no training): the peer that says what the training adds. Every method returns ``(B, h, w)`` non-negative maps of the requested classes, so that
:mod:`ptame.metrics` scores all of them with the same code. Grad-CAM, Grad-CAM++ and Score-CAM come
from the ``grad-cam`` package; RISE (Petsiuk et al., BMVC 2018) is implemented here, batched.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptame.explainer import Explainer, check_images
from ptame.head import minmax_normalize
from ptame.models import Classifier
from ptame.precision import choose_precision
from ptame.taps import probe_input

__all__ = ["EXPLAINER_METHODS", "METHODS", "SaliencyMethod", "find_target_layer", "register_method", "rise", "rise_masks", "rise_multi", "saliency"]

logger = logging.getLogger(__name__)


class SaliencyMethod(Protocol):
    def __call__(self, model: Explainer | Classifier, images: Tensor, classes: Tensor, **kwargs: Any) -> Tensor: ...


METHODS: dict[str, SaliencyMethod] = {}


def register_method(name: str) -> Callable[[SaliencyMethod], SaliencyMethod]:
    """Register a saliency method under ``name``."""

    def wrap(fn: SaliencyMethod) -> SaliencyMethod:
        METHODS[name] = fn
        return fn

    return wrap


def _backbone(model: Explainer | Classifier) -> Classifier:
    if isinstance(model, Explainer):
        return model.backbone
    if isinstance(model, Classifier):
        return model
    raise TypeError(f"model must be an Explainer or a Classifier, got {type(model).__name__}")


def saliency(
    method: str, model: Explainer | Classifier, images: Tensor, classes: Tensor, **kwargs: Any
) -> Tensor:
    """Saliency maps of ``classes`` for ``images`` by ``method``.

    Args:
        method: one of :data:`METHODS` (``ptame``, ``gradcam``, ``gradcampp``, ``scorecam``, ``rise``).
        model: an :class:`Explainer` (required for ``ptame``) or the backbone :class:`Classifier`.
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        classes: ``(B,)`` class index per image.

    Returns:
        ``(B, h, w)`` maps in ``[0, 1]`` (resolution depends on the method).
    """
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {sorted(METHODS)}")
    check_images(images)
    classes = torch.as_tensor(classes, dtype=torch.long, device=images.device)
    if classes.shape != (images.shape[0],):
        raise ValueError(f"classes must have shape ({images.shape[0]},), got {tuple(classes.shape)}")
    return METHODS[method](model, images, classes, **kwargs)


@register_method("ptame")
def _ptame(model: Explainer | Classifier, images: Tensor, classes: Tensor, **_: Any) -> Tensor:
    if not isinstance(model, Explainer):
        raise TypeError("the 'ptame' method needs a trained Explainer, not a bare classifier")
    return model.explain(images, classes=classes[:, None]).saliency[:, 0]


#: methods that need the :class:`Explainer`, not only its backbone
EXPLAINER_METHODS = ("ptame", "cam")

_STARTING_POINTS: weakref.WeakKeyDictionary[Explainer, tuple[float, Explainer]] = weakref.WeakKeyDictionary()


@register_method("cam")
def _cam(model: Explainer | Classifier, images: Tensor, classes: Tensor, cam_scale: float | None = None, **_: Any) -> Tensor:
    """The explainer's untrained start; ``cam_scale`` defaults to the one its training started from (else 0.5)."""
    if not isinstance(model, Explainer):
        raise TypeError("the 'cam' method is an explainer's starting point: it needs an Explainer, not a bare classifier")
    if cam_scale is None:
        cam_scale = float(((model.saved_extra or {}).get("train") or {}).get("cam_scale", 0.5))
    scale, start = _STARTING_POINTS.get(model, (None, None))
    if start is None or scale != cam_scale:
        start = model.starting_point(cam_scale)
        _STARTING_POINTS[model] = (cam_scale, start)
    return start.explain(images, classes=classes[:, None]).saliency[:, 0]


def find_target_layer(model: nn.Module, input_size: int = 224) -> tuple[str, nn.Module]:
    """The last module producing a spatial ``(B, C, h, w)`` map with ``h, w > 1`` (CNNs).

    Raises:
        ValueError: no such layer (e.g. a vision transformer): pass ``target_layer`` by name.
    """
    found: list[tuple[str, nn.Module]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1:
                found.append((name, m))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(probe_input(model, input_size))  # on the model's device: a CPU probe fails on a GPU model
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError("no convolutional layer found for CAM methods; pass target_layer='<module name>'")
    name, module = found[-1]
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()) or type(model).__name__.startswith("Vision"):
        raise ValueError(
            f"{type(model).__name__} looks like a vision transformer; CAM methods need target_layer and a "
            "reshape transform, which ptame does not choose automatically"
        )
    return name, module


def _cam(cam_cls_name: str) -> SaliencyMethod:
    def run(
        model: Explainer | Classifier,
        images: Tensor,
        classes: Tensor,
        target_layer: str | None = None,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> Tensor:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        backbone = _backbone(model)
        if target_layer is None:
            target_layer, layer = find_target_layer(backbone.model, backbone.preprocessing.input_size)
        else:
            modules = dict(backbone.model.named_modules())
            if target_layer not in modules:
                raise ValueError(f"target_layer {target_layer!r} is not a module of the backbone")
            layer = modules[target_layer]
        cam = getattr(pytorch_grad_cam, cam_cls_name)(model=backbone, target_layers=[layer])
        if hasattr(cam, "batch_size"):
            cam.batch_size = batch_size
        out = []
        wanted = classes.tolist()  # one host sync, not one per image
        try:
            for start in range(0, images.shape[0], batch_size):
                chunk = images[start : start + batch_size].detach().clone().requires_grad_(True)
                targets = [ClassifierOutputTarget(c) for c in wanted[start : start + batch_size]]
                out.append(torch.from_numpy(cam(input_tensor=chunk, targets=targets)).float())
        finally:
            cam.activations_and_grads.release()
        return torch.cat(out).clamp_(0, 1).to(images.device)

    return run


METHODS["gradcam"] = _cam("GradCAM")
METHODS["gradcampp"] = _cam("GradCAMPlusPlus")
METHODS["scorecam"] = _cam("ScoreCAM")


def rise_masks(n: int, size: tuple[int, int], cells: int = 7, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """``(n, 1, H, W)`` smooth random masks: upsampled binary grids, randomly shifted (RISE)."""
    h, w = size
    cell_h, cell_w = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(n, 1, cells, cells, generator=generator) < p).float()
    up = F.interpolate(grid, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell_h, (n,), generator=generator)
    dx = torch.randint(0, cell_w, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 1, h, w)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 1, h, w)
    flat = up.flatten(2)
    return flat.gather(2, (rows * up.shape[-1] + cols).flatten(2)).view(n, 1, h, w)


def rise_multi(
    backbone: Classifier,
    images: Tensor,
    classes: Tensor,
    num_masks: int = 4000,
    cells: int = 7,
    p: float = 0.5,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    amp: bool | str = "auto",
) -> Tensor:
    """RISE maps of several classes per image from one set of masked forward passes.

    RISE's cost is the ``num_masks`` backbone passes, and every pass yields the probabilities of
    all classes, so extra classes (e.g. the grid pointing game's four cells) come for free.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        classes: ``(B, k)`` classes to explain per image.
        amp: autocast the masked passes (:func:`ptame.precision.choose_precision`; ``"auto"``: only
            where bf16 is native, about 2.5x faster there, 20x slower where emulated); the
            probabilities are averaged in float32.

    Returns:
        ``(B, k, H, W)`` maps, min-max normalised per map.
    """
    if classes.dim() != 2 or classes.shape[0] != images.shape[0]:
        raise ValueError(f"classes must have shape (B, k) with B = {images.shape[0]}, got {tuple(classes.shape)}")
    generator = torch.Generator().manual_seed(seed)
    masks = rise_masks(num_masks, tuple(images.shape[-2:]), cells, p, generator).to(images.device)
    maps = torch.zeros(images.shape[0], classes.shape[1], *images.shape[-2:], device=images.device)
    precision = choose_precision(amp, images.device)
    with torch.inference_mode():
        for i in tqdm(range(images.shape[0]), desc=f"RISE N={num_masks}", disable=None if progress else True, leave=False):
            for start in range(0, num_masks, batch_size):
                m = masks[start : start + batch_size]
                with precision.autocast(images.device):
                    logits = backbone(images[i : i + 1] * m)
                probs = logits.float().softmax(1)[:, classes[i]]  # (n, k)
                maps[i] += torch.einsum("nk,nhw->khw", probs, m[:, 0])
    return minmax_normalize(maps / (num_masks * p))


@register_method("rise")
def rise(
    model: Explainer | Classifier,
    images: Tensor,
    classes: Tensor,
    num_masks: int = 4000,
    cells: int = 7,
    p: float = 0.5,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    amp: bool | str = "auto",
    **_: Any,
) -> Tensor:
    """RISE (Petsiuk et al., 2018): the mean of random masks weighted by the class probability."""
    return rise_multi(_backbone(model), images, classes[:, None], num_masks, cells, p, batch_size, seed, progress, amp)[:, 0]
