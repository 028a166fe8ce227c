"""The evaluate stage: every method scored by the same code, wired to the right cells and classes."""

from __future__ import annotations

import csv
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ptame.evaluate import EvalSet, evaluate, load_eval_set
from ptame.reports import as_table, render_gallery, write_road_plots
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
    # `ptame evaluate` reads the same shards alike, grid cells (hence GridPG) included, the bad row left out
    from ptame.reports import load_image_set

    same, skipped = load_image_set(str(tmp_path / "eval" / "*.parquet"), tiny_explainer)
    assert same.image_ids == evalset.image_ids and same.digests == evalset.digests
    assert same.grid_classes.tolist() == evalset.grid_classes.tolist()
    torch.testing.assert_close(same.images, evalset.images)
    assert [s["image_id"] for s in skipped] == ["bad"]


def test_load_image_set_reads_each_rows_class_past_a_bad_row(tiny_explainer, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), c).save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({
        "image_id": ["a", "bad", "c", "d"],
        "image": [png((255, 0, 0)), b"not an image", png((0, 0, 255)), png((0, 255, 0))],
        "target": ["2", "1", None, "0"],  # the bad row's class must not shift the later rows' classes
    })  # fmt: skip
    pq.write_table(table, tmp_path / "rows.parquet")
    from ptame.reports import load_image_set

    evalset, skipped = load_image_set(str(tmp_path / "rows.parquet"), tiny_explainer, classes="target")
    assert evalset.image_ids == ["a", "c", "d"] and [s["image_id"] for s in skipped] == ["bad"]
    predicted = int(tiny_explainer.backbone(evalset.images[1:2]).argmax(1))
    assert evalset.targets.tolist() == [2, predicted, 0]  # no class given: the prediction is explained


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


def _without_timing(metrics: dict) -> dict:
    return {m: {k: v for k, v in values.items() if k != "sec_per_image"} for m, values in metrics.items()}


def test_batched_repeatable_and_subsets_on_identical_images(tiny_explainer) -> None:
    evalset = _grid_set(tiny_explainer, n=3)
    methods = {"ptame": {}, "gradcam": {}, "rise": {"num_masks": 24, "batch_size": 8, "max_images": 2, "seed": 1}}
    kw = {"percentages": (30, 70), "noise_std": 0.05, "resamples": 200}
    one = evaluate(tiny_explainer, evalset, methods, batch_size=1, **kw)
    again = evaluate(tiny_explainer, evalset, methods, batch_size=1, **kw)
    batched = evaluate(tiny_explainer, evalset, methods, batch_size=2, **kw)
    assert _without_timing(one.metrics) == _without_timing(again.metrics)  # deterministic
    # batches change nothing but the speed
    for method, values in _without_timing(one.metrics).items():
        assert _without_timing(batched.metrics)[method] == pytest.approx(values, rel=1e-5, abs=1e-6), method
    # P-TAME and Grad-CAM also on RISE's two images: the same numbers as scoring them on those alone
    assert set(one.metrics) == {"ptame", "gradcam", "rise", "ptame@rise", "gradcam@rise"}
    assert one.metrics["ptame"]["n"] == 3 and one.metrics["rise"]["n"] == one.metrics["ptame@rise"]["n"] == 2
    alone = evaluate(tiny_explainer, evalset, {"ptame": {"max_images": 2}}, batch_size=2, **kw)
    expected = {k: v for k, v in alone.metrics["ptame"].items() if k != "sec_per_image"}
    assert {k: v for k, v in one.metrics["ptame@rise"].items() if k != "sec_per_image"} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # point values are the means of the per-image scores, inside their interval
    m, per = one.metrics["ptame"], one.per_image["ptame"]
    assert m["ROAD-MoRF"] == pytest.approx(per["ROAD-MoRF"].mean()) and per["GridPG"].shape == (3,)
    for key in ("AD@100", "IC@15", "ROAD-MoRF", "ROAD-LeRF", "GridPG"):
        assert m[f"{key}_lo"] <= m[key] + 1e-9 and m[key] <= m[f"{key}_hi"] + 1e-9
    assert "sec_per_image_lo" not in m and "ROAD-MoRF@30_lo" not in m


def test_bootstrap_intervals_hand_computed() -> None:
    from ptame.evaluate import bootstrap_intervals

    # two images scoring 0 and 1: resampled means are 0, .5, 1 with probability 1/4, 1/2, 1/4
    # -> the 2.5th percentile is 0 and the 97.5th is 1
    out = bootstrap_intervals({"a": np.array([0.0, 1.0]), "b": np.array([5.0, 5.0]), "c": np.array([7.0])})
    assert out == {"a": (0.0, 1.0), "b": (5.0, 5.0), "c": (7.0, 7.0)}
    # paired: arrays of one length share the resampled indices, so a shift moves the bounds alike
    values = np.arange(10.0)
    both = bootstrap_intervals({"x": values, "y": values + 1.0}, resamples=300, seed=3)
    assert both["y"] == pytest.approx((both["x"][0] + 1.0, both["x"][1] + 1.0))
    assert both["x"][0] < 4.5 < both["x"][1]
    assert bootstrap_intervals({"x": values}, resamples=300, seed=3) == {"x": both["x"]}  # repeatable
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals({"x": values}, resamples=0)


