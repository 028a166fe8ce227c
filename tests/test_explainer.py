import json
from dataclasses import asdict

import pytest
import torch
import torchvision

from conftest import AUXILIARY, TINY_BACKBONE, TINY_PREP, assert_maps, count_syncs, red_explainer
from ptame.explainer import Explainer, check_images
from ptame.losses import LossWeights
from ptame.maps import MapSettings
from ptame.models import Classifier, Preprocessing


@pytest.mark.parametrize("maps", ["head", "explained"])
def test_gathered_training_step_equals_all_maps(tiny_explainer: Explainer, maps: str) -> None:
    tiny_explainer.loss_weights = LossWeights(ce=0.3, area=0.6, tv=0.1, maps=maps)
    tiny_explainer.head.eval()  # same BN statistics in both passes
    images = torch.rand(6, 3, 64, 64)
    gathered = tiny_explainer.training_step(images, gather_classes=True)
    g_grads = torch.autograd.grad(gathered["loss"], list(tiny_explainer.head.parameters()), allow_unused=True)
    full = tiny_explainer.training_step(images, gather_classes=False)
    f_grads = torch.autograd.grad(full["loss"], list(tiny_explainer.head.parameters()), allow_unused=True)
    for key in ("loss", "ce", "area", "tv"):
        torch.testing.assert_close(gathered[key], full[key], rtol=1e-5, atol=1e-6)
    for g, f in zip(g_grads, f_grads):
        if f is not None:
            torch.testing.assert_close(g if g is not None else torch.zeros_like(f), f, rtol=1e-4, atol=1e-7)


def test_training_step_trains_only_the_head(tiny_explainer: Explainer) -> None:
    tiny_explainer.train()
    assert not tiny_explainer.backbone.training and not tiny_explainer.auxiliary.training
    out = tiny_explainer.training_step(torch.rand(4, 3, 64, 64))
    out["loss"].backward()
    assert all(p.grad is not None for p in tiny_explainer.head.fuser.parameters())
    assert all(p.grad is None for p in tiny_explainer.backbone.parameters())
    assert all(p.grad is None for p in tiny_explainer.auxiliary.parameters())


def test_explain_returns_topk_maps_in_unit_range(tiny_explainer: Explainer) -> None:
    images = torch.rand(3, 3, 64, 64)
    out = tiny_explainer.explain(images, topk=2)
    assert_maps(out.saliency, (3, 2, 16, 16))
    probs = tiny_explainer.backbone(images).softmax(1)
    torch.testing.assert_close(out.classes, probs.topk(2).indices)
    torch.testing.assert_close(out.scores, probs.topk(2).values)
    assert tiny_explainer.head.training  # explain restores the mode it found


def test_explain_requested_classes(tiny_explainer: Explainer) -> None:
    images = torch.rand(2, 3, 64, 64)
    both = tiny_explainer.explain(images, classes=[[0, 3], [1, 2]])
    assert both.classes.tolist() == [[0, 3], [1, 2]]
    single = tiny_explainer.explain(images, classes=torch.tensor([3, 2]))
    torch.testing.assert_close(single.saliency[:, 0], both.saliency[:, 1])
    with pytest.raises(ValueError, match="classes must be in"):
        tiny_explainer.explain(images, classes=9)
    with pytest.raises(ValueError, match="classes must be in"):
        tiny_explainer.explain(images, classes=-5)  # the tiny CNN has 4 classes
    ranked = tiny_explainer.explain(images, classes=[[-2, -1, 1]] * 2)  # -j: the j-th prediction
    assert ranked.classes.tolist() == [both.probs.topk(2).indices[i].flip(0).tolist() + [1] for i in range(2)]
    # -1 stands for the prediction: one pass explains chosen and predicted classes side by side
    mixed = tiny_explainer.explain(images, classes=torch.tensor([-1, 2]))
    predicted = both.probs.argmax(1)
    assert mixed.classes[:, 0].tolist() == [int(predicted[0]), 2]
    torch.testing.assert_close(mixed.saliency[1, 0], single.saliency[1, 0])
    torch.testing.assert_close(mixed.saliency[0, 0], tiny_explainer.explain(images).saliency[0, 0])
    torch.testing.assert_close(mixed.probs, tiny_explainer.backbone(images).softmax(1))


