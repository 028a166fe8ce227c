import pytest
import torch

from conftest import assert_maps, dilate
from ptame.metrics import pointing_hit
from ptame.taps import probe_input
from ptame.saliency import METHODS, find_target_layer, rise_masks, saliency
from ptame.testing import object_scenes


def test_every_method_is_registered() -> None:
    assert {"ptame", "gradcam", "gradcampp", "scorecam", "rise"} <= set(METHODS)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "scorecam"])
def test_cam_methods_find_the_object(method: str, scene_backbone) -> None:
    images, labels, masks = object_scenes(16, seed=5)
    maps = saliency(method, scene_backbone, images, labels)
    assert_maps(maps, (16, 64, 64))
    assert pointing_hit(maps, dilate(masks, 4)).float().mean() >= 0.8


def test_rise_finds_the_object(scene_backbone) -> None:
    images, labels, masks = object_scenes(8, seed=6)
    maps = saliency("rise", scene_backbone, images, labels, num_masks=1000, cells=6)
    assert_maps(maps, (8, 64, 64))
    assert pointing_hit(maps, dilate(masks, 4)).all()


def test_rise_under_bf16_autocast_gives_the_float32_map(scene_backbone) -> None:
    images, labels, _ = object_scenes(4, seed=6)
    full = saliency("rise", scene_backbone, images, labels, num_masks=300, cells=6)
    amp = saliency("rise", scene_backbone, images, labels, num_masks=300, cells=6, amp=True)
    # the same masks, weighted by bf16 probabilities: maps in [0, 1] that differ by ~1e-3
    assert float((amp - full).abs().max()) < 0.02
    assert not torch.equal(amp, full)  # the passes really ran in bf16


def test_rise_masks_are_smooth_and_keep_about_p() -> None:
    masks = rise_masks(400, (32, 48), cells=4, p=0.5, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 32, 48)
    assert 0.0 <= float(masks.min()) and float(masks.max()) <= 1.0
    assert abs(float(masks.mean()) - 0.5) < 0.05
    assert float((masks[..., 1:] - masks[..., :-1]).abs().max()) < 0.2  # bilinear, no hard edges


def test_ptame_method_uses_the_explainer(tiny_explainer) -> None:
    images = torch.rand(2, 3, 64, 64)
    maps = saliency("ptame", tiny_explainer, images, torch.tensor([1, 2]))
    torch.testing.assert_close(maps, tiny_explainer.explain(images, classes=[1, 2]).saliency[:, 0])
    with pytest.raises(TypeError, match="trained Explainer"):
        saliency("ptame", tiny_explainer.backbone, images, torch.tensor([1, 2]))


def test_target_layer_is_chosen_for_cnns_and_refused_for_vit() -> None:
    import torchvision

    assert find_target_layer(torchvision.models.resnet18())[0] == "layer4"
    with pytest.raises(ValueError, match="vision transformer"):
        find_target_layer(torchvision.models.vit_b_16())


def test_bad_method_and_classes(tiny_explainer) -> None:
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown saliency method"):
        saliency("lime", tiny_explainer, images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="classes must have shape"):
        saliency("gradcam", tiny_explainer, images, torch.tensor([0, 1, 2]))


def test_target_layer_probe_follows_the_model_dtype() -> None:
    from ptame.testing import tiny_cnn

    model = tiny_cnn().double()  # a float32 CPU probe would fail on float64 weights, as on a GPU model
    assert probe_input(model, 40).dtype == torch.float64
    assert find_target_layer(model, 64)[0] == find_target_layer(tiny_cnn(), 64)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_cam_methods_on_a_gpu_backbone(method: str, scene_backbone) -> None:
    import copy

    backbone = copy.deepcopy(scene_backbone).cuda()
    assert probe_input(backbone.model, 64).device.type == "cuda"
    assert find_target_layer(backbone.model, 64)[0] == find_target_layer(scene_backbone.model, 64)[0]
    images, labels, masks = object_scenes(16, seed=5)
    maps = saliency(method, backbone, images.cuda(), labels.cuda())
    assert maps.is_cuda
    assert_maps(maps.cpu(), (16, 64, 64))
    assert pointing_hit(maps.cpu(), dilate(masks, 4)).float().mean() >= 0.8
