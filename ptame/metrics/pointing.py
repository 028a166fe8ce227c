"""Localisation measures with known ground truth: grid pointing game, energy in mask, pointing hit.

Grid pointing game (Rao et al., CVPR 2022): images of different classes are tiled into a grid;
the map of the class of one cell scores the share of its positive mass inside that cell (1.0
perfect, ``1 / num_cells`` for a uniform map).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import check_batch, check_maps, upsample_maps

__all__ = ["energy_in_mask", "grid_pointing_game", "pointing_hit"]


def _check_masks(masks: object, batch: int) -> Tensor:
    if not isinstance(masks, Tensor) or masks.ndim != 3 or masks.dtype != torch.bool:
        desc = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks)
        raise ValueError(f"masks must be a bool tensor of shape (B, H, W), got {desc}")
    check_batch(masks, batch, "masks", reference="saliency")
    return masks


def grid_pointing_game(
    saliency: Tensor, cells: Tensor, grid: tuple[int, int] = (2, 2)
) -> Tensor:
    """Share of each map's positive mass inside its grid cell.

    Maps are clamped at 0 and used at native resolution when ``h`` and ``w`` are divisible by the
    grid, otherwise upsampled bilinearly to the next divisible size. An all-zero map scores
    ``1 / num_cells``.

    Args:
        saliency: ``(B, h, w)`` maps.
        cells: ``(B,)`` long, the cell of each map's class, numbered row-major (``0`` top-left).
        grid: ``(rows, cols)`` of the tiling.

    Returns:
        ``(B,)`` float scores in ``[0, 1]``.
    """
    saliency = check_maps(saliency)
    if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid must be a pair of positive integers (rows, cols), got {grid!r}")
    gr, gc = grid
    num_cells = gr * gc
    if not isinstance(cells, Tensor) or cells.ndim != 1 or cells.is_floating_point():
        raise ValueError("cells must be an integer tensor of shape (B,)")
    check_batch(cells, saliency.shape[0], "cells", reference="saliency")
    if ((cells < 0) | (cells >= num_cells)).any():
        raise ValueError(f"cells must be in [0, {num_cells}) for grid {grid}")
    b, h, w = saliency.shape
    size = (math.ceil(h / gr) * gr, math.ceil(w / gc) * gc)
    maps = upsample_maps(saliency, size).clamp_min(0).double()
    mass = maps.view(b, gr, size[0] // gr, gc, size[1] // gc).sum(dim=(2, 4)).view(b, num_cells)
    total = mass.sum(1)
    inside = mass.gather(1, cells.to(mass.device).long()[:, None])[:, 0]
    score = torch.where(total > 0, inside / total.clamp_min(1e-300), 1.0 / num_cells)
    return score.to(saliency.dtype)


def energy_in_mask(saliency: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's positive mass inside its ground-truth mask.

    Args:
        saliency: ``(B, h, w)`` maps, upsampled bilinearly to the masks' size and clamped at 0.
        masks: ``(B, H, W)`` bool object masks.

    Returns:
        ``(B,)`` float scores in ``[0, 1]``; an all-zero map scores the mask's area fraction
        (what a uniform map would get).
    """
    saliency = check_maps(saliency)
    masks = _check_masks(masks, saliency.shape[0])
    maps = upsample_maps(saliency, masks.shape[-2:]).clamp_min(0).double()
    masks = masks.to(maps.device)
    total = maps.sum(dim=(1, 2))
    inside = (maps * masks).sum(dim=(1, 2))
    uniform = masks.double().mean(dim=(1, 2))
    score = torch.where(total > 0, inside / total.clamp_min(1e-300), uniform)
    return score.to(saliency.dtype)


def pointing_hit(saliency: Tensor, masks: Tensor) -> Tensor:
    """Whether each map's maximum (after upsampling to the masks' size) lies inside its mask.

    Args:
        saliency: ``(B, h, w)`` maps.
        masks: ``(B, H, W)`` bool object masks.

    Returns:
        ``(B,)`` bool; the first maximum in row-major order is used, and a constant map (no
        maximum to point at) is a miss.
    """
    saliency = check_maps(saliency)
    masks = _check_masks(masks, saliency.shape[0])
    maps = upsample_maps(saliency, masks.shape[-2:]).flatten(1)
    idx = maps.argmax(dim=1)
    hit = masks.flatten(1).to(maps.device).gather(1, idx[:, None])[:, 0]
    constant = maps.amax(1) == maps.amin(1)
    return hit & ~constant