def test_paired_differences_hand_computed() -> None:
    from ptame.evaluate import bootstrap_intervals, paired_differences

    per_image = {
        "ptame": {"ROAD-LeRF": np.array([1.0, 0.0, 1.0]), "GridPG": np.array([0.9, 0.8, 0.7])},
        "gradcam": {"ROAD-LeRF": np.array([0.0, 0.0, 1.0]), "GridPG": np.array([0.5, 0.4, 0.3])},
        "rise": {"ROAD-LeRF": np.array([0.0]), "GridPG": np.array([0.25])},
        "ptame@rise": {"ROAD-LeRF": np.array([1.0]), "GridPG": np.array([0.9])},
    }
    out = paired_differences(per_image, resamples=200, seed=1)
    assert set(out) == {"ptame - gradcam", "ptame - rise"}  # subsets are not compared again
    gc = out["ptame - gradcam"]
    # per image 1, 0, 0 -> mean 1/3, bootstrapped with the indices the metrics' intervals use
    assert gc["ROAD-LeRF"] == pytest.approx(1 / 3) and gc["n"] == 3
    assert (gc["ROAD-LeRF_lo"], gc["ROAD-LeRF_hi"]) == bootstrap_intervals({"d": np.array([1.0, 0.0, 0.0])}, 200, 1)["d"]
    # a constant per-image gap is a zero-width interval, although both marginal intervals are wide
    assert [gc["GridPG"], gc["GridPG_lo"], gc["GridPG_hi"]] == pytest.approx([0.4, 0.4, 0.4])
    assert out["ptame - rise"] == pytest.approx(
        {"ROAD-LeRF": 1.0, "ROAD-LeRF_lo": 1.0, "ROAD-LeRF_hi": 1.0, "GridPG": 0.65, "GridPG_lo": 0.65, "GridPG_hi": 0.65, "n": 1}
    )  # RISE is compared on its own image, with ptame@rise
    assert paired_differences({"gradcam": per_image["gradcam"]}) == {}
    limited = {"ptame": {"GridPG": np.array([0.9])}, "gradcam": {"GridPG": np.array([0.5, 0.1])},
               "gradcam@ptame": {"GridPG": np.array([0.5])}}  # fmt: skip
    assert paired_differences(limited)["ptame - gradcam"]["GridPG"] == pytest.approx(0.4)
    table = as_table(out, ("n", "GridPG"), intervals=True).splitlines()
    assert table[2].startswith("| ptame - gradcam | 3 | +0.4 [+0.4, +0.4] |")


def test_timing_after_warm_up_in_batches(tiny_explainer) -> None:
    calls: list[int] = []

    def slow_first(model, images, classes, **_):
        if not calls:
            time.sleep(0.5)  # a lazy initialisation that the warm-up batch absorbs
        calls.append(images.shape[0])
        return torch.ones(images.shape[0], 8, 8)

    METHODS["slow_first"] = slow_first
    try:
        evalset = _grid_set(tiny_explainer, n=5)
        result = evaluate(tiny_explainer, evalset, {"slow_first": {}}, percentages=(50,), batch_size=2, resamples=10)
    finally:
        del METHODS["slow_first"]
    # warm-up (2 images, predicted class), then per batch of 2, 2, 1: predicted class, then 4 cells each
    assert calls == [2, 2, 8, 2, 8, 1, 4]
    assert result.metrics["slow_first"]["sec_per_image"] < 0.05


def test_fingerprint_names_images_and_settings(tiny_explainer) -> None:
    from ptame.evaluate import fingerprint

    evalset = _grid_set(tiny_explainer, n=2)
    settings = {"road": {"seed": 0}}
    base = fingerprint(evalset, settings)
    assert len(base) == 64 and fingerprint(evalset, {"road": {"seed": 0}}) == base
    assert fingerprint(evalset, {"road": {"seed": 1}}) != base
    renamed = EvalSet(["x", "img1"], *[getattr(evalset, f) for f in ("images", "targets", "originals", "crop_boxes", "grid_classes")])
    assert fingerprint(renamed, settings) != base
    changed = evalset.images.clone()
    changed[0, 0, 0, 0] += 0.5
    other = EvalSet(evalset.image_ids, changed, evalset.targets, evalset.originals, evalset.crop_boxes, evalset.grid_classes)
    assert fingerprint(other, settings) != base
    # the evaluation records it, and batch sizes are not part of it
    kw = {"percentages": (50,), "resamples": 10}
    a = evaluate(tiny_explainer, evalset, {"ptame": {}}, batch_size=1, **kw)
    b = evaluate(tiny_explainer, evalset, {"ptame": {}}, batch_size=2, **kw)
    c = evaluate(tiny_explainer, evalset, {"ptame": {}}, batch_size=2, noise_std=0.02, **kw)
    assert a.fingerprint == b.fingerprint != c.fingerprint
