"""ROAD: RemOve And Debias (Rong et al., ICML 2022) with noisy linear imputation.

For each percentage ``p`` the ``p`` % most (MoRF) or least (LeRF) relevant pixels are removed and
filled in by *noisy linear imputation*: every missing pixel equals the weighted mean of its
in-image 8 neighbours (1/6 direct, 1/12 diagonal, renormalised over the neighbours that exist),
solved as one sparse linear system per image (all channels share the factorisation), plus Gaussian
noise on the imputed pixels (seeded per image and percentage, so an image's score does not depend
on the batch or on the other images). The score is the classifier's accuracy w.r.t. the targets; the summary
is the trapezoid area under the curve through ``(0, 1)``, the points and ``(1, 0)``.
OpenCV's Telea inpainting is available as a faster alternative imputer (``imputer="telea"``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu
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

__all__ = [
    "noisy_linear_impute",
    "road",
    "road_auc",
    "road_auc_per_image",
    "road_correct",
    "road_curve",
    "road_per_image",
    "telea_impute",
]

logger = logging.getLogger(__name__)

Order = Literal["morf", "lerf"]
Imputer = Literal["linear", "telea"]

# (dy, dx, weight); weights 2:1 are the spec's 1/6:1/12 up to the per-pixel renormalisation.
_NEIGHBOURS = (
    (-1, 0, 2.0), (1, 0, 2.0), (0, -1, 2.0), (0, 1, 2.0),
    (-1, -1, 1.0), (-1, 1, 1.0), (1, -1, 1.0), (1, 1, 1.0),
)  # fmt: skip


def _prepare(image: Tensor, missing: Tensor, noise_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Check the imputer's inputs; return the image as float64 ``(C, H, W)`` and the bool mask."""
    if not isinstance(image, Tensor) or image.ndim != 3 or not image.is_floating_point():
        desc = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a floating-point tensor of shape (C, H, W), got {desc}")
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
        raise ValueError("missing must be a bool tensor of shape (H, W)")
    if tuple(missing.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"missing must have shape {tuple(image.shape[-2:])} (image's H, W), "
            f"got {tuple(missing.shape)}"
        )
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    img = image.detach().cpu().double().numpy()
    miss = missing.detach().cpu().numpy()
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or infinite values")
    if miss.all():
        raise ValueError("missing marks every pixel: nothing is known to impute from")
    return img, miss


