"""Explanations as rows: the data contract shared by bulk Parquet output, HTTP answers and MLflow.

A row holds ``pred_class``, ``pred_label``, ``pred_score``, ``topk_classes``, ``topk_scores``,
``saliency`` (the ``pred_class`` map, min-max normalised, quantised to uint8, row-major bytes),
``saliency_shape``, ``width``, ``height``, ``crop_box`` and ``error`` (``None`` or why it failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ptame.data import CropBox, ImageDecodeError, decode_image, preprocess
from ptame.explainer import Explainer
from ptame.models import Preprocessing

__all__ = ["Prepared", "dequantize", "explain_prepared", "prepare_image", "quantize"]


def quantize(saliency: Tensor | np.ndarray) -> bytes:
    """A ``(h, w)`` map in ``[0, 1]`` as row-major uint8 bytes (``round(255 * v)``)."""
    arr = saliency.detach().cpu().float().numpy() if isinstance(saliency, Tensor) else np.asarray(saliency, np.float32)
    if arr.ndim != 2:
        raise ValueError(f"saliency must be (h, w), got shape {arr.shape}")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8).tobytes()


def dequantize(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`quantize`: ``(h, w)`` float32 in ``[0, 1]``."""
    h, w = (int(v) for v in shape)
    if len(data) != h * w:
        raise ValueError(f"saliency has {len(data)} bytes, expected {h} x {w} = {h * w}")
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w).astype(np.float32) / 255.0


@dataclass(frozen=True)
class Prepared:
    """One decoded and preprocessed input, or the reason it could not be."""

    tensor: Tensor | None
    width: int
    height: int
    crop_box: CropBox | None
    error: str | None


def prepare_image(data: bytes, prep: Preprocessing, max_pixels: int | None = None) -> Prepared:
    """Decode and preprocess encoded image bytes; bad input yields ``error``, never an exception."""
    try:
        image = decode_image(data, **({"max_pixels": max_pixels} if max_pixels else {}))
    except ImageDecodeError as e:
        return Prepared(None, 0, 0, None, str(e))
    tensor, box = preprocess(image, prep)
    return Prepared(tensor, image.size[0], image.size[1], box, None)


def explain_prepared(explainer: Explainer, items: Sequence[Prepared], topk: int = 5) -> list[dict[str, Any]]:
    """Explain the good items in one batch; every item gets a row (bad ones with ``error`` set)."""
    good = [i for i, it in enumerate(items) if it.error is None]
    rows: list[dict[str, Any]] = [_error_row(it) for it in items]
    if not good:
        return rows
    device = next(explainer.head.parameters()).device
    batch = torch.stack([items[i].tensor for i in good]).to(device)  # type: ignore[misc]
    k = min(topk, explainer.backbone.num_classes)
    result = explainer.explain(batch, topk=k)
    # the whole batch to the host at once: per-row reads would each wait on the GPU
    all_classes, all_scores = result.classes.cpu().tolist(), result.scores.float().cpu().tolist()
    maps = result.saliency[:, 0].float().cpu()
    names = explainer.class_names
    for j, i in enumerate(good):
        classes, scores, sal = all_classes[j], all_scores[j], maps[j]
        rows[i] = {
            "width": items[i].width,
            "height": items[i].height,
            "crop_box": list(items[i].crop_box or ()),
            "pred_class": int(classes[0]),
            "pred_label": names[classes[0]],
            "pred_score": float(scores[0]),
            "topk_classes": [int(c) for c in classes],
            "topk_scores": [float(s) for s in scores],
            "saliency": quantize(sal),
            "saliency_shape": [int(sal.shape[0]), int(sal.shape[1])],
            "error": None,
        }
    return rows


def _error_row(item: Prepared) -> dict[str, Any]:
    return {
        "width": item.width,
        "height": item.height,
        "crop_box": None,
        "pred_class": None,
        "pred_label": None,
        "pred_score": None,
        "topk_classes": None,
        "topk_scores": None,
        "saliency": None,
        "saliency_shape": None,
        "error": item.error or "not explained",
    }
