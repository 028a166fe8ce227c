"""The evaluate stage: every method scored by the same code, wired to the right cells and classes."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from PIL import Image

from ptame.evaluate import EvalSet, as_table, evaluate, load_eval_set, render_gallery, write_road_plots
from ptame.saliency import rise_multi
from ptame.prepare import write_shards
from ptame.saliency import METHODS, saliency


def _grid_set(explainer, n: int = 2) -> EvalSet:
    """Random 64 px images with made-up, distinct cell classes of the tiny 4-class backbone."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(n, 3, 64, 64, generator=g)
    targets = explainer.backbone(images).argmax(1)
    cells = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    originals = [Image.fromarray((images[i].permute(1, 2, 0) * 255).byte().numpy()) for i in range(n)]
    return EvalSet([f"img{i}" for i in range(n)], images, targets, originals, [(0, 0, 64, 64)] * n, cells)


@pytest.fixture()
def oracle():
    """A method whose map of class c fills exactly the grid cell that holds c (or all, if none)."""
    state: dict = {}

    def method(model, images, classes, **_):
        evalset = state["set"]
        out = torch.zeros(images.shape[0], 16, 16)
        for j in range(images.shape[0]):
            i = next(k for k in range(len(evalset.image_ids)) if torch.equal(evalset.images[k], images[j]))
            where = (evalset.grid_classes[i] == classes[j]).nonzero()
            if len(where) == 0:
                out[j] = 1.0
                continue
            cell = int(where[0])
            out[j, (cell // 2) * 8 : (cell // 2) * 8 + 8, (cell % 2) * 8 : (cell % 2) * 8 + 8] = 1.0
        return out

    METHODS["oracle"] = method
    try:
        yield state
    finally:
        del METHODS["oracle"]


def test_rise_multi_equals_rise_per_class(tiny_explainer) -> None:
    images = torch.rand(2, 3, 64, 64)
    classes = torch.tensor([[0, 2, 3], [1, 0, 2]])
    multi = rise_multi(tiny_explainer.backbone, images, classes, num_masks=40, batch_size=16, seed=4, progress=False)
    for k in range(3):
        single = saliency("rise", tiny_explainer.backbone, images, classes[:, k], num_masks=40, batch_size=16, seed=4)
        torch.testing.assert_close(multi[:, k], single, atol=1e-5, rtol=1e-4)


def test_grid_pointing_game_uses_each_cells_class(tiny_explainer, oracle) -> None:
    evalset = _grid_set(tiny_explainer)
    oracle["set"] = evalset
    result = evaluate(tiny_explainer, evalset, {"oracle": {}, "ptame": {}}, percentages=(30, 70))
    assert result.metrics["oracle"]["GridPG"] == pytest.approx(1.0)  # perfect localisation scores 1
    m = result.metrics["ptame"]
    for key in ("AD@100", "AD@50", "AD@15", "IC@100", "IC@50", "IC@15", "ROAD-MoRF", "ROAD-LeRF", "GridPG", "sec_per_image"):
        assert key in m and m[key] == m[key]  # present and not NaN
    assert {"ROAD-MoRF@30", "ROAD-LeRF@70"} <= set(m)
    assert 0.0 <= m["GridPG"] <= 1.0 and m["images"] == 2.0
    assert result.curves["ptame"]["MoRF"] == {30: m["ROAD-MoRF@30"], 70: m["ROAD-MoRF@70"]}
    assert result.maps["oracle"].shape == (2, 16, 16)
    assert "| oracle |" in as_table(result.metrics)


def test_uniform_maps_score_chance_and_subsets(tiny_explainer) -> None:
    METHODS["uniform"] = lambda model, images, classes, **_: torch.ones(images.shape[0], 8, 8)
    try:
        evalset = _grid_set(tiny_explainer, n=3)
        result = evaluate(tiny_explainer, evalset, {"uniform": {"max_images": 2}}, percentages=(50,))
    finally:
        del METHODS["uniform"]
    m = result.metrics["uniform"]
    assert m["GridPG"] == pytest.approx(0.25)
    assert m["images"] == 2.0
    # a map of ones keeps the whole image: nothing drops, nothing rises
    assert m["AD@100"] == pytest.approx(0.0, abs=1e-6) and m["IC@100"] == 0.0


def test_load_eval_set_skips_bad_rows_and_reads_cells(tiny_explainer, tmp_path) -> None:
    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (80, 64), c).save(buf, format="PNG")
        return buf.getvalue()

    rows = [
        {"image_id": "a", "image": png((255, 0, 0)), "grid_classes": [0, 1, 2, 3]},
        {"image_id": "bad", "image": b"not an image", "grid_classes": [0, 1, 2, 3]},
        {"image_id": "c", "image": png((0, 0, 255)), "grid_classes": [3, 2, 1, 0]},
    ]
    write_shards(rows, tmp_path / "eval")
    evalset = load_eval_set(tmp_path / "eval", tiny_explainer.backbone)
    assert evalset.image_ids == ["a", "c"]
    assert evalset.images.shape == (2, 3, 64, 64)
    assert evalset.grid_classes.tolist() == [[0, 1, 2, 3], [3, 2, 1, 0]]
    assert evalset.crop_boxes[0] == (8, 0, 72, 64)  # centre crop of an 80 x 64 image
    assert evalset.targets.tolist() == tiny_explainer.backbone(evalset.images).argmax(1).tolist()


def test_plots_and_gallery_files(tiny_explainer, tmp_path) -> None:
    curves = {"ptame": {"MoRF": {10: 0.5, 50: 0.25}, "LeRF": {10: 1.0, 50: 0.75}}, "gradcam": {"MoRF": {10: 0.4, 50: 0.2}, "LeRF": {10: 0.9, 50: 0.5}}}
    paths = write_road_plots(curves, tmp_path)
    with paths[0].open() as f:
        rows = list(csv.reader(f))
    assert rows == [["percentage", "ptame", "gradcam"], ["0", "1.0", "1.0"], ["10", "0.5", "0.4"], ["50", "0.25", "0.2"], ["100", "0.0", "0.0"]]

    evalset = _grid_set(tiny_explainer, n=3)
    maps = {"ptame": torch.rand(3, 16, 16), "gradcam": torch.rand(3, 8, 8)}
    written = render_gallery(evalset, maps, tmp_path / "gallery", count=2, height=100)
    assert [p.name for p in written] == ["00_img0.png", "01_img1.png", "gallery.png"]
    row = Image.open(written[0])
    assert row.size == (3 * 100 + 2 * 4, 122)  # image | ptame | gradcam, each 100 px + caption
    assert Image.open(written[-1]).size == (308, 2 * 122 + 4)
    with pytest.raises(ValueError, match="were not evaluated"):
        render_gallery(evalset, maps, tmp_path / "g2", methods=("rise",))
