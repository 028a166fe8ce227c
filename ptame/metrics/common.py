"""Shared helpers of the evaluation measures: input checks, map upsampling, batched inference."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Classifier",
    "batched_logits",
    "check_batch",
    "check_images",
    "check_maps",
    "check_positive_int",
    "check_targets",
    "upsample_maps",
]

Classifier = Callable[[Tensor], Tensor]
"""Maps ``(B, 3, H, W)`` float images in ``[0, 1]`` to logits ``(B, K)``; normalises internally."""


def _check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_finite(x: Tensor, name: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN values")
    if torch.isinf(x).any():
        raise ValueError(f"{name} contains infinite values")


def check_maps(saliency: object, name: str = "saliency") -> Tensor:
    """Check a stack of maps ``(B, h, w)``: 3-D, floating point, non-empty, finite.

    Returns:
        The same tensor (unchanged), typed as ``Tensor``.

    Raises:
        ValueError: naming ``name`` when a check fails.
    """
    x = _check_tensor(saliency, name)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, h, w), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    _check_finite(x, name)
    return x


def check_images(images: object, name: str = "images") -> Tensor:
    """Check a batch of images ``(B, C, H, W)``: 4-D, floating point, non-empty, finite."""
    x = _check_tensor(images, name)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    _check_finite(x, name)
    return x


def check_targets(targets: object, batch: int, name: str = "targets") -> Tensor:
    """Check class indices ``(B,)``: 1-D, integer dtype, ``batch`` entries, non-negative."""
    x = _check_tensor(targets, name)
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    check_batch(x, batch, name)
    if (x < 0).any():
        raise ValueError(f"{name} must hold non-negative class indices")
    return x


def check_batch(x: Tensor, batch: int, name: str, reference: str = "images") -> None:
    """Raise ``ValueError`` unless ``x`` has ``batch`` entries along dim 0."""
    if x.shape[0] != batch:
        raise ValueError(
            f"batch size mismatch: {name} has {x.shape[0]} entries but {reference} has {batch}"
        )


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as ``int`` if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def upsample_maps(saliency: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize maps bilinearly (``align_corners=False``) to ``size``.

    Args:
        saliency: maps ``(B, h, w)``.
        size: target ``(H, W)``.

    Returns:
        Maps ``(B, H, W)`` in the input's dtype and device (the input itself if already ``size``).
    """
    saliency = check_maps(saliency)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be a pair of positive integers (H, W), got {size!r}")
    size = (int(size[0]), int(size[1]))
    if tuple(saliency.shape[-2:]) == size:
        return saliency
    out = F.interpolate(saliency[:, None], size=size, mode="bilinear", align_corners=False)
    return out[:, 0]


def batched_logits(classifier: Classifier, images: Tensor, batch_size: int) -> Tensor:
    """Run ``classifier`` on ``images`` ``(B, C, H, W)`` in mini-batches under inference mode.

    Returns:
        Logits ``(B, K)``, on the device the classifier returns them on.
    """
    check_positive_int(batch_size, "batch_size")
    outs = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            logits = classifier(chunk)
            if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != len(chunk):
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"classifier must return logits of shape (B, K), got {shape}")
            outs.append(logits)
    return torch.cat(outs)
