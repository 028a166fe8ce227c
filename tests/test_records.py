import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ptame.data import prepare_image
from ptame.records import dequantize, explain_prepared, quantize


def test_quantise_round_trip_within_half_a_step() -> None:
    sal = torch.rand(7, 5)
    data = quantize(sal)
    assert len(data) == 35
    back = dequantize(data, (7, 5))
    assert np.abs(back - sal.numpy()).max() <= 0.5 / 255 + 1e-6
    assert data[1] == round(float(sal[0, 1]) * 255)  # row-major
    with pytest.raises(ValueError, match="bytes"):
        dequantize(data, (5, 5))


def test_explain_prepared_gives_a_row_per_input(tiny_explainer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(buf, "PNG")
    items = [prepare_image(buf.getvalue(), tiny_explainer.preprocessing), prepare_image(b"nope", tiny_explainer.preprocessing)]
    rows = explain_prepared(tiny_explainer, items, topk=3)
    assert len(rows) == 2
    good, bad = rows
    assert good["error"] is None and bad["error"] == "not a recognised image format"
    assert (good["width"], good["height"]) == (90, 70)
    assert good["saliency_shape"] == [16, 16] and len(good["saliency"]) == 256
    assert good["topk_classes"][0] == good["pred_class"] and len(good["topk_scores"]) == 3
    expected = tiny_explainer.explain(items[0].tensor[None]).saliency[0, 0]
    assert np.abs(dequantize(good["saliency"], (16, 16)) - expected.numpy()).max() <= 0.5 / 255 + 1e-6
    assert bad["saliency"] is None and bad["pred_class"] is None


@pytest.mark.gpu
def test_explain_prepared_reads_the_gpu_once_per_batch_not_per_row(tiny_explainer, monkeypatch) -> None:
    from conftest import count_syncs

    # full fp32 on the GPU, so that its maps can be compared with the CPU's
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu_explainer = copy.deepcopy(tiny_explainer)
    explainer = tiny_explainer.cuda()
    buf = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(buf, "PNG")
    item = prepare_image(buf.getvalue(), explainer.preprocessing)
    rows2, syncs2 = count_syncs(explain_prepared, explainer, [item] * 2, topk=3)
    rows8, syncs8 = count_syncs(explain_prepared, explainer, [item] * 8, topk=3)
    assert syncs8 == syncs2  # host reads do not grow with the batch
    assert len(rows8) == 8 and all(r["error"] is None for r in rows8)
    cpu = explain_prepared(cpu_explainer, [item], topk=3)[0]
    for row in (rows2[0], rows8[7]):
        assert sorted(row["topk_classes"]) == sorted(cpu["topk_classes"])
        assert row["pred_score"] == pytest.approx(cpu["pred_score"], abs=1e-4)
        assert np.abs(dequantize(row["saliency"], (16, 16)) - dequantize(cpu["saliency"], (16, 16))).max() <= 1.5 / 255


def test_resolve_class_takes_an_index_or_a_label() -> None:
    from ptame.classes import resolve_class

    names = ["tabby cat", "Dog", "12", "bird"]
    assert [resolve_class(v, names) for v in (1, "3", " 0 ", "tabby cat", "dog", "BIRD")] == [1, 3, 0, 0, 1, 3]
    assert resolve_class("2", names) == 2  # digits are an index, even where a label looks like one
    assert resolve_class(-1, names) is None and resolve_class(" -1", names) is None  # -1: the prediction
    with pytest.raises(ValueError, match=r"class -2 is out of range: this model has classes 0 to 3 \(-1: the prediction\)"):
        resolve_class("-2", names)
    with pytest.raises(ValueError, match="class 4 is out of range: this model has classes 0 to 3"):
        resolve_class(4, names)
    with pytest.raises(ValueError, match="unknown class 'zebra'.*'tabby cat'"):
        resolve_class("zebra", names)
    with pytest.raises(TypeError):
        resolve_class(True, names)


def test_full_view_maps_the_whole_image_where_the_crop_misses_the_object() -> None:
    """Ground truth: a red square at the far left of a wide image, outside its centre square; the
    hand-wired red detector's map of class 0 is exactly the red region."""
    from conftest import RED_BOX, TINY_PREP, red_cells, red_explainer, red_scene

    explainer, data = red_explainer(), red_scene()
    crop, full = explain_prepared(explainer, [prepare_image(data, TINY_PREP), prepare_image(data, TINY_PREP, view="full")], topk=4)
    left, _, right, _ = crop["crop_box"]
    assert (left, right) == (32, 96) and RED_BOX[2] <= left  # the classifier's own view never sees the object
    assert crop["pred_class"] == 3  # "no object"
    assert full["crop_box"] == [0, 0, 128, 64] and full["pred_class"] == 0  # the whole image: red found
    assert full["saliency_shape"] == [8, 16]  # cut to the image: 2:1 like the image, no padding rows
    sal = torch.from_numpy(dequantize(full["saliency"], full["saliency_shape"]))
    assert torch.equal(sal >= 0.5, red_cells((8, 16)))  # hot exactly where the object is, at the left edge
    assert float(sal.max()) == 1.0 and float(sal.min()) == 0.0  # min-max normalised on the image's part

    got = explainer.explain_image(data, view="full")  # the Python API gives the same map and box
    assert got.crop_box == (0, 0, 128, 64) and got.label == "0" and got.saliency.shape == (8, 16)
    np.testing.assert_allclose(got.saliency, sal.numpy(), atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match=r"view must be one of \['crop', 'full'\]"):
        explainer.explain_image(data, view="whole")


@pytest.mark.parametrize("size", [(600, 400), (400, 600), (90, 70), (64, 64), (300, 20)])
def test_full_view_map_shape_follows_the_aspect_ratio(tiny_explainer, size) -> None:
    width, height = size
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 200, 30)).save(buf, "PNG")
    row = explain_prepared(tiny_explainer, [prepare_image(buf.getvalue(), tiny_explainer.preprocessing, view="full")])[0]
    h, w = row["saliency_shape"]
    assert row["crop_box"] == [0, 0, width, height] and len(row["saliency"]) == h * w
    assert max(h, w) == 16  # the longer side keeps every cell of the 16 x 16 map
    assert abs(min(h, w) - 16 * min(size) / max(size)) <= 1  # the shorter side: the image's share, to a cell


