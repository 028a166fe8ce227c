"""Tests of ptame.metrics against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from ptame.metrics import (
    average_drop_increase,
    average_drop_increase_per_image,
    energy_in_mask,
    grid_pointing_game,
    keep_top_fraction,
    noisy_linear_impute,
    pointing_hit,
    road,
    road_auc,
    road_auc_per_image,
    road_correct,
    road_curve,
    road_per_image,
    upsample_maps,
)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------- common


def test_upsample_maps_shape_and_identity() -> None:
    maps = torch.rand(2, 7, 7)
    assert upsample_maps(maps, (7, 7)) is maps
    up = upsample_maps(maps, (28, 21))
    assert up.shape == (2, 28, 21)
    # bilinear with align_corners=False: a constant map stays constant
    const = upsample_maps(torch.full((1, 3, 3), 0.7), (10, 10))
    assert torch.allclose(const, torch.full((1, 10, 10), 0.7))


# --------------------------------------------------------------------------- AD / IC


def test_keep_top_fraction_hand_examples() -> None:
    maps = (torch.arange(16, dtype=torch.float32) / 15).view(1, 4, 4)
    quarter = keep_top_fraction(maps, 0.25)
    expected = torch.zeros(1, 4, 4)
    expected[0, 3] = maps[0, 3]  # the 4 largest values are the last row
    assert torch.equal(quarter, expected)
    half = keep_top_fraction(maps, 0.5)
    assert torch.equal(half[0, :2], torch.zeros(2, 4)) and torch.equal(half[0, 2:], maps[0, 2:])
    assert torch.equal(keep_top_fraction(maps, 1.0), maps)

    small = torch.tensor([[[0.2, 0.9], [0.5, 0.1]]])
    # 15% of 4 pixels -> round(0.6) = 1 pixel kept, with its soft value
    assert torch.equal(keep_top_fraction(small, 0.15), torch.tensor([[[0.0, 0.9], [0.0, 0.0]]]))
    assert torch.equal(keep_top_fraction(small, 0.5), torch.tensor([[[0.0, 0.9], [0.5, 0.0]]]))
    # k = round(fraction * N): 0.9 of 4 pixels -> round(3.6) = 4, i.e. all kept
    assert torch.equal(keep_top_fraction(small, 0.9), small)
    with pytest.raises(ValueError, match="fraction"):
        keep_top_fraction(small, 0.0)


class MeanClassifier:
    """logits = [4 * mean(x), 2]; records chunk sizes and whether inference mode was on."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.inference: list[bool] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.chunks.append(x.shape[0])
        self.inference.append(torch.is_inference_mode_enabled())
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([4 * m, torch.full_like(m, 2.0)], dim=1)


def test_average_drop_increase_hand_computed() -> None:
    images = torch.stack([torch.ones(3, 2, 2), 0.5 * torch.ones(3, 2, 2), torch.ones(3, 2, 2)])
    saliency = torch.tensor(
        [
            [[1.0, 0.5], [0.25, 0.0]],
            [[0.0, 0.0], [0.5, 1.0]],
            [[1.0, 1.0], [1.0, 1.0]],
        ]
    )
    targets = torch.tensor([0, 1, 0])
    clf = MeanClassifier()
    out = average_drop_increase(clf, images, saliency, targets, batch_size=2)
    assert set(out) == {"AD@100", "IC@100", "AD@50", "IC@50", "AD@15", "IC@15"}
    assert max(clf.chunks) <= 2 and all(clf.inference)

    # p(class 0) = sigmoid(4 m - 2), p(class 1) = sigmoid(2 - 4 m), m = mean pixel value.
    # Image A (ones, target 0): y = s(2). Masked means: r=1 -> 1.75/4, r=.5 -> 1.5/4 (keep 1, .5),
    #   r=.15 -> keep 1 pixel -> 1/4.  o = s(4m - 2) < y each time: a drop, no increase.
    # Image B (0.5, target 1): y = s(0) = 0.5; masking lowers m so p(class 1) rises: AD 0, IC 1.
    # Image C (ones, all-ones map, target 0): r=1 -> o = y (no drop, no increase);
    #   r=.5 -> m = .5, o = s(0); r=.15 -> m = .25, o = s(-1).
    y = sigmoid(2)

    def drop(o: float) -> float:
        return max(0.0, y - o) / y

    exp_ad = {
        100: (drop(sigmoid(-0.25)) + 0 + 0) / 3 * 100,
        50: (drop(sigmoid(-0.5)) + 0 + drop(sigmoid(0))) / 3 * 100,
        15: (drop(sigmoid(-1)) + 0 + drop(sigmoid(-1))) / 3 * 100,
    }
    for r in (100, 50, 15):
        assert out[f"AD@{r}"] == pytest.approx(exp_ad[r], rel=1e-5)
        assert out[f"IC@{r}"] == pytest.approx(100 / 3, rel=1e-6)


