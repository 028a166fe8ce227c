"""P-TAME's training loss: cross-entropy on the masked image plus area and total-variation terms.

Beyond the paper, an optional *deletion* term (Dabkowski & Gal, NeurIPS 2017) asks the image with
the mask's region removed to lose the class, so the mask must also be necessary, not only
sufficient; its weight is 0 in the paper's setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FILLS", "TRAINED_MAPS", "LossWeights", "area_loss", "deletion_loss", "share_masks", "tv_loss", "ptame_loss"]

FILLS = ("black", "blur")
TRAINED_MAPS = ("head", "explained")


@dataclass(frozen=True)
class LossWeights:
    """Weights and exponents of the loss; defaults are the paper's ResNet-50 setting.

    Attributes:
        deletion: weight of ``mean(p(t | image with the map's region removed) ** deletion_power)``.
        fill: what removed pixels become while training: ``"black"`` (the paper) or ``"blur"``
            (a heavily blurred copy of the image, closer to what ROAD's imputation makes).
        keep_shares: the masks that keep pixels, cycled over a batch's images: ``1`` the map itself
            (the paper), ``s < 1`` a soft mask of the map's top share ``s`` of pixels, so that the
            top of the map alone must keep the class (what AD@15 asks).
        delete_shares: alike for the deletion term: ``s < 1`` removes the map's top share ``s``
            (what ROAD's MoRF@10 asks: the top tenth must be essential).
        maps: the maps the loss sees: ``"head"`` the head's sigmoid maps (the paper), or
            ``"explained"`` the maps :meth:`~ptame.explainer.Explainer.explain` returns (the map
            settings' terms and smoothing added to the head's logits; min-max for the masks), so
            the head learns what the judged maps lack rather than what the map terms already give.
        share_sharpness: the soft top-share mask is ``sigmoid(sharpness * (M - q) / (max M - min M))``
            around the share's quantile ``q`` of each map.
    """

    ce: float = 0.1614
    area: float = 0.8386
    tv: float = 0.0
    area_power: float = 0.3
    tv_power: float = 2.0
    tv_border: float = 0.3
    deletion: float = 0.0
    deletion_power: float = 0.3
    fill: str = "black"
    keep_shares: Sequence[float] = (1.0,)
    delete_shares: Sequence[float] = (1.0,)
    share_sharpness: float = 20.0
    maps: str = "head"

    def __post_init__(self) -> None:
        for name in ("keep_shares", "delete_shares"):
            shares = tuple(float(s) for s in getattr(self, name))
            if not shares or not all(0.0 < s <= 1.0 for s in shares):
                raise ValueError(f"loss {name!r} must be a non-empty list of shares in (0, 1], got {list(shares)}")
            object.__setattr__(self, name, shares)
        if not self.share_sharpness > 0:
            raise ValueError(f"share_sharpness must be > 0, got {self.share_sharpness}")
        if self.maps not in TRAINED_MAPS:
            raise ValueError(f"loss maps must be one of {TRAINED_MAPS}, got {self.maps!r}")
        if self.fill not in FILLS:
            raise ValueError(f"loss fill must be one of {FILLS}, got {self.fill!r}")
        for name in ("ce", "area", "tv", "tv_border", "deletion"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("area_power", "tv_power", "deletion_power"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name!r} must be > 0, got {getattr(self, name)}")


def share_masks(maps: Tensor, shares: Sequence[float], sharpness: float = 20.0) -> Tensor:
    """Image ``i``'s map ``(B, h, w)`` as a soft mask of its top share ``shares[i % len(shares)]`` of pixels.

    A share of 1 keeps the map itself. The threshold is the map's own quantile (no gradient); the
    gradient reaches the pixels around it, which is where the ranking is decided.
    """
    b = maps.shape[0]
    share = torch.tensor([shares[i % len(shares)] for i in range(b)], device=maps.device, dtype=maps.dtype)
    if bool((share >= 1).all()):
        return maps
    flat = maps.flatten(1)
    ordered = flat.detach().sort(dim=1, descending=True).values
    k = ((share * flat.shape[1]).ceil().long() - 1).clamp(0, flat.shape[1] - 1)
    threshold = ordered.gather(1, k[:, None])
    spread = (ordered[:, :1] - ordered[:, -1:]).clamp_min(1e-6)
    soft = torch.sigmoid(sharpness * (flat - threshold) / spread).view_as(maps)
    return torch.where((share >= 1).view(b, 1, 1), maps, soft)


def area_loss(maps: Tensor, power: float = 0.3, offset: float = 0.0005) -> Tensor:
    """``mean((M + 0.0005) ** p)`` over all maps and pixels; pushes masks towards zero."""
    return (maps + offset).pow(power).mean()


def tv_loss(maps: Tensor, power: float = 2.0, border: float = 0.3) -> Tensor:
    """Total variation of ``(B, n, h, w)`` maps with a border penalty, divided by ``q * B``.

    ``[sum |dy|^q + sum |dx|^q + b * sum M^q over the 4 border rows/columns] / (q * B)``.
    """
    dy = (maps[..., 1:, :] - maps[..., :-1, :]).abs().pow(power).sum()
    dx = (maps[..., :, 1:] - maps[..., :, :-1]).abs().pow(power).sum()
    edges = (
        maps[..., 0, :].pow(power).sum()
        + maps[..., -1, :].pow(power).sum()
        + maps[..., :, 0].pow(power).sum()
        + maps[..., :, -1].pow(power).sum()
    )
    return (dy + dx + border * edges) / (power * maps.shape[0])


def deletion_loss(deleted_logits: Tensor, targets: Tensor, power: float = 0.3) -> Tensor:
    """``mean(p(t | x with the mask's region removed) ** power)``: low when removal loses the class."""
    probs = deleted_logits.float().softmax(1).gather(1, targets[:, None]).squeeze(1)
    return (probs + 1e-6).pow(power).mean()


def ptame_loss(
    masked_logits: Tensor,
    targets: Tensor,
    maps: Tensor,
    weights: LossWeights,
    deleted_logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """The weighted loss and its terms.

    Args:
        masked_logits: ``(B, K)`` backbone logits on the masked images.
        targets: ``(B,)`` the backbone's own predictions on the unmasked images.
        maps: ``(B, B, h, w)`` sigmoid maps of every image for every class predicted in the batch.
        weights: loss weights and exponents.
        deleted_logits: ``(B, K)`` logits on the images with the masked region removed; needed
            when ``weights.deletion > 0``.
    """
    ce = F.cross_entropy(masked_logits, targets)
    area = area_loss(maps, weights.area_power)
    tv = tv_loss(maps, weights.tv_power, weights.tv_border) if weights.tv > 0 else maps.new_zeros(())
    loss = weights.ce * ce + weights.area * area + weights.tv * tv
    deletion = maps.new_zeros(())
    if weights.deletion > 0:
        if deleted_logits is None:
            raise ValueError("deleted_logits are needed when the deletion weight is > 0")
        deletion = deletion_loss(deleted_logits, targets, weights.deletion_power)
        loss = loss + weights.deletion * deletion
    return {"loss": loss, "ce": ce.detach(), "area": area.detach(), "tv": tv.detach(), "deletion": deletion.detach()}
