"""Shared, seeded fixtures: tiny models and synthetic scenes with known ground truth."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from ptame.explainer import Explainer  # noqa: E402
from ptame.models import Preprocessing, load_auxiliary  # noqa: E402

TINY_PREP = Preprocessing(input_size=64, resize=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TINY_BACKBONE = "python:ptame.testing:tiny_cnn"
RED_BACKBONE = "python:ptame.testing:red_detector"
AUXILIARY = "builtin:efficientnet_lite0"
#: the red square of :func:`red_scene`, ``(left, top, right, bottom)``: left of its centre square
RED_BOX = (2, 18, 30, 46)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests skip, never fail, where CUDA is missing."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def count_syncs(fn, *args, **kwargs):  # noqa: ANN001, ANN201 - test helper
    """``(fn(*args, **kwargs), number of host-device synchronisations it made)`` on CUDA."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in caught)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def auxiliary():
    return load_auxiliary(AUXILIARY)


@pytest.fixture()
def tiny_explainer() -> Explainer:
    """Untrained head on the seed-0 tiny CNN (4 classes) and the real EfficientNet-Lite0."""
    return Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP)


def assert_maps(maps: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Shape, finiteness and [0, 1] range of saliency maps."""
    assert tuple(maps.shape) == shape
    assert torch.isfinite(maps).all()
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


@pytest.fixture(scope="session")
def scene_backbone():
    """The tiny CNN trained on :func:`ptame.testing.object_scenes` (colour square decides the class)."""
    from ptame.models import Classifier
    from ptame.testing import tiny_cnn, train_classifier

    torch.manual_seed(0)
    return Classifier(train_classifier(tiny_cnn(), steps=300), TINY_PREP, 4)


def dilate(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow boolean ``(B, H, W)`` masks by ``pixels`` (the pointing game's tolerance)."""
    k = 2 * pixels + 1
    return torch.nn.functional.max_pool2d(masks[:, None].float(), k, 1, pixels)[:, 0].bool()


def red_explainer() -> Explainer:
    """The hand-wired red detector explained by its own class activation maps: class 0's map is the red region."""
    explainer = Explainer.from_uris(RED_BACKBONE, "backbone", preprocessing=TINY_PREP)
    explainer.init_head_from_classifier(scale=0.5)
    return explainer


def red_scene() -> bytes:
    """A 128 x 64 grey PNG with a red square at its far left (:data:`RED_BOX`), outside the centre square."""
    import io

    import numpy as np
    from PIL import Image

    from ptame.testing import COLOURS

    rng = np.random.default_rng(0)
    pixels = np.clip(0.5 + 0.08 * rng.standard_normal((64, 128, 3)), 0, 1)
    left, top, right, bottom = RED_BOX
    pixels[top:bottom, left:right] = COLOURS[0].numpy()
    buf = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def red_cells(shape: tuple[int, int], size: tuple[int, int] = (128, 64)) -> torch.Tensor:
    """Boolean ``(h, w)`` map cells over a ``size`` image whose centres lie in :data:`RED_BOX`."""
    h, w = shape
    ys = (torch.arange(h) + 0.5) * size[1] / h
    xs = (torch.arange(w) + 0.5) * size[0] / w
    left, top, right, bottom = RED_BOX
    return ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
