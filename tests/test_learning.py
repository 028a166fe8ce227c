"""P-TAME learns to point at the object that decides the class (ground truth known)."""

import torch

from conftest import dilate
from ptame.explainer import Explainer
from ptame.losses import LossWeights
from ptame.metrics import energy_in_mask, pointing_hit
from ptame.testing import object_scenes


def centre_prior(n: int, size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    c = (size - 1) / 2
    return torch.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * (size / 4) ** 2)).expand(n, size, size)


def test_trained_head_points_at_the_object(scene_backbone, auxiliary) -> None:
    images, labels, masks = object_scenes(128, seed=999)
    assert (scene_backbone(images).argmax(1) == labels).float().mean() > 0.95

    explainer = Explainer(scene_backbone, auxiliary, loss_weights=LossWeights(ce=1.0, area=0.5, tv=0.0))
    steps = 300
    opt = torch.optim.AdamW(explainer.head.parameters(), lr=3e-3, amsgrad=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    explainer.train()
    first = last = None
    for step in range(steps):
        batch, _, _ = object_scenes(16, seed=10_000 + step)
        out = explainer.training_step(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        schedule.step()
        first = first if first is not None else out["loss"].item()
        last = out["loss"].item()
    assert last < 0.5 * first

    maps = explainer.explain(images, classes=labels).saliency[:, 0]
    prior = centre_prior(len(images), 64)
    tolerant = dilate(masks, 4)  # one map cell (stride 4) of tolerance
    ptame_hits = pointing_hit(maps, tolerant).float().mean().item()
    prior_hits = pointing_hit(prior, tolerant).float().mean().item()
    ptame_energy = energy_in_mask(maps, masks).mean().item()
    prior_energy = energy_in_mask(prior, masks).mean().item()
    assert ptame_hits >= 0.9 and ptame_hits > prior_hits + 0.5, (ptame_hits, prior_hits)
    assert ptame_energy >= 0.4 and ptame_energy > 4 * prior_energy, (ptame_energy, prior_energy)