def _finish(
    image: Tensor,
    img: np.ndarray,
    miss: np.ndarray,
    filled: np.ndarray,
    noise_std: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Write ``filled`` ``(C, n)`` plus Gaussian noise into the missing pixels; back to torch."""
    if noise_std > 0:
        device = generator.device if generator is not None else torch.device("cpu")
        shape = filled.shape
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
        filled = filled + noise_std * noise.cpu().numpy()
    out = img.copy()
    out[:, miss] = filled
    return torch.from_numpy(out).to(image.device, image.dtype)


def noisy_linear_impute(
    image: Tensor,
    missing: Tensor,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill the ``missing`` pixels of ``image`` by noisy linear imputation.

    Each missing pixel is the weighted mean of its in-image 8 neighbours (1/6 direct, 1/12
    diagonal, renormalised when neighbours fall outside the image); the equations of all missing
    pixels form one sparse system, factorised once (SuperLU) and solved for all channels. Known
    pixels are returned unchanged; Gaussian noise of std ``noise_std`` is added to the imputed
    pixels only (no clamping).

    Args:
        image: ``(C, H, W)`` float image.
        missing: ``(H, W)`` bool, True where the pixel is to be imputed (not all True).
        noise_std: std of the added noise, in pixel units.
        generator: source of the noise (drawn on its device); ``None`` uses the global RNG.

    Returns:
        ``(C, H, W)`` imputed image, same dtype and device as ``image``.
    """
    img, miss = _prepare(image, missing, noise_std)
    c, h, w = img.shape
    ys, xs = np.nonzero(miss)  # row-major, the order of img[:, miss]
    n = ys.size
    if n == 0:
        return image.clone()
    flat_img = img.reshape(c, h * w)
    index = np.full((h, w), -1, dtype=np.int64)
    index[ys, xs] = np.arange(n)

    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [], [], []
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag += wt * inside
        src = np.nonzero(inside)[0]
        nidx = index[ny[src], nx[src]]
        unknown = nidx >= 0
        rows.append(src[unknown])
        cols.append(nidx[unknown])
        vals.append(np.full(int(unknown.sum()), -wt))
        known = src[~unknown]
        rhs[known] += wt * flat_img[:, ny[known] * w + nx[known]].T  # rows unique per offset
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = sp.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    # A is symmetric and diagonally dominant (positive definite): symmetric ordering, no pivoting.
    lu = splu(
        a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
    )
    sol = lu.solve(rhs)  # (n, C): one factorisation for all channels
    return _finish(image, img, miss, sol.T, noise_std, generator)


def telea_impute(
    image: Tensor,
    missing: Tensor,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
    radius: float = 5.0,
) -> Tensor:
    """Fill ``missing`` pixels with OpenCV's Telea inpainting (per channel, float32) plus noise.

    Args and Returns as :func:`noisy_linear_impute`; ``radius`` is OpenCV's inpainting radius.
    """
    import cv2  # optional dependency (opencv-python-headless)

    img, miss = _prepare(image, missing, noise_std)
    if not miss.any():
        return image.clone()
    mask = miss.astype(np.uint8)
    filled = np.stack(
        [cv2.inpaint(ch.astype(np.float32), mask, radius, cv2.INPAINT_TELEA) for ch in img]
    )
    return _finish(image, img, miss, filled[:, miss].astype(np.float64), noise_std, generator)


def _check_percentages(percentages: Sequence[int]) -> list[int]:
    ps = sorted({int(p) for p in percentages})
    if not ps or len(ps) != len(list(percentages)) or any(not 0 < p < 100 for p in ps):
        raise ValueError(f"percentages must be distinct values in (0, 100), got {percentages!r}")
    return ps


def _noise_seed(seed: int, image: int, percentage: int) -> int:
    """Seed of the imputation noise of one image at one percentage (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(image), int(percentage)]).generate_state(1)[0])


def road_correct(
    classifier: Classifier,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    order: Order,
    percentages: Sequence[int] = (10, 30, 50, 70),
    noise_std: float = 0.01,
    seed: int = 0,
    batch_size: int = 32,
    imputer: Imputer = "linear",
) -> dict[int, Tensor]:
    """Per image: is the target still predicted after removing and imputing ``p`` % of the pixels.

    Args as :func:`road_curve`. The noise of image ``i`` at percentage ``p`` comes from a generator
    seeded by ``(seed, i, p)``, so the first ``n`` images score the same alone as in a larger set.

    Returns:
        ``{p: (B,) bool}`` on the CPU, keys sorted; :func:`road_curve` is their mean.
    """
    images = check_images(images)
    saliency = check_maps(saliency)
    batch, _, h, w = images.shape
    check_batch(saliency, batch, "saliency")
    targets = check_targets(targets, batch)
    check_positive_int(batch_size, "batch_size")
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    if imputer not in ("linear", "telea"):
        raise ValueError(f"imputer must be 'linear' or 'telea', got {imputer!r}")
    ps = _check_percentages(percentages)
    impute = noisy_linear_impute if imputer == "linear" else telea_impute

    correct: dict[int, list[Tensor]] = {p: [] for p in ps}
    for start in range(0, batch, batch_size):
        img = images[start : start + batch_size]
        tgt = targets[start : start + batch_size]
        relevance = upsample_maps(saliency[start : start + batch_size], (h, w)).flatten(1)
        # to the host once per batch: the imputation runs on the CPU, image by image
        ranking = torch.argsort(relevance, dim=1, descending=(order == "morf"), stable=True).cpu()
        for p in ps:
            k = round(p / 100 * h * w)

            def fill(i: int, k: int = k, p: int = p, start: int = start) -> Tensor:
                missing = torch.zeros(h * w, dtype=torch.bool)
                missing[ranking[i, :k]] = True
                generator = torch.Generator().manual_seed(_noise_seed(seed, start + i, p))
                return impute(img[i], missing.view(h, w), noise_std, generator)

            # the sparse solves release the GIL: one image per core (each image has its own noise seed)
            with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                imputed = torch.stack(list(pool.map(fill, range(img.shape[0]))))
            logits = batched_logits(classifier, imputed, batch_size)
            correct[p].append((logits.argmax(1) == tgt.to(logits.device)).cpu())
    return {p: torch.cat(correct[p]) for p in ps}


def road_curve(
    classifier: Classifier,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    order: Order,
    percentages: Sequence[int] = (10, 30, 50, 70),
    noise_std: float = 0.01,
    seed: int = 0,
    batch_size: int = 32,
    imputer: Imputer = "linear",
) -> dict[int, float]:
    """Accuracy after removing and imputing the most/least relevant ``p`` % of pixels.

    Args:
        classifier: ``(B, 3, H, W)`` images in ``[0, 1]`` -> logits ``(B, K)``.
        images: ``(B, 3, H, W)`` images in ``[0, 1]``.
        saliency: ``(B, h, w)`` relevance maps; upsampled bilinearly to ``(H, W)`` and ranked
            (ties broken by pixel index, row-major).
        targets: ``(B,)`` class indices.
        order: ``"morf"`` removes the most relevant pixels first, ``"lerf"`` the least relevant.
        percentages: removed shares in percent, each in ``(0, 100)``.
        noise_std: std of the imputation noise.
        seed: seed of the noise (reproducible curves; per image and percentage, see :func:`road_correct`).
        batch_size: images imputed and classified per chunk.
        imputer: ``"linear"`` (noisy linear imputation, as in ROAD) or ``"telea"`` (OpenCV).

    Returns:
        ``{p: accuracy}`` with accuracy in ``[0, 1]``, keys sorted.
    """
    correct = road_correct(classifier, images, saliency, targets, order, percentages, noise_std, seed, batch_size, imputer)
    curve = {p: float(c.double().mean()) for p, c in correct.items()}
    logger.info("ROAD-%s curve (%s imputer, %d images): %s", order, imputer, images.shape[0], curve)
    return curve


def road_auc(curve: Mapping[int, float]) -> float:
    """Trapezoid area under ``(0, 1.0)``, the curve's points ``(p / 100, acc)``, ``(1, 0.0)``.

    Args:
        curve: ``{percentage in (0, 100): accuracy in [0, 1]}``.

    Returns:
        Area in ``[0, 1]``.
    """
    ps = _check_percentages(list(curve))
    accs = [float(curve[p]) for p in ps]
    if any(not 0.0 <= a <= 1.0 for a in accs):
        raise ValueError(f"curve accuracies must be in [0, 1], got {accs}")
    x = np.array([0.0, *(p / 100 for p in ps), 1.0])
    y = np.array([1.0, *accs, 0.0])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def road(
    classifier: Classifier,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    percentages: Sequence[int] = (10, 30, 50, 70),
    noise_std: float = 0.01,
    seed: int = 0,
    batch_size: int = 32,
    imputer: Imputer = "linear",
) -> dict[str, float]:
    """ROAD MoRF and LeRF curves and their areas.

    Args as :func:`road_curve` (without ``order``).

    Returns:
        ``{"ROAD-MoRF": auc, "ROAD-LeRF": auc, "ROAD-MoRF@10": acc, ..., "ROAD-LeRF@70": acc}``.
        MoRF: lower is better; LeRF: higher is better.
    """
    out: dict[str, float] = {}
    curves = {}
    for order, tag in (("morf", "MoRF"), ("lerf", "LeRF")):
        curves[tag] = road_curve(
            classifier, images, saliency, targets, order, percentages, noise_std, seed,
            batch_size, imputer,
        )  # fmt: skip
        out[f"ROAD-{tag}"] = road_auc(curves[tag])
    for tag, curve in curves.items():
        for p, acc in curve.items():
            out[f"ROAD-{tag}@{p}"] = acc
    return out


def road_auc_per_image(correct: Mapping[int, Tensor]) -> Tensor:
    """Each image's trapezoid area under ``(0, 1)``, its 0/1 correctness at each ``p``, ``(1, 0)``.

    The area is linear in the curve's points, so the mean of these areas equals
    :func:`road_auc` of the mean curve (the accuracy at each ``p``).

    Args:
        correct: ``{percentage in (0, 100): (B,) bool or values in [0, 1]}`` (:func:`road_correct`).

    Returns:
        ``(B,)`` float64 areas in ``[0, 1]``.
    """
    ps = _check_percentages(list(correct))
    ys = [torch.as_tensor(correct[p]).double().cpu() for p in ps]
    if len({tuple(y.shape) for y in ys}) != 1 or ys[0].ndim != 1:
        raise ValueError(f"correct must map each percentage to a (B,) tensor of one size, got shapes {[tuple(y.shape) for y in ys]}")
    if any(((y < 0) | (y > 1)).any() for y in ys):
        raise ValueError("correct must hold values in [0, 1]")
    x = [0.0, *(p / 100 for p in ps), 1.0]
    y = [torch.ones_like(ys[0]), *ys, torch.zeros_like(ys[0])]
    return sum((x[j + 1] - x[j]) * (y[j + 1] + y[j]) / 2 for j in range(len(x) - 1))  # type: ignore[return-value]


def road_per_image(
    classifier: Classifier,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    percentages: Sequence[int] = (10, 30, 50, 70),
    noise_std: float = 0.01,
    seed: int = 0,
    batch_size: int = 32,
    imputer: Imputer = "linear",
) -> dict[str, Tensor]:
    """Per-image ROAD scores whose means are :func:`road`'s values (for bootstrap intervals).

    Args as :func:`road`.

    Returns:
        The keys of :func:`road`, each a ``(B,)`` float64 tensor: areas for ``ROAD-MoRF`` /
        ``ROAD-LeRF``, 0/1 correctness for ``ROAD-MoRF@p`` / ``ROAD-LeRF@p``.
    """
    out: dict[str, Tensor] = {}
    corrects = {}
    for order, tag in (("morf", "MoRF"), ("lerf", "LeRF")):
        corrects[tag] = road_correct(
            classifier, images, saliency, targets, order, percentages, noise_std, seed, batch_size, imputer,
        )  # fmt: skip
        out[f"ROAD-{tag}"] = road_auc_per_image(corrects[tag])
    for tag, correct in corrects.items():
        for p, c in correct.items():
            out[f"ROAD-{tag}@{p}"] = c.double()
    return out