def test_explain_restores_mode_when_it_fails(tiny_explainer: Explainer) -> None:
    tiny_explainer.train()
    with pytest.raises(ValueError):
        tiny_explainer.explain(torch.rand(2, 3, 64, 64), classes=[[0], [7]])
    assert tiny_explainer.head.training


def test_save_and_load_give_the_same_maps(tiny_explainer: Explainer, tmp_path) -> None:
    tiny_explainer.train()
    opt = torch.optim.SGD(tiny_explainer.head.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        tiny_explainer.training_step(torch.rand(4, 3, 64, 64))["loss"].backward()
        opt.step()
    tiny_explainer.save(tmp_path / "exp")
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["config.json", "head.safetensors"]
    loaded = Explainer.load(tmp_path / "exp")
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.explain(images).saliency, tiny_explainer.explain(images).saliency)
    assert loaded.preprocessing == TINY_PREP


@pytest.mark.parametrize("old_maps", [{"smoothing": 1.5, "cam_weight": 0.5, "activity_weight": 1.0}, {}], ids=["flat", "none"])
def test_explainers_saved_by_older_versions_still_load(tmp_path, old_maps: dict) -> None:
    """config.json keeps the map settings under "maps"; format 1 had them as flat keys, and before that none."""
    explainer = Explainer.from_uris(TINY_BACKBONE, "backbone", preprocessing=TINY_PREP, maps=MapSettings(**old_maps))
    explainer.init_head_from_classifier(scale=0.5)
    folder = explainer.save(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["maps"] == asdict(MapSettings(**old_maps)) and config["format_version"] == 2
    old = {k: v for k, v in config.items() if k not in ("maps", "format_version")}
    (folder / "config.json").write_text(json.dumps({**old, **old_maps, "format_version": 1}, indent=2))  # as ptame wrote it
    loaded = Explainer.load(folder)
    assert loaded.maps == MapSettings(**old_maps)
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.explain(images).saliency, explainer.explain(images).saliency)
    (folder / "config.json").write_text(json.dumps({**config, "maps": {"blur": 1.0}}))
    with pytest.raises(ValueError, match=r"unknown map settings \['blur'\]"):
        Explainer.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 3}))
    with pytest.raises(ValueError, match="saved by a newer ptame"):
        Explainer.load(folder)


def test_load_refuses_a_directory_without_an_explainer(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved explainer"):
        Explainer.load(tmp_path)


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.rand(3, 64, 64), ValueError, "shape"),
        (torch.rand(1, 1, 64, 64), ValueError, "RGB"),
        (torch.rand(1, 4, 64, 64), ValueError, "RGB"),
        (torch.full((1, 3, 64, 64), float("nan")), ValueError, "NaN"),
        (torch.rand(1, 3, 64, 64) * 255, ValueError, r"\[0, 1\]"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating"),
        (torch.rand(1, 3, 8, 8), ValueError, "32 x 32"),
        ([[0.0]], TypeError, "Tensor"),
    ],
)
def test_bad_images_are_refused_with_a_reason(images, error, match) -> None:
    with pytest.raises(error, match=match):
        check_images(images)


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "vit_b_16"])
def test_the_papers_backbones_train_and_explain(name: str, auxiliary) -> None:
    model = torchvision.models.get_model(name, weights=None)
    backbone = Classifier(model, Preprocessing(), 1000, uri=f"torchvision:{name}")
    explainer = Explainer(backbone, auxiliary)
    images = torch.rand(2, 3, 224, 224)
    out = explainer.training_step(images)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and explainer.head.fuser.weight.grad is not None
    result = explainer.explain(images)
    assert_maps(result.saliency, (2, 1, 56, 56))


