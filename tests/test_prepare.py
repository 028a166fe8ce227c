"""The prepare stage: bad files are reported and skipped, the demo set has trustworthy grid labels."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ptame.data import decode_image, preprocess
from ptame.prepare import SCHEMA, prepare_demo, prepare_source, read_prepared, write_shards


def _png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def messy_folder(tmp_path):
    """ImageNet layout with 3 good images and 5 bad files of every kind."""
    root = tmp_path / "images"
    (root / "n01440764").mkdir(parents=True)
    (root / "n02102040").mkdir()
    (root / "n01440764" / "fish_1.png").write_bytes(_png((200, 10, 10)))
    (root / "n01440764" / "fish_2.jpg").write_bytes(_jpeg())
    (root / "n02102040" / "dog_1.png").write_bytes(_png((10, 200, 10)))
    good_jpeg = _jpeg(200)
    (root / "n02102040" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (root / "n02102040" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "n02102040" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image at all\n")
    (root / "n01440764" / "random.bin").write_bytes(np.random.default_rng(1).bytes(500))
    return root


def test_bad_files_are_reported_and_good_ones_prepared(messy_folder, tmp_path, caplog) -> None:
    out = tmp_path / "prepared"
    with caplog.at_level("WARNING", logger="ptame.prepare"):
        report = prepare_source(str(messy_folder), out, eval_fraction=0.0)
    bad = {"n02102040/truncated.jpg", "n02102040/corrupt.png", "n02102040/empty.jpg", "notes.txt", "n01440764/random.bin"}
    assert report.train == 3 and report.eval == 0 and report.skipped == 5
    assert {e["image_id"] for e in report.errors} == bad
    assert all(e["error"] for e in report.errors)
    assert next(e for e in report.errors if e["image_id"] == "n02102040/empty.jpg")["error"].startswith("empty")
    for image_id in bad:  # each bad file is named in the log, and the count is reported
        assert image_id in caplog.text
    assert "5 of 8 inputs were unreadable" in caplog.text

    table = read_prepared(out / "train")
    assert table.schema.equals(SCHEMA)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert set(rows) == {"n01440764/fish_1.png", "n01440764/fish_2.jpg", "n02102040/dog_1.png"}
    assert rows["n01440764/fish_1.png"]["label"] == "n01440764"  # ImageNet layout: folder = class
    assert rows["n02102040/dog_1.png"]["width"] == 40
    assert decode_image(rows["n02102040/dog_1.png"]["image"]).getpixel((5, 5)) == (10, 200, 10)


def test_split_is_deterministic_and_complete(messy_folder, tmp_path) -> None:
    a = prepare_source(str(messy_folder), tmp_path / "a", eval_fraction=0.5, seed=2)
    b = prepare_source(str(messy_folder), tmp_path / "b", eval_fraction=0.5, seed=2)
    assert (a.train, a.eval) == (b.train, b.eval) == (1, 2)
    ids = lambda p: sorted(read_prepared(p).column("image_id").to_pylist())  # noqa: E731
    assert ids(tmp_path / "a" / "train") == ids(tmp_path / "b" / "train")
    assert sorted(ids(tmp_path / "a" / "train") + ids(tmp_path / "a" / "eval")) == [
        "n01440764/fish_1.png", "n01440764/fish_2.jpg", "n02102040/dog_1.png",
    ]  # fmt: skip


def test_parquet_source_and_all_bad_input(tmp_path) -> None:
    rows = [
        {"image_id": "a", "image": _png((1, 2, 3))},
        {"image_id": "b", "image": b"garbage"},
        {"image_id": "c", "image": _png((4, 5, 6))},
    ]
    write_shards(rows, tmp_path / "in", shard_rows=2)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    report = prepare_source(str(tmp_path / "in"), tmp_path / "out", eval_fraction=0.0)
    assert (report.train, report.skipped) == (2, 1) and report.errors[0]["image_id"] == "b"

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable training image"):
        prepare_source(str(tmp_path / "junk"), tmp_path / "out2")


def test_shards_refuse_duplicate_ids(tmp_path) -> None:
    with pytest.raises(ValueError, match="duplicate image_id 'a'"):
        write_shards([{"image_id": "a", "image": b"1"}, {"image_id": "a", "image": b"2"}], tmp_path / "s")


def test_demo_grid_cells_are_what_the_backbone_sees(tmp_path) -> None:
    """Each eval cell, cut out of the composite and classified alone, gives its recorded class."""
    from ptame.models import Preprocessing, load_backbone

    backbone = load_backbone("builtin:efficientnet_lite0", preprocessing=Preprocessing(96, 96))
    report = prepare_demo(tmp_path, backbone, train_images=6, eval_images=3, image_size=192, seed=0, eval_seed=5, min_score=0.1)
    assert (report.train, report.eval) == (6, 3)
    train = read_prepared(tmp_path / "train").to_pylist()
    evals = read_prepared(tmp_path / "eval").to_pylist()
    assert all(r["split"] == "train" and r["grid_classes"] is None for r in train)
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in evals}
    for row in evals:
        classes = row["grid_classes"]
        assert len(classes) == 4 and len(set(classes)) == 4
        assert len(set(row["source"].removeprefix("demo:").split("+"))) == 4  # four different photos
        image = decode_image(row["image"])
        assert image.size == (192, 192)
        cells = [image.crop(((i % 2) * 96, (i // 2) * 96, (i % 2) * 96 + 96, (i // 2) * 96 + 96)) for i in range(4)]
        with torch.inference_mode():
            probs = backbone(torch.stack([preprocess(c, backbone.preprocessing)[0] for c in cells])).softmax(1)
        assert probs.argmax(1).tolist() == classes
        assert float(probs.max(1).values.min()) >= 0.1 - 0.02  # PNG round trip of the cells: tiny drift
    with pytest.raises(ValueError, match="eval_seed must differ"):
        prepare_demo(tmp_path / "x", backbone, seed=2, eval_seed=2)


def test_eval_shards_have_the_schema(tmp_path) -> None:
    write_shards([{"image_id": "g", "image": _png((0, 0, 0)), "grid_classes": [1, 2, 3, 4]}], tmp_path / "e")
    table = pq.read_table(tmp_path / "e")
    assert table.column("grid_classes").to_pylist() == [[1, 2, 3, 4]]