def test_average_drop_increase_per_image_hand_computed() -> None:
    images = torch.stack([torch.ones(3, 2, 2), 0.5 * torch.ones(3, 2, 2), torch.ones(3, 2, 2)])
    saliency = torch.tensor([[[1.0, 0.5], [0.25, 0.0]], [[0.0, 0.0], [0.5, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    targets = torch.tensor([0, 1, 0])
    per = average_drop_increase_per_image(MeanClassifier(), images, saliency, targets, batch_size=2)
    y = sigmoid(2)
    # same images as above: A drops at every r, B only rises, C drops at 50 and 15 only
    torch.testing.assert_close(per["AD@50"], torch.tensor([100 * (y - sigmoid(-0.5)) / y, 0.0, 100 * (y - sigmoid(0)) / y], dtype=torch.float64))
    assert per["IC@100"].tolist() == [0.0, 100.0, 0.0] and per["AD@100"][2] == 0.0
    means = average_drop_increase(MeanClassifier(), images, saliency, targets, batch_size=2)
    assert {k: pytest.approx(float(v.mean())) for k, v in per.items()} == means


def test_average_drop_upsamples_low_res_maps() -> None:
    # a constant 1x1 map of value 0.5 upsampled to 4x4 halves every pixel: m = 0.5 -> o = s(0)
    images = torch.ones(1, 3, 4, 4)
    out = average_drop_increase(
        MeanClassifier(), images, torch.full((1, 1, 1), 0.5), torch.tensor([0]), fractions=(1.0,)
    )
    assert out["AD@100"] == pytest.approx((sigmoid(2) - 0.5) / sigmoid(2) * 100, rel=1e-5)
    assert out["IC@100"] == 0.0


# --------------------------------------------------------------------------- imputation


def ramp_image(h: int = 32, w: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coeffs = [(0.01, 0.01, 0.2), (-0.01, 0.015, 0.5), (0.005, -0.007, 0.4)]
    return torch.stack([a * xx + b * yy + c for a, b, c in coeffs]).float()


def test_impute_reproduces_linear_ramp_in_interior_block() -> None:
    img = ramp_image()
    missing = torch.zeros(32, 32, dtype=torch.bool)
    missing[6:20, 9:25] = True
    missing[24:27, 3:5] = True  # a second, separate hole
    out = noisy_linear_impute(img, missing, noise_std=0.0)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert torch.allclose(out, img, atol=1e-5, rtol=0)
    assert torch.equal(out[:, ~missing], img[:, ~missing])


def test_impute_hand_computed_weights() -> None:
    img = torch.arange(9, dtype=torch.float32).view(1, 3, 3) ** 2  # non-linear values
    centre = torch.zeros(3, 3, dtype=torch.bool)
    centre[1, 1] = True
    out = noisy_linear_impute(img, centre, noise_std=0.0)
    v = img[0]
    direct = v[0, 1] + v[1, 0] + v[1, 2] + v[2, 1]
    diag = v[0, 0] + v[0, 2] + v[2, 0] + v[2, 2]
    assert out[0, 1, 1].item() == pytest.approx((direct / 6 + diag / 12).item(), rel=1e-6)
    # corner: neighbours (0,1), (1,0) direct and (1,1) diagonal; weights renormalised: 2:2:1 / 5
    corner = torch.zeros(3, 3, dtype=torch.bool)
    corner[0, 0] = True
    out = noisy_linear_impute(img, corner, noise_std=0.0)
    expected = (2 * v[0, 1] + 2 * v[1, 0] + v[1, 1]) / 5
    assert out[0, 0, 0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_impute_noise_std_and_reproducibility() -> None:
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    missing = torch.zeros(64, 64, dtype=torch.bool)
    missing[10:50, 12:52] = True
    clean = noisy_linear_impute(img, missing, noise_std=0.0)
    noisy = noisy_linear_impute(img, missing, 0.05, torch.Generator().manual_seed(3))
    again = noisy_linear_impute(img, missing, 0.05, torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)
    assert torch.equal(noisy[:, ~missing], img[:, ~missing])
    dev = (noisy - clean)[:, missing]
    assert dev.std().item() == pytest.approx(0.05, rel=0.1)
    assert abs(dev.mean().item()) < 0.01


def test_impute_border_block_is_finite_and_in_range() -> None:
    img = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(2))
    missing = torch.zeros(20, 20, dtype=torch.bool)
    missing[0:8, 0:11] = True
    missing[:, 19] = True  # a whole column at the right border
    out = noisy_linear_impute(img, missing, noise_std=0.0)
    known = img[:, ~missing]
    assert torch.isfinite(out).all()
    assert out.min() >= known.min() - 1e-6 and out.max() <= known.max() + 1e-6
    with pytest.raises(ValueError, match="missing"):
        noisy_linear_impute(img, torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="missing"):
        noisy_linear_impute(img, torch.zeros(19, 20, dtype=torch.bool))


# --------------------------------------------------------------------------- ROAD


def test_road_auc_hand_computed() -> None:
    # points on the line 1 - x -> area 0.5
    assert road_auc({10: 0.9, 30: 0.7, 50: 0.5, 70: 0.3}) == pytest.approx(0.5)
    # 0.1 * 1 + 0.6 * 1 + 0.3 * (1 + 0) / 2 = 0.85
    assert road_auc({70: 1.0, 10: 1.0, 50: 1.0, 30: 1.0}) == pytest.approx(0.85)
    # .1*(1+.5)/2 + .2*(.5+.2)/2 + .2*(.2+.1)/2 + .2*(.1+0)/2 + .3*0 = .185
    assert road_auc({10: 0.5, 30: 0.2, 50: 0.1, 70: 0.0}) == pytest.approx(0.185)
    with pytest.raises(ValueError, match="percentages"):
        road_auc({0: 1.0, 50: 0.5})


def test_road_auc_per_image_hand_computed() -> None:
    correct = {10: torch.tensor([True, True, False]), 30: torch.tensor([False, True, False]), 70: torch.tensor([False, True, False])}
    # x = 0, .1, .3, .7, 1; image 0: y = 1,1,0,0,0 -> .1 + .2 * .5 = .2
    # image 1: y = 1,1,1,1,0 -> .1 + .2 + .4 + .3 * .5 = .85; image 2: y = 1,0,0,0,0 -> .1 * .5 = .05
    auc = road_auc_per_image(correct)
    torch.testing.assert_close(auc, torch.tensor([0.2, 0.85, 0.05], dtype=torch.float64))
    # the mean of per-image areas is the area of the mean curve (accuracy 2/3, 1/3, 1/3)
    assert float(auc.mean()) == pytest.approx(road_auc({10: 2 / 3, 30: 1 / 3, 70: 1 / 3})) == pytest.approx(1.1 / 3)
    with pytest.raises(ValueError, match="correct"):
        road_auc_per_image({10: torch.tensor([1.0, 0.0]), 30: torch.tensor([1.0])})


def region_classifier(x: torch.Tensor) -> torch.Tensor:
    """Class 1 iff the top-left 4x4 region is bright (mean > 0.5)."""
    m = x[:, :, :4, :4].mean(dim=(1, 2, 3))
    return torch.stack([0.5 - m, m - 0.5], dim=1)


def region_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = 0.2 * torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[:, :, :4, :4] = 1.0
    return images, torch.ones(3, dtype=torch.long)


@pytest.mark.parametrize("imputer", ["linear", "telea"])
def test_road_curve_morf_and_lerf(imputer: str) -> None:
    images, targets = region_batch()
    saliency = torch.zeros(3, 4, 4)
    saliency[:, 0, 0] = 1.0  # peaked on the region; upsampled 4x its top 16 pixels are the region
    assert (region_classifier(images).argmax(1) == 1).all()
    kw = {"batch_size": 2, "imputer": imputer}
    morf = road_curve(region_classifier, images, saliency, targets, "morf", **kw)
    lerf = road_curve(region_classifier, images, saliency, targets, "lerf", **kw)
    assert morf == {10: 0.0, 30: 0.0, 50: 0.0, 70: 0.0}
    assert lerf == {10: 1.0, 30: 1.0, 50: 1.0, 70: 1.0}
    # a map peaked on the opposite corner: removing 10% there leaves the region intact
    far = torch.flip(saliency, dims=(1, 2))
    away = road_curve(region_classifier, images, far, targets, "morf", percentages=(10,), **kw)
    assert away == {10: 1.0}


def test_road_summary_keys_and_values() -> None:
    images, targets = region_batch()
    saliency = torch.zeros(3, 16, 16)
    saliency[:, :4, :4] = 1.0
    out = road(region_classifier, images, saliency, targets, percentages=(10, 50))
    assert out == {
        "ROAD-MoRF": pytest.approx(0.1 * 0.5),
        "ROAD-LeRF": pytest.approx(0.1 + 0.4 + 0.5 * 0.5),
        "ROAD-MoRF@10": 0.0,
        "ROAD-MoRF@50": 0.0,
        "ROAD-LeRF@10": 1.0,
        "ROAD-LeRF@50": 1.0,
    }


# --------------------------------------------------------------------------- pointing


def test_grid_pointing_game_hand_examples() -> None:
    cell2 = torch.zeros(4, 4, 4)
    cell2[:, 2:, :2] = torch.rand(4, 2, 2) + 0.1  # all mass bottom-left = cell 2 (row-major)
    scores = grid_pointing_game(cell2, torch.tensor([2, 0, 1, 3]))
    assert torch.allclose(scores, torch.tensor([1.0, 0.0, 0.0, 0.0]))

    uniform = torch.full((2, 5, 7), 0.3)  # not divisible by 2: upsampled to 6 x 8
    assert torch.allclose(grid_pointing_game(uniform, torch.tensor([0, 3])), torch.tensor(0.25))
    zero = torch.zeros(1, 4, 4)
    assert torch.allclose(grid_pointing_game(zero, torch.tensor([1])), torch.tensor(0.25))

    # negative values are clamped away; mass 3 in cell 1, 1 in cell 3 -> 0.75
    mixed = torch.tensor([[[-5.0, 3.0], [0.0, 1.0]]])
    assert grid_pointing_game(mixed, torch.tensor([1])).item() == pytest.approx(0.75)
    # a 1 x 3 grid on a 2 x 3 map
    row = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    assert grid_pointing_game(row, torch.tensor([2]), grid=(1, 3)).item() == pytest.approx(0.5)


def test_energy_in_mask_and_pointing_hit() -> None:
    sal = torch.tensor(
        [[[0.0, 1.0], [0.0, 3.0]], [[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    )
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[:, 1, 1] = True
    masks[2, 0, :] = True  # half of the image
    assert torch.allclose(energy_in_mask(sal, masks), torch.tensor([0.75, 0.0, 0.75]))
    assert pointing_hit(sal, masks).tolist() == [True, False, False]
    # a 1x1-cell-resolution map upsampled to the mask size
    big = torch.zeros(1, 8, 8, dtype=torch.bool)
    big[0, 4:, 4:] = True
    low = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert pointing_hit(low, big).tolist() == [True]
    assert energy_in_mask(low, big).item() > 0.75


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_error_naming_argument() -> None:
    clf = MeanClassifier()
    images = torch.rand(2, 3, 4, 4)
    sal = torch.rand(2, 4, 4)
    targets = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="saliency"):
        average_drop_increase(clf, images, sal[0], targets)  # wrong dims
    with pytest.raises(ValueError, match="images"):
        average_drop_increase(clf, images[0], sal, targets)
    nan_sal = sal.clone()
    nan_sal[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="saliency.*NaN"):
        average_drop_increase(clf, images, nan_sal, targets)
    with pytest.raises(ValueError, match="saliency.*NaN"):
        road_curve(clf, images, nan_sal, targets, "morf")
    with pytest.raises(ValueError, match="saliency.*NaN"):
        grid_pointing_game(nan_sal, targets)
    with pytest.raises(ValueError, match="saliency"):
        road_curve(clf, images, sal[:1], targets, "lerf")  # batch mismatch
    with pytest.raises(ValueError, match="targets"):
        average_drop_increase(clf, images, sal, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="targets"):
        road(clf, images, sal, targets.float())
    with pytest.raises(ValueError, match="cells"):
        grid_pointing_game(sal, torch.tensor([0]))
    with pytest.raises(ValueError, match="cells"):
        grid_pointing_game(sal, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="masks"):
        energy_in_mask(sal, torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        pointing_hit(sal, torch.ones(2, 4, 4))  # not bool
    with pytest.raises(ValueError, match="saliency"):
        average_drop_increase(clf, images, 2 * sal + 1.5, targets)  # outside [0, 1]
    with pytest.raises(ValueError, match="order"):
        road_curve(clf, images, sal, targets, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        upsample_maps(sal, (0, 4))


def test_road_per_image_hand_computed_and_batch_independent() -> None:
    images, targets = region_batch()
    images, targets = images[:2], targets[:2]
    saliency = torch.zeros(2, 16, 16)
    saliency[0, :4, :4] = 1.0  # on the region
    saliency[1, 12:, 12:] = 1.0  # on the far corner; ties then go row-major from the top-left, the region
    per = road_per_image(region_classifier, images, saliency, targets, batch_size=1)
    # MoRF: image 0 loses the region at 10 % (y = 1, 0, 0, 0, 0, 0) -> .1 * .5 = .05;
    #   image 1 keeps it at 10 % only (1, 1, 0, 0, 0, 0) -> .1 + .2 * .5 = .2
    # LeRF: image 0 keeps it throughout (1, 1, 1, 1, 1, 0) -> .7 + .3 * .5 = .85; image 1 as its MoRF: .2
    assert per["ROAD-MoRF@10"].tolist() == [0.0, 1.0] and per["ROAD-LeRF@30"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(per["ROAD-MoRF"], torch.tensor([0.05, 0.2], dtype=torch.float64))
    torch.testing.assert_close(per["ROAD-LeRF"], torch.tensor([0.85, 0.2], dtype=torch.float64))
    means = road(region_classifier, images, saliency, targets, batch_size=2)
    assert means["ROAD-MoRF"] == pytest.approx(0.125) and means["ROAD-LeRF"] == pytest.approx(0.525)
    assert {k: pytest.approx(float(v.mean())) for k, v in per.items()} == means
    # noise seeded per image and percentage: an image scores the same alone, in any batch
    noisy = {"noise_std": 0.3, "percentages": (30, 50)}
    both = road_correct(region_classifier, images, saliency, targets, "lerf", batch_size=2, **noisy)
    first = road_correct(region_classifier, images[:1], saliency[:1], targets[:1], "lerf", batch_size=1, **noisy)
    assert all(torch.equal(both[p][:1], first[p]) for p in (30, 50))
