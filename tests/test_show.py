"""``ptame show`` on the output of a real ``ptame explain`` run (the CLI starts and stops its own Ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AUXILIARY, TINY_BACKBONE, TINY_PREP
from PIL import Image

from ptame.cli import main as cli
from ptame.explainer import Explainer
from ptame.explanations import read_explanations
from ptame.show import render_overlays


@pytest.fixture(scope="module")
def explained(tmp_path_factory) -> tuple[Path, Path]:
    """(images, explanations): a wide, a tall (in a subfolder) and an EXIF-rotated image, and a corrupt file."""
    root = tmp_path_factory.mktemp("show")
    torch.manual_seed(0)
    model = Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP).save(root / "model")
    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (60, 120, 3), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(rng.integers(0, 255, (100, 50, 3), dtype=np.uint8)).save(images / "sub" / "tall.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # stored 90 x 40, shown rotated: 40 x 90
    Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(images / "rotated.jpg", exif=exif.tobytes())
    (images / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = root / "explanations"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-m", "ptame.cli", "explain", "--model", str(model), "--input", str(images), "--output", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "explained 4 images (1 errors)" in run.stderr
    return images, out


def test_overlays_cover_the_crop_box_of_the_original(explained, tmp_path) -> None:
    images, out = explained
    assert cli(["show", "--explanations", str(out), "--out", str(tmp_path), "--limit", "10"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["0000_rotated.jpg.png", "0001_sub_tall.png.png", "0002_wide.png.png"]  # the bad row is skipped
    rows = read_explanations(str(out), errors=False).set_index("image_id")

    wide = np.asarray(Image.open(images / "wide.png").convert("RGB"), dtype=np.int16)
    shown = np.asarray(Image.open(tmp_path / "0002_wide.png.png").convert("RGB"), dtype=np.int16)
    shown, strip = shown[: wide.shape[0]], shown[wide.shape[0] :]
    assert strip.shape[0] >= 10 and (strip < 128).any()  # the label and score, written below the picture
    left, top, right, bottom = rows.loc["wide.png", "crop_box"]
    assert (left, top, right, bottom) == (30, 0, 90, 60)  # the centre square the 64-px map explains
    assert shown.shape == wide.shape
    assert np.array_equal(shown[:, :left], wide[:, :left]) and np.array_equal(shown[:, right:], wide[:, right:])
    assert np.abs(shown[:, left:right] - wide[:, left:right]).mean() > 10  # the map is blended in there

    rotated = Image.open(tmp_path / "0000_rotated.jpg.png")
    assert (rotated.size[0], rotated.size[1] - 16) == (40, 90) == (rows.loc["rotated.jpg", "width"], rows.loc["rotated.jpg", "height"])


def test_limit_and_images_that_moved(explained, tmp_path) -> None:
    images, out = explained
    assert len(render_overlays(str(out), tmp_path / "one", limit=1)) == 1
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    paths = render_overlays(str(out), tmp_path / "two", limit=10, input=str(moved))
    assert [p.name for p in paths] == ["0000_rotated.jpg.png", "0001_sub_tall.png.png", "0002_wide.png.png"]

    bare = tmp_path / "bare"  # explanations without their manifest: the input must be named
    bare.mkdir()
    for part in out.glob("part-*.parquet"):
        shutil.copy(part, bare)
    with pytest.raises(ValueError, match="pass --input"):
        render_overlays(str(bare), tmp_path / "three")
    assert len(render_overlays(str(bare), tmp_path / "three", input=str(images))) == 3
    with pytest.raises(ValueError, match="limit must be"):
        render_overlays(str(out), tmp_path / "four", limit=0)
