"""The new evaluation pieces: top-share masks, the untrained ``cam`` peer, single photos, ``ptame evaluate``."""

from __future__ import annotations

import io
import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import red_explainer, red_scene
from ptame.losses import LossWeights, share_masks
from ptame.maps import MapSettings
from ptame.reports import set_key
from ptame.saliency import saliency


def test_share_masks_hand_computed() -> None:
    """A 2 x 2 map 0.1, 0.2, 0.3, 0.4: its top quarter is the 0.4 pixel, its top half 0.3 and 0.4."""
    maps = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]] * 3)
    out = share_masks(maps, (1.0, 0.25, 0.5), sharpness=20.0)
    torch.testing.assert_close(out[0], maps[0])  # share 1: the map itself
    # threshold 0.4, spread 0.3: sigmoid(20 (m - 0.4) / 0.3)
    want = torch.sigmoid(20 * (maps[1] - 0.4) / 0.3)
    torch.testing.assert_close(out[1], want)
    assert out[1, 1, 1] == pytest.approx(0.5) and out[1, 0, 0] < 0.01
    assert out[2, 1, 0] == pytest.approx(0.5) and out[2, 1, 1] > 0.98 and out[2, 0, 1] < 0.02  # threshold 0.3
    assert share_masks(maps, (1.0,)) is maps  # the paper's loss: untouched


def test_share_masks_carry_gradient_to_the_threshold_pixels() -> None:
    maps = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]], requires_grad=True)
    share_masks(maps, (0.5,)).sum().backward()
    assert maps.grad is not None and maps.grad[0, 1, 0] > maps.grad[0, 0, 0] > 0


@pytest.mark.parametrize("bad", [(), (0.0,), (1.5,)])
def test_share_validation(bad) -> None:
    with pytest.raises(ValueError, match="keep_shares"):
        LossWeights(keep_shares=bad)


def test_cam_peer_is_the_untrained_start(tmp_path) -> None:
    """``cam`` scores the explainer's starting point: the same maps as an untrained explainer, not the trained head's."""
    trained = red_explainer()
    with torch.no_grad():
        trained.head.fuser.weight.add_(0.3 * torch.randn_like(trained.head.fuser.weight))  # "training" moved the head
    trained.set_maps(MapSettings(smoothing=1.0, cam_weight=0.5))
    fresh = red_explainer()  # head_init cam, scale 0.5, nothing learnt
    fresh.set_maps(MapSettings(smoothing=1.0, cam_weight=0.5))
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 1, 2])
    got = saliency("cam", trained, x, classes, cam_scale=0.5)
    torch.testing.assert_close(got, saliency("ptame", fresh, x, classes))
    assert not torch.allclose(got, saliency("ptame", trained, x, classes), atol=1e-3)
    with pytest.raises(TypeError, match="Explainer"):
        saliency("cam", trained.backbone, x, classes)


def test_set_keys() -> None:
    assert set_key("ptame", "") == "ptame" and set_key("ptame@rise", "single") == "ptame@rise/single"
    assert set_key("ptame - gradcam", "single") == "ptame/single - gradcam/single"


def test_single_photos_are_confident_varied_and_seeded(scene_backbone) -> None:
    """Crops the backbone predicts with min_score, taken from every photo in turn, the same for the same seed."""
    from ptame import demo
    from ptame.data import preprocess
    from ptame.testing import object_scenes

    scenes, _, _ = object_scenes(6, size=96, seed=2)
    photos = {f"p{i}": Image.fromarray((scenes[i].permute(1, 2, 0) * 255).byte().numpy()) for i in range(6)}
    singles = demo.single_photos(photos, scene_backbone, 8, seed=7, min_score=0.0, per_photo=3)
    assert len(singles) == 8 and len({i for i, _, _ in singles}) == 8
    assert [name for _, _, name in singles[:6]] == sorted(photos)  # every photo once before any twice
    sizes = {im.size for _, im, _ in singles}
    assert len(sizes) > 1 and all(224 <= max(s) <= 448 for s in sizes)
    again = demo.single_photos(photos, scene_backbone, 8, seed=7, min_score=0.0, per_photo=3)
    assert [im.tobytes() for _, im, _ in again] == [im.tobytes() for _, im, _ in singles]
    strict = demo.single_photos(photos, scene_backbone, 8, seed=7, min_score=0.9, per_photo=3)
    assert strict, "no crop predicted with p >= 0.9: the check below would be vacuous"
    with torch.inference_mode():
        for _, im, _ in strict:
            p = scene_backbone(preprocess(im, scene_backbone.preprocessing)[0][None]).softmax(1).max()
            assert p >= 0.9


def test_ptame_evaluate_cli_on_a_folder(tmp_path) -> None:
    """``ptame evaluate`` on a folder (one corrupt file): every report, P-TAME minus each peer, the bad file listed."""
    from ptame.cli import main

    model = tmp_path / "model"
    red_explainer().save(model)
    images = tmp_path / "images"
    images.mkdir()
    scene = Image.open(io.BytesIO(red_scene()))
    for i in range(3):
        scene.rotate(180 * i).save(images / f"scene{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(model), "--input", str(images),  # default methods: ptame, cam, gradcam
                 "--classes", "0", "--output", str(out), "--resamples", "50", "--batch-size", "2"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"ptame", "cam", "gradcam"} and metrics["ptame"]["n"] == 3
    differences = json.loads((out / "differences.json").read_text())
    assert set(differences) == {"ptame - cam", "ptame - gradcam"}
    d = differences["ptame - gradcam"]
    assert d["AD@15"] == pytest.approx(metrics["ptame"]["AD@15"] - metrics["gradcam"]["AD@15"])
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["skipped"][0]["image_id"] == "broken.jpg" and evaluation["n"] == 3
    table = pq.read_table(out / "per_image.parquet").to_pylist()
    assert len(table) == 9 and {r["image_id"] for r in table} == {"scene0.png", "scene1.png", "scene2.png"}
    ptame_rows = [r for r in table if r["method"] == "ptame"]
    assert sum(r["AD@100"] for r in ptame_rows) / 3 == pytest.approx(metrics["ptame"]["AD@100"])
    assert all(math.isfinite(r["ROAD-MoRF"]) for r in table)
    assert {p.name for p in out.iterdir()} >= {"road_morf.csv", "road_lerf.csv", "road_morf.png"}
    with pytest.raises(SystemExit) as exit_:  # argparse: a usage error, exit code 2, naming the choices
        main(["evaluate", "--model", str(model), "--input", str(images), "--methods", "nope", "--output", str(out)])
    assert exit_.value.code == 2


def test_evaluate_scores_the_untrained_start_by_default_where_there_is_one(tiny_explainer) -> None:
    """``cam`` is a default peer of an explainer that reads its backbone; one with a second auxiliary network has none."""
    from ptame.commands.evaluate import default_methods

    assert default_methods(red_explainer()) == ["ptame", "cam", "gradcam"]
    assert default_methods(tiny_explainer) == ["ptame", "gradcam"]
