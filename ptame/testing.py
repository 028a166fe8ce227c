"""Tiny models and synthetic scenes with known ground truth, for tests, demos and benchmarks.

``python:ptame.testing:tiny_cnn`` is a valid backbone URI: it rebuilds the same network (fixed
seed, optional weights file from ``PTAME_TINY_WEIGHTS``) in every process.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

__all__ = ["COLOURS", "TinyCNN", "object_scenes", "red_detector", "tiny_cnn", "train_classifier"]

#: class index -> RGB colour of the object that decides it
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9]])


class TinyCNN(nn.Module):
    """A three-conv classifier with global average pooling; seconds to train on CPU."""

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def tiny_cnn(num_classes: int = 4) -> TinyCNN:
    """A :class:`TinyCNN` with seed-0 weights, or those in ``$PTAME_TINY_WEIGHTS`` (safetensors)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN(num_classes)
    path = os.environ.get("PTAME_TINY_WEIGHTS")
    if path:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    return model


def red_detector() -> TinyCNN:
    """A :class:`TinyCNN` wired by hand (inputs normalised with mean = std = 0.5): class 0 scores the red
    area, class 3 ("no object") a constant, so the class activation map of class 0 is the red region."""
    model = TinyCNN(4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.features[0].weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])  # R - G - B: 2.4 on red, ~0 on grey
        model.features[0].bias[0] = -1.0
        model.features[3].weight[0, 0, 1, 1] = 1.0
        model.features[6].weight[0, 0, 1, 1] = 1.0
        model.fc.weight[0, 0] = 20.0
        model.fc.bias[3] = 1.0
    return model.eval()


def object_scenes(
    n: int, size: int = 64, object_size: int = 14, num_classes: int = 3, seed: int = 0, empty: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy grey scenes whose class is decided only by one coloured square at a random place.

    The grey level varies per scene so that a classifier trained on them does not depend on it
    (masking darkens the background; the class must survive that).

    A fraction ``empty`` of the scenes has no object and the extra label ``num_classes``, so that a
    classifier learns that an empty (e.g. fully masked) scene is no object class.

    Returns:
        images ``(n, 3, size, size)`` in ``[0, 1]``, labels ``(n,)``, object masks ``(n, size, size)``.
    """
    g = torch.Generator().manual_seed(seed)
    background = 0.15 + 0.7 * torch.rand(n, 1, 1, 1, generator=g)
    images = (background + 0.08 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    ys = torch.randint(0, size - object_size + 1, (n,), generator=g)
    xs = torch.randint(0, size - object_size + 1, (n,), generator=g)
    no_object = torch.rand(n, generator=g) < empty
    for i in range(n):
        if no_object[i]:
            labels[i] = num_classes
            continue
        y, x = int(ys[i]), int(xs[i])
        masks[i, y : y + object_size, x : x + object_size] = True
        images[i, :, y : y + object_size, x : x + object_size] = COLOURS[labels[i] % len(COLOURS)].view(3, 1, 1)
    return images, labels, masks


def train_classifier(model: nn.Module, steps: int = 150, batch_size: int = 32, size: int = 64, seed: int = 1) -> nn.Module:
    """Fit ``model`` (4 outputs: 3 colours + "no object") on dimmed :func:`object_scenes`.

    Inputs are normalised with mean = std = 0.5."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        images, labels, _ = object_scenes(batch_size, size=size, seed=seed * 100_000 + step, empty=0.25)
        images = images * (0.3 + 0.7 * torch.rand(batch_size, 1, 1, 1))  # dimmed scenes, as masks dim them
        loss = nn.functional.cross_entropy(model((images - 0.5) / 0.5), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
