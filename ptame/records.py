"""Explanations as rows: the data contract shared by bulk Parquet output, HTTP answers and MLflow.

A row holds ``pred_class``, ``pred_label``, ``pred_score``, ``topk_classes``, ``topk_labels``,
``topk_scores``, ``saliency`` (the map of ``saliency_class``: the requested class, else
``pred_class``; min-max normalised, quantised to uint8, row-major bytes), ``saliency_class``,
``saliency_label``, ``saliency_score``, ``saliency_shape``, ``width``, ``height``, ``crop_box``
and ``error`` (``None`` or why it failed). ``crop_box`` is the region of the original image the map
covers: the classifier's centre crop (``view="crop"``), or the whole image (``view="full"``: a
letterboxed input whose map is cut to the image content, so ``saliency_shape`` follows its aspect ratio).
With ``topk_maps`` a row also holds ``topk_saliency``: the maps of ``topk_classes``, in that order,
cut and quantised like ``saliency``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ptame.data import Prepared, content_map
from ptame.explainer import Explainer

__all__ = ["dequantize", "explain_prepared", "quantize"]


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


def explain_prepared(
    explainer: Explainer,
    items: Sequence[Prepared],
    topk: int = 5,
    classes: Sequence[int | None] | None = None,
    topk_maps: bool = False,
) -> list[dict[str, Any]]:
    """Explain the good items in one batch; every item gets a row (bad ones with ``error`` set).

    ``classes`` (one entry per item, ``None`` for the prediction) chooses the class each map explains;
    ``topk_maps`` adds the maps of all ``topk_classes`` (``topk_saliency``). One backbone pass either
    way. A letterboxed item's maps are cut to its image (:func:`ptame.data.content_map`).
    """
    if classes is not None and len(classes) != len(items):
        raise ValueError(f"classes has {len(classes)} entries for {len(items)} items")
    good = [i for i, it in enumerate(items) if it.error is None]
    rows: list[dict[str, Any]] = [_error_row(it) for it in items]
    if not good:
        return rows
    device = next(explainer.head.parameters()).device
    batch = torch.stack([items[i].tensor for i in good]).to(device)  # type: ignore[misc]
    k = min(topk, explainer.backbone.num_classes)
    wanted = [-1 if classes is None or classes[i] is None else int(classes[i]) for i in good]  # -1: the prediction
    request = torch.tensor(wanted, device=device)  # one map per image
    first = 0  # column of the top-k maps in the result
    if topk_maps:  # -j: the j-th prediction, so the top-k maps come from the same pass
        ranks = torch.arange(-1, -k - 1, -1, device=device).expand(len(good), k)
        first = 0 if all(w == -1 for w in wanted) else 1  # the prediction's map is the first top-k map
        request = torch.cat([request[:, None], ranks], 1) if first else ranks
    result = explainer.explain(batch, classes=request)
    top = result.probs.topk(k, dim=1)
    # the whole batch to the host at once: per-row reads would each wait on the GPU
    all_classes, all_scores = top.indices.cpu().tolist(), top.values.float().cpu().tolist()
    targets, target_scores = result.classes[:, 0].cpu().tolist(), result.scores[:, 0].float().cpu().tolist()
    maps = result.saliency[:, 0].float().cpu()
    ranked = result.saliency[:, first : first + k].float().cpu() if topk_maps else None
    names, size = explainer.class_names, explainer.preprocessing.input_size
    for j, i in enumerate(good):
        classes_j, scores, sal = all_classes[j], all_scores[j], content_map(maps[j], items[i].content, size)
        target, target_score = int(targets[j]), float(target_scores[j])
        rows[i] = {
            "width": items[i].width,
            "height": items[i].height,
            "crop_box": list(items[i].crop_box or ()),
            "pred_class": int(classes_j[0]),
            "pred_label": names[classes_j[0]],
            "pred_score": float(scores[0]),
            "topk_classes": [int(c) for c in classes_j],
            "topk_labels": [names[c] for c in classes_j],
            "topk_scores": [float(s) for s in scores],
            "saliency": quantize(sal),
            "saliency_class": target,
            "saliency_label": names[target],
            "saliency_score": target_score,
            "saliency_shape": [int(sal.shape[0]), int(sal.shape[1])],
            "error": None,
        }
        if ranked is not None:
            rows[i]["topk_saliency"] = [quantize(content_map(m, items[i].content, size)) for m in ranked[j]]
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
        "topk_labels": None,
        "topk_scores": None,
        "saliency": None,
        "saliency_class": None,
        "saliency_label": None,
        "saliency_score": None,
        "saliency_shape": None,
        "error": item.error or "not explained",
    }