def alternate_signs(explainer) -> None:
    """Known ground truth: class k's fuser row is (-1)^k times class 0's, so the maps of an even and
    an odd class are exact inverses (sigmoid(-x) = 1 - sigmoid(x), and min-max keeps that)."""
    with torch.no_grad():
        w = explainer.head.fuser.weight
        w.copy_(w[:1] * torch.tensor([(-1.0) ** k for k in range(w.shape[0])]).view(-1, 1, 1, 1))


def test_explain_prepared_topk_maps_from_the_same_pass(tiny_explainer) -> None:
    alternate_signs(tiny_explainer)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    items = [prepare_image(buf.getvalue(), tiny_explainer.preprocessing), prepare_image(b"nope", tiny_explainer.preprocessing)]
    calls = []
    handle = tiny_explainer.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        good, bad = explain_prepared(tiny_explainer, items, topk=3, topk_maps=True)
        chosen = explain_prepared(tiny_explainer, items[:1], topk=3, classes=[good["topk_classes"][2]], topk_maps=True)[0]
    finally:
        handle.remove()
    assert len(calls) == 2  # one backbone pass per call
    assert "topk_saliency" not in bad and bad["error"]
    assert len(good["topk_saliency"]) == 3 and good["topk_saliency"][0] == good["saliency"]
    expected = tiny_explainer.explain(items[0].tensor[None], topk=3)
    maps = [dequantize(m, good["saliency_shape"]) for m in good["topk_saliency"]]
    for got, want in zip(maps, expected.saliency[0]):
        assert np.abs(got - want.numpy()).max() <= 0.5 / 255 + 1e-6
    for c, m in zip(good["topk_classes"], maps):  # the ground truth: odd classes see the inverse map
        assert np.abs(m - (maps[0] if (c - good["topk_classes"][0]) % 2 == 0 else 1 - maps[0])).max() <= 1 / 255 + 1e-6
    assert max(np.abs(m - maps[0]).max() for m in maps) > 0.5  # they differ across classes
    # a chosen class: saliency is its map, the top-k maps are still those of topk_classes
    assert chosen["saliency_class"] == good["topk_classes"][2] and chosen["topk_saliency"] == good["topk_saliency"]
    assert chosen["saliency"] == good["topk_saliency"][2]
    assert "topk_saliency" not in explain_prepared(tiny_explainer, items[:1], topk=3)[0]
