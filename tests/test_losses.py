import math

import pytest
import torch

from ptame.losses import LossWeights, area_loss, ptame_loss, tv_loss


def test_area_matches_hand_computation() -> None:
    maps = torch.tensor([0.0, 1.0, 0.25, 0.5]).view(1, 1, 2, 2)
    expected = sum((v + 0.0005) ** 0.3 for v in (0.0, 1.0, 0.25, 0.5)) / 4
    assert area_loss(maps, 0.3).item() == pytest.approx(expected, rel=1e-6)


def test_tv_matches_hand_computation() -> None:
    # one 2 x 2 map [[0, 1], [1, 1]] in a batch of B = 1, q = 2, b = 0.3
    maps = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    dy = (1 - 0) ** 2 + (1 - 1) ** 2
    dx = (1 - 0) ** 2 + (1 - 1) ** 2
    border = (0 + 1) + (1 + 1) + (0 + 1) + (1 + 1)  # top, bottom, left, right; corners twice
    expected = (dy + dx + 0.3 * border) / (2 * 1)
    assert tv_loss(maps, 2.0, 0.3).item() == pytest.approx(expected)


def test_tv_divides_by_batch_size() -> None:
    one = torch.rand(1, 2, 5, 5)
    two = torch.cat([one, one])
    assert tv_loss(two).item() == pytest.approx(tv_loss(one).item(), rel=1e-6)


def test_total_loss_weights_its_terms() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1])
    maps = torch.rand(2, 2, 4, 4)
    w = LossWeights(ce=0.2, area=0.7, tv=0.1)
    out = ptame_loss(logits, targets, maps, w)
    ce = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (math.e + 1))) / 2
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    expected = 0.2 * ce + 0.7 * area_loss(maps).item() + 0.1 * tv_loss(maps).item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="area"):
        LossWeights(area=-1)
    with pytest.raises(ValueError, match="area_power"):
        LossWeights(area_power=0)


def test_deletion_term_matches_hand_computation() -> None:
    masked = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    deleted = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p(t): 1/2 and 1/4
    targets = torch.tensor([0, 1])
    maps = torch.rand(2, 2, 4, 4)
    w = LossWeights(ce=0.2, area=0.7, deletion=0.5, deletion_power=0.5)
    out = ptame_loss(masked, targets, maps, w, deleted_logits=deleted)
    deletion = (math.sqrt(0.5 + 1e-6) + math.sqrt(0.25 + 1e-6)) / 2
    assert out["deletion"].item() == pytest.approx(deletion, rel=1e-5)
    without = ptame_loss(masked, targets, maps, LossWeights(ce=0.2, area=0.7))
    assert out["loss"].item() == pytest.approx(without["loss"].item() + 0.5 * deletion, rel=1e-5)
    assert without["deletion"].item() == 0.0
    with pytest.raises(ValueError, match="deleted_logits"):
        ptame_loss(masked, targets, maps, w)


def test_unknown_fill_is_refused() -> None:
    with pytest.raises(ValueError, match="fill"):
        LossWeights(fill="grey")