@pytest.mark.gpu
def test_check_images_on_the_gpu_syncs_once_and_still_refuses_bad_input() -> None:
    good = torch.rand(8, 3, 64, 64, device="cuda")
    _, syncs = count_syncs(check_images, good)
    assert syncs == 1  # min, max and finiteness from one reduction, read back once
    for bad, error, match in [
        (torch.full((1, 3, 64, 64), float("nan"), device="cuda"), ValueError, "NaN"),
        (torch.full((1, 3, 64, 64), float("-inf"), device="cuda"), ValueError, "infinite"),
        (torch.rand(1, 3, 64, 64, device="cuda") * 255, ValueError, r"\[0, 1\]"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device="cuda"), TypeError, "floating"),
    ]:
        with pytest.raises(error, match=match):
            check_images(bad)


@pytest.mark.gpu
def test_training_step_and_explain_run_on_the_gpu(tiny_explainer: Explainer) -> None:
    explainer = tiny_explainer.cuda()
    images = torch.rand(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = explainer.training_step(images)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and explainer.head.fuser.weight.grad is not None
    result = explainer.explain(images, classes=[1, 2, 0, 3])
    assert result.saliency.is_cuda
    assert_maps(result.saliency.cpu(), (4, 1, 16, 16))


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_backbone_as_auxiliary_explains_in_one_forward_pass() -> None:
    explainer = Explainer.from_uris(TINY_BACKBONE, "backbone", preprocessing=TINY_PREP)
    assert explainer.auxiliary.names == ["features"] and explainer.head.channels == [32]
    calls = _count_calls(explainer.backbone.model)
    images = torch.rand(3, 3, 64, 64)
    out = explainer.explain(images, topk=2)
    assert calls[0] == 1  # prediction and the head's features from the same pass
    assert_maps(out.saliency, (3, 2, 16, 16))
    with torch.no_grad():
        probs = explainer.backbone(images).softmax(1)
    assert torch.equal(out.classes, probs.topk(2, 1).indices)
    calls[0] = 0
    explainer.loss_weights = LossWeights(deletion=0.5)
    explainer.training_step(images)
    assert calls[0] == 3  # unmasked (prediction + features), kept region, removed region


def test_cam_initialised_head_gives_the_class_activation_maps() -> None:
    explainer = Explainer.from_uris(TINY_BACKBONE, "backbone", preprocessing=TINY_PREP)
    explainer.init_head_from_classifier(scale=0.5)
    images = torch.rand(2, 3, 64, 64)
    classes = torch.tensor([[1, 3], [0, 2]])
    model = explainer.backbone.model
    with torch.no_grad():
        features = model.features(explainer.backbone.normalize(images))  # (2, 32, 16, 16)
        cam = torch.einsum("bchw,bkc->bkhw", features, model.fc.weight[classes])
        explainer.head.eval()
        got = explainer.head_logits(images, classes)
    torch.testing.assert_close(got, 0.5 * cam, rtol=1e-4, atol=1e-5)


def test_cam_init_needs_the_backbone_as_auxiliary(tiny_explainer: Explainer) -> None:
    with pytest.raises(ValueError, match="auxiliary 'backbone'"):
        tiny_explainer.init_head_from_classifier()


def test_explain_image_agrees_with_the_bulk_and_serving_rows(tiny_explainer, tmp_path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from ptame.data import ImageDecodeError, prepare_image
    from ptame.records import dequantize, explain_prepared

    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 90 x 60, shown rotated: 60 x 90
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    data = path.read_bytes()
    row = explain_prepared(tiny_explainer, [prepare_image(data, tiny_explainer.preprocessing)], topk=1)[0]
    for source in (path, str(path), data, Image.open(io.BytesIO(data))):
        got = tiny_explainer.explain_image(source)
        assert (got.class_index, got.label, got.crop_box, got.size) == (row["pred_class"], row["pred_label"], tuple(row["crop_box"]), (60, 90))
        assert abs(got.score - row["pred_score"]) < 1e-6
        np.testing.assert_allclose(got.saliency, dequantize(row["saliency"], row["saliency_shape"]), atol=0.5 / 255 + 1e-4)
    other = (row["pred_class"] + 1) % 4
    chosen = tiny_explainer.explain_image(data, class_=str(other))
    assert (chosen.class_index, chosen.label) == (other, str(other))
    assert tiny_explainer.explain_image(data, class_=-1).class_index == row["pred_class"]  # -1: the prediction
    with pytest.raises(ValueError, match="out of range"):
        tiny_explainer.explain_image(data, class_=9)
    with pytest.raises(ImageDecodeError):
        tiny_explainer.explain_image(b"not an image")


def test_smoothing_ranks_the_background_by_closeness_to_the_salient_region() -> None:
    from ptame.head import smooth_maps

    maps = torch.zeros(1, 1, 21, 21)
    maps[0, 0, 10, 10] = 1.0
    maps[0, 0, 0, 0] = maps[0, 0, 3, 10] = 1e-3  # two background pixels; the far one ranks higher unblurred
    assert maps[0, 0, 0, 0] == maps[0, 0, 3, 10]
    assert torch.equal(smooth_maps(maps, 0.0), maps)
    blurred = smooth_maps(maps, 2.0)[0, 0]
    assert blurred[3, 10] > blurred[0, 0]  # 7 px from the peak beats 14 px away
    # the peak's neighbours follow the Gaussian: exp(-d^2 / (2 sigma^2)) relative to the peak's own weight
    ratio = blurred[10, 12] / blurred[10, 10]
    assert ratio.item() == pytest.approx(torch.exp(torch.tensor(-4 / 8)).item(), rel=0.02)
    assert smooth_maps(torch.rand(2, 3, 4, 4), 5.0).shape == (2, 3, 4, 4)  # radius capped by tiny maps
    # the same blur as torchvision's (reflect padding), on a map that is not square
    from torchvision.transforms.v2.functional import gaussian_blur

    maps = torch.rand(2, 3, 20, 33)
    torch.testing.assert_close(smooth_maps(maps, 3.0), gaussian_blur(maps, [19, 19], [3.0, 3.0]), atol=1e-6, rtol=0)


def test_smoothing_is_saved_and_blurs_only_explanations(tiny_explainer: Explainer, tmp_path) -> None:
    from ptame.head import minmax_normalize, smooth_maps

    images = torch.rand(2, 3, 64, 64)
    sharp = tiny_explainer.explain(images)
    tiny_explainer.set_maps(MapSettings(smoothing=1.5))
    smooth = tiny_explainer.explain(images)
    with torch.no_grad():
        logits, features = tiny_explainer.logits_and_features(images)
        raw = tiny_explainer.head.eval()(features, smooth.classes)
    # the logits are blurred, then squashed: far from the evidence the map stays near 0
    torch.testing.assert_close(smooth.saliency, minmax_normalize(torch.sigmoid(smooth_maps(raw, 1.5))), atol=1e-5, rtol=0)
    assert not torch.allclose(smooth.saliency, sharp.saliency)
    loaded = Explainer.load(tiny_explainer.save(tmp_path / "m"))
    assert loaded.maps == MapSettings(smoothing=1.5)
    torch.testing.assert_close(loaded.explain(images).saliency, smooth.saliency)
    with pytest.raises(ValueError, match="smoothing must be >= 0"):
        MapSettings(smoothing=-1)


def test_set_maps_changes_the_maps_not_the_head_and_keeps_the_saved_extra(tmp_path) -> None:
    """What the DVC ``maps`` stage does: a trained head re-saved with other map settings."""
    explainer = Explainer.from_uris(TINY_BACKBONE, "backbone", preprocessing=TINY_PREP)
    explainer.init_head_from_classifier(scale=0.5)
    images = torch.rand(2, 3, 64, 64)
    plain = explainer.explain(images).saliency
    explainer.save(tmp_path / "head", extra={"train": {"steps": 7}})
    loaded = Explainer.load(tmp_path / "head")
    assert loaded.saved_extra == {"train": {"steps": 7}}
    loaded.set_maps(MapSettings(smoothing=1.5, cam_weight=0.5, activity_weight=1.0))
    again = Explainer.load(loaded.save(tmp_path / "explainer", extra=loaded.saved_extra))
    assert again.maps == MapSettings(smoothing=1.5, cam_weight=0.5, activity_weight=1.0)
    assert again.saved_extra == {"train": {"steps": 7}}
    for name, value in again.head.state_dict().items():
        assert torch.equal(value, explainer.head.state_dict()[name]), name
    assert not torch.allclose(again.explain(images).saliency, plain)
    again.set_maps()  # the paper's maps again: the same as before
    torch.testing.assert_close(again.explain(images).saliency, plain)
    with pytest.raises(ValueError, match="cam_weight must be >= 0"):
        again.set_maps(MapSettings(cam_weight=-0.5))
    with pytest.raises(TypeError, match="maps must be a MapSettings"):
        again.set_maps({"cam_weight": 0.5})  # type: ignore[arg-type]


def test_explained_training_masks_with_the_maps_explain_returns() -> None:
    """``loss.maps: explained``: the training mask is exactly the judged map (map terms, blur, min-max)."""
    import torch.nn.functional as F

    maps = MapSettings(smoothing=1.0, cam_weight=0.5, activity_weight=1.0)
    explainer = Explainer.from_uris(TINY_BACKBONE, "backbone", preprocessing=TINY_PREP, maps=maps)
    explainer.init_head_from_classifier(scale=0.5)
    explainer.head.eval()  # the same BN statistics as explain()
    images = torch.rand(4, 3, 64, 64)
    saliency = explainer.explain(images).saliency  # (4, 1, 16, 16), the predicted class
    kept = F.interpolate(saliency, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        targets = explainer.backbone(images).argmax(1)
        expected = F.cross_entropy(explainer.backbone(images * kept), targets)
    ce = {}
    for source in ("explained", "head"):
        explainer.loss_weights = LossWeights(ce=1.0, area=0.5, maps=source)
        out = explainer.training_step(images)
        out["loss"].backward()
        assert explainer.head.fuser.weight.grad.abs().sum() > 0  # the head learns through the map terms
        explainer.head.zero_grad()
        ce[source] = out["ce"]
    torch.testing.assert_close(ce["explained"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ce["head"], expected, rtol=1e-3, atol=1e-4)  # the paper's mask is another one
    with pytest.raises(ValueError, match="loss maps must be one of"):
        LossWeights(maps="judged")


def test_cam_weight_adds_the_backbones_class_activation_maps(tmp_path) -> None:
    from ptame.head import minmax_normalize

    explainer = Explainer.from_uris(TINY_BACKBONE, "backbone", preprocessing=TINY_PREP, maps=MapSettings(cam_weight=0.5))
    explainer.init_head_from_classifier(scale=0.5)  # the untrained head's logits: 0.5 x CAM
    images = torch.rand(2, 3, 64, 64)
    classes = torch.tensor([[1, 3], [0, 2]])
    model = explainer.backbone.model
    with torch.no_grad():
        features = model.features(explainer.backbone.normalize(images))
        probs = model.fc(features.mean((2, 3))).softmax(1)
        cam = torch.einsum("bchw,bkc->bkhw", features, model.fc.weight[classes])
        # the share of log p_c at each location: (W_c - sum_k p_k W_k) . F
        log_p_cam = torch.einsum("bchw,bkc->bkhw", features, model.fc.weight[classes] - (probs @ model.fc.weight)[:, None])
    got = explainer.explain(images, classes=classes).saliency
    torch.testing.assert_close(got, minmax_normalize(torch.sigmoid(0.5 * cam + 0.5 * log_p_cam)), rtol=1e-4, atol=1e-5)
    loaded = Explainer.load(explainer.save(tmp_path / "m"))
    assert loaded.maps.cam_weight == 0.5
    torch.testing.assert_close(loaded.explain(images, classes=classes).saliency, got)
    with pytest.raises(ValueError, match="cam_weight needs auxiliary 'backbone'"):
        Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP, maps=MapSettings(cam_weight=0.5))
    with pytest.raises(ValueError, match="cam_weight must be >= 0"):
        MapSettings(cam_weight=-1.0)


def test_cam_weight_ranks_counter_evidence_below_the_background() -> None:
    """Red argues for class 0, blue against it: with the CAM added, blue is the least relevant,
    below the neutral grey (what ROAD's LeRF removes first), and red the most. (Only class 0 has
    weights, so the CAM of log p_0 is (1 - p_0) x class 0's CAM.)"""
    explainer = red_explainer()
    model = explainer.backbone.model
    with torch.no_grad():
        model.features[0].weight[1, :, 1, 1] = torch.tensor([-1.0, -1.0, 1.0])  # B - R - G: 2.4 on blue
        model.features[0].bias[1] = -1.0
        model.features[3].weight[1, 1, 1, 1] = 1.0
        model.features[6].weight[1, 1, 1, 1] = 1.0
        model.fc.weight[0, 1] = -20.0
        explainer.head.fuser.weight.zero_()  # a head that has learned nothing: a constant map
    image = torch.full((1, 3, 64, 64), 0.5)
    image[0, :, 8:24, 8:24] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # red, top left
    image[0, :, 40:56, 40:56] = torch.tensor([0.1, 0.1, 0.9])[:, None, None]  # blue, bottom right
    assert explainer.explain(image, classes=0).saliency.abs().max() == 0  # the head alone ranks nothing
    explainer.set_maps(MapSettings(cam_weight=1.0))
    saliency = explainer.explain(image, classes=0).saliency[0, 0]  # 16 x 16 map: 4 pixels per cell
    red, grey, blue = saliency[2:6, 2:6].mean(), saliency[2:6, 10:14].mean(), saliency[10:14, 10:14].mean()
    assert red > 0.9 and blue < 0.1
    assert blue < grey - 0.2 and grey < red


def test_activity_weight_ranks_empty_background_lowest(tmp_path) -> None:
    """Red is class 0's evidence; blue makes the network fire but counts for no class; the rest is empty
    grey. The map alone ties blue and grey; with the activity added, grey (nothing there) ranks below
    blue, and red stays on top. The activity is the last map's channel norm over its image mean, - 1."""
    explainer = red_explainer()
    model = explainer.backbone.model
    with torch.no_grad():
        model.features[0].weight[1, :, 1, 1] = torch.tensor([-1.0, -1.0, 1.0])  # fires on blue only
        model.features[0].bias[1] = -1.0
        model.features[3].weight[1, 1, 1, 1] = 1.0
        model.features[6].weight[1, 1, 1, 1] = 1.0  # no classifier weight: neutral for every class
    image = torch.full((1, 3, 64, 64), 0.5)
    image[0, :, 8:24, 8:24] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # red, top left
    image[0, :, 40:56, 40:56] = torch.tensor([0.1, 0.1, 0.9])[:, None, None]  # blue, bottom right

    def parts(saliency: torch.Tensor) -> tuple[float, float, float]:  # 16 x 16 map: 4 pixels per cell
        return saliency[2:6, 2:6].mean().item(), saliency[2:6, 10:14].mean().item(), saliency[10:14, 10:14].mean().item()

    red, grey, blue = parts(explainer.explain(image, classes=0).saliency[0, 0])
    assert blue == pytest.approx(grey, abs=1e-6) and red > grey + 0.5
    with torch.no_grad():
        _, features = explainer.logits_and_features(image)
        norm = features[-1].norm(dim=1)
    torch.testing.assert_close(Explainer.activity(features)[:, 0], norm / norm.mean() - 1)
    explainer.set_maps(MapSettings(activity_weight=1.0))
    red_a, grey_a, blue_a = parts(explainer.explain(image, classes=0).saliency[0, 0])
    assert blue_a > grey_a + 0.5 and red_a > blue_a + 0.05  # the order: red, then blue, then grey
    loaded = Explainer.load(explainer.save(tmp_path / "m"))
    assert loaded.maps.activity_weight == 1.0
    with pytest.raises(ValueError, match="activity_weight needs auxiliary 'backbone'"):
        Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP, maps=MapSettings(activity_weight=1.0))
    with pytest.raises(ValueError, match="activity_weight must be >= 0"):
        MapSettings(activity_weight=-1.0)
