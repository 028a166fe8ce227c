"""Average Drop (AD) and Increase in Confidence (IC) at several kept fractions of the map.

The map, upsampled to the input size, keeps its top ``r`` fraction of pixels with their soft
values (the rest set to zero); the ``[0, 1]`` image is multiplied by it and re-classified. With
``y`` the softmax probability of the target on the original and ``o`` on the masked image:
``AD = mean(max(0, y - o) / y) * 100`` (lower is better), ``IC = mean(o > y) * 100`` (higher is
better).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from .common import (
    Classifier,
    batched_logits,
    check_batch,
    check_images,
    check_maps,
    check_positive_int,
    check_targets,
    upsample_maps,
)

__all__ = ["average_drop_increase", "average_drop_increase_per_image", "keep_top_fraction"]

logger = logging.getLogger(__name__)


def _check_fraction(fraction: float, name: str = "fraction") -> float:
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction}")
    return fraction


def keep_top_fraction(maps: Tensor, fraction: float) -> Tensor:
    """Keep each map's top ``fraction`` of pixels with their values and zero the rest.

    Exactly ``max(1, round(fraction * H * W))`` pixels are kept per map (ties broken by
    ``torch.topk``); ``fraction == 1`` returns a copy of the maps.

    Args:
        maps: ``(B, H, W)`` maps.
        fraction: share of pixels to keep, in ``(0, 1]``.

    Returns:
        ``(B, H, W)`` maps, same dtype and device.
    """
    maps = check_maps(maps, "maps")
    fraction = _check_fraction(fraction)
    flat = maps.flatten(1)
    n = flat.shape[1]
    k = max(1, round(fraction * n))
    if k >= n:
        return maps.clone()
    idx = flat.topk(k, dim=1).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * keep).view_as(maps)


def _target_probs(logits: Tensor, targets: Tensor) -> Tensor:
    probs = torch.softmax(logits.double(), dim=1)
    return probs.gather(1, targets.to(probs.device)[:, None])[:, 0]


def average_drop_increase_per_image(
    classifier: Classifier,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    fractions: Sequence[float] = (1.0, 0.5, 0.15),
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Per-image AD and IC terms (percent), whose means are :func:`average_drop_increase` (for bootstraps).

    Args as :func:`average_drop_increase`.

    Returns:
        ``{"AD@100": (B,), "IC@100": (B,), ...}`` float64 on the CPU: ``AD`` holds
        ``100 * max(0, y - o) / y`` per image and ``IC`` holds ``100`` where ``o > y``, else ``0``.
    """
    images = check_images(images)
    saliency = check_maps(saliency)
    batch = images.shape[0]
    check_batch(saliency, batch, "saliency")
    targets = check_targets(targets, batch)
    check_positive_int(batch_size, "batch_size")
    fractions = [_check_fraction(r, "fractions") for r in fractions]
    if not fractions:
        raise ValueError("fractions must not be empty")
    if saliency.min() < 0 or saliency.max() > 1 + 1e-6:
        raise ValueError(
            "saliency must have values in [0, 1] for AD/IC (min-max normalise the maps), got "
            f"range [{saliency.min().item():.4g}, {saliency.max().item():.4g}]"
        )

    drops: dict[float, list[Tensor]] = {r: [] for r in fractions}
    rises: dict[float, list[Tensor]] = {r: [] for r in fractions}
    for start in range(0, batch, batch_size):
        img = images[start : start + batch_size]
        tgt = targets[start : start + batch_size]
        logits = batched_logits(classifier, img, batch_size)
        if tgt.max() >= logits.shape[1]:
            raise ValueError(f"targets hold a class index >= number of logits {logits.shape[1]}")
        y = _target_probs(logits, tgt)
        maps = upsample_maps(saliency[start : start + batch_size].to(img.device), img.shape[-2:])
        for r in fractions:
            masked = img * keep_top_fraction(maps, r).to(img.dtype)[:, None]
            o = _target_probs(batched_logits(classifier, masked, batch_size), tgt)
            drops[r].append(((y - o).clamp_min(0) / y.clamp_min(torch.finfo(y.dtype).tiny)).cpu())
            rises[r].append((o > y).cpu())
    out: dict[str, Tensor] = {}
    for r in fractions:
        tag = round(100 * r)
        out[f"AD@{tag}"] = 100.0 * torch.cat(drops[r]).double()
        out[f"IC@{tag}"] = 100.0 * torch.cat(rises[r]).double()
    return out


def average_drop_increase(
    classifier: Classifier,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    fractions: Sequence[float] = (1.0, 0.5, 0.15),
    batch_size: int = 32,
) -> dict[str, float]:
    """AD and IC (percent) for each kept fraction of the saliency maps.

    Args:
        classifier: ``(B, 3, H, W)`` images in ``[0, 1]`` -> logits ``(B, K)``.
        images: ``(B, 3, H, W)`` images in ``[0, 1]``.
        saliency: ``(B, h, w)`` maps of the target class with values in ``[0, 1]`` (e.g. min-max
            normalised); upsampled bilinearly to ``(H, W)``.
        targets: ``(B,)`` class indices (the classifier's own predictions in the paper).
        fractions: kept fractions ``r`` in ``(0, 1]``.
        batch_size: images per classifier call.

    Returns:
        ``{"AD@100": ..., "IC@100": ..., "AD@50": ..., ...}``, keys from ``round(100 * r)``.
    """
    per_image = average_drop_increase_per_image(classifier, images, saliency, targets, fractions, batch_size)
    out = {key: values.mean().item() for key, values in per_image.items()}
    logger.debug("AD/IC over %d images: %s", images.shape[0], out)
    return out
