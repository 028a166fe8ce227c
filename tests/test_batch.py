"""``ptame explain`` on a real local Ray: mixed good and bad inputs, Parquet and list inputs, the
registry by alias, refusal of a foreign output, and exactly-once after ``kill -9``."""

from __future__ import annotations

import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import AUXILIARY, TINY_BACKBONE, TINY_PREP, red_cells, red_explainer, red_scene
from PIL import Image

from ptame.batch import ExplainJob, explain_to_parquet
from ptame.chunks import ChunkReader, prepare_chunk, read_and_prepare, unpack_chunk
from ptame.commands.explain import _class_option
from ptame.pipeline import actor_layout
from ptame.jobs import chunk_file, plan_chunks
from ptame.explainer import Explainer
from ptame.explanations import MANIFEST, SCHEMA, read_explanations, read_manifest
from ptame.data import prepare_image

QUANT = 0.5 / 255 + 1e-4  # maps are stored as uint8; batched and single forward passes agree to ~1e-6


# ------------------------------------------------------------------------------- inputs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of 400 megapixels that compresses to ~50 KB (built row by row, never in memory)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def mixed_files() -> tuple[dict[str, bytes], set[str]]:
    """Good images, every awkward-but-valid kind, and every bad kind; returns (files, names of bad ones)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 x 50, shown rotated: 50 x 80
    files = {
        f"good/{i}.png": encode(Image.fromarray(rng.integers(0, 255, (60 + 9 * i, 100 - 7 * i, 3), dtype=np.uint8)), "PNG")
        for i in range(4)
    }
    files |= {
        "grey.png": encode(rgb.convert("L"), "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "deep16.png": encode(Image.fromarray(rng.integers(0, 65535, (60, 80)).astype(np.uint16)), "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "rotated.jpg": encode(Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)), "JPEG", exif=exif.tobytes()),
        "tiny.png": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    }
    bad = {
        "bomb.png": bomb_png(),
        "corrupt.jpg": rng.integers(0, 255, 500, dtype=np.uint8).tobytes(),
        "truncated.jpg": encode(rgb, "JPEG")[:800],
        "empty.jpg": b"",
        "notes.txt": b"not an image",
    }
    return files | bad, set(bad)


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def check_rows(df, explainer: Explainer, data: dict[str, bytes], bad: set[str], model_uri: str) -> None:
    """Every input once; good rows equal Explainer.explain on the same bytes; bad rows carry an error."""
    assert sorted(df["image_id"]) == sorted(data) and df["image_id"].is_unique
    assert set(df["model_uri"]) == {model_uri}
    for row in df.itertuples(index=False):
        if row.image_id in bad:
            assert isinstance(row.error, str) and row.error, row.image_id
            assert row.saliency is None and pd_isna(row.pred_class)
            continue
        assert pd_isna(row.error), (row.image_id, row.error)
        prepared = prepare_image(data[row.image_id], explainer.preprocessing)
        expected = explainer.explain(prepared.tensor[None], topk=4)
        assert (row.width, row.height) == (prepared.width, prepared.height)
        assert tuple(row.crop_box) == prepared.crop_box
        assert row.pred_class == int(expected.classes[0, 0]) and list(row.topk_classes) == expected.classes[0].tolist()
        assert row.pred_label == explainer.class_names[row.pred_class]
        assert list(row.topk_labels) == [explainer.class_names[c] for c in row.topk_classes]
        assert (row.saliency_class, row.saliency_label) == (row.pred_class, row.pred_label)
        np.testing.assert_allclose(row.topk_scores, expected.scores[0].numpy(), atol=1e-5)
        assert row.saliency.shape == (16, 16)
        np.testing.assert_allclose(row.saliency, expected.saliency[0, 0].numpy(), atol=QUANT)


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP).save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def explainer(saved_model) -> Explainer:
    return Explainer.load(saved_model)


@pytest.fixture(scope="module")
def local_ray() -> str:
    """One local Ray for the module (2 CPUs); its address lets CLI subprocesses join it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# ------------------------------------------------------------- kill -9, then resume (CLI)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ptame.cli", "explain", *args, "--no-progress"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return env


def test_kill_9_then_rerun_gives_every_input_exactly_once(tmp_path, saved_model, local_ray) -> None:
    # large smooth JPEGs: decoding them keeps the job busy long enough to kill it half-way
    y, x = np.mgrid[0:1000, 0:1000]
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        pixels = np.stack([(x * (i + 1)) % 256, (2 * y) % 256, ((x + y) // 4) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{i:02d}.jpg", quality=90)
    out = tmp_path / "out"
    command = _cli(
        "--model", str(saved_model), "--input", str(images), "--output", str(out), "--chunk-size", "2", "--address", local_ray
    )  # fmt: skip

    job = subprocess.Popen(command, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while not any(out.glob("part-*.parquet")):
            assert job.poll() is None, job.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job wrote no chunk in 10 minutes"
            time.sleep(0.02)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # kill -9 of the command (and anything it started), mid-way
        job.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(done) < 10, f"kill came too late to test resumption: {sorted(done)}"
    pending = next(i for i in range(10) if chunk_file(i) not in done)
    (out / f".{chunk_file(pending)}.{'0123abcd' * 4}.tmp").write_bytes(b"PAR1 half-written by a killed run")

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = re.search(r"resuming: (\d+) of 10 chunks already done", rerun.stderr)
    assert resumed and int(resumed.group(1)) >= len(done), rerun.stderr[-3000:]  # a worker may land one more
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in done} == done  # not redone
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [chunk_file(i) for i in range(10)])
    df = read_explanations(str(out), columns=["image_id", "error"])
    assert len(df) == 20 and sorted(df["image_id"]) == sorted(p.name for p in images.iterdir())
    assert df["error"].isna().all()

    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do: all 10 chunks (20 inputs)" in again.stderr, again.stderr[-3000:]


def test_mixed_folder_by_registry_alias(tmp_path, monkeypatch, saved_model, explainer, local_ray) -> None:
    from mlflow import MlflowClient

    from ptame import registry

    monkeypatch.chdir(tmp_path)  # default tracking: sqlite:///mlflow.db here, relative to this directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.configure()
    _, version = registry.log_explainer(saved_model, "tiny")
    MlflowClient().set_registered_model_alias("tiny", "champion", version)

    data, bad = mixed_files()
    images = write_files(tmp_path / "images", data)
    out = tmp_path / "explanations"
    summary = explain_to_parquet(
        "models:/tiny@champion", str(images), str(out), chunk_size=4, batch_size=3, concurrency=1, progress=False
    )
    assert (summary.images, summary.errors, summary.chunks_written) == (len(data), len(bad), 4)
    assert summary.model_uri == "models:/tiny/1"
    files = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in files] == [chunk_file(i) for i in range(4)]
    assert pq.read_schema(files[0]) == SCHEMA
    df = read_explanations(str(out))
    check_rows(df, explainer, data, bad, "models:/tiny/1")
    assert df.set_index("image_id").loc["rotated.jpg", ["width", "height"]].tolist() == [50, 80]  # EXIF applied
    assert "bomb" in df.set_index("image_id").loc["bomb.png", "error"]
    assert read_manifest(str(out))["model_uri"] == "models:/tiny/1"

    # a rerun of the finished job is a no-op; another model's rows are never mixed in
    stamps = [p.stat().st_mtime_ns for p in files]
    again = explain_to_parquet("models:/tiny@champion", str(images), str(out), progress=False)
    assert (again.images, again.chunks_written, again.chunks_skipped) == (0, 0, 4)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    with pytest.raises(ValueError, match="already holds explanations made by models:/tiny/1"):
        explain_to_parquet(str(saved_model), str(images), str(out), progress=False)
    with pytest.raises(ValueError, match="topk"):
        explain_to_parquet("models:/tiny/1", str(images), str(out), topk=2, progress=False)


def test_parquet_and_path_list_inputs(tmp_path, saved_model, explainer, local_ray) -> None:
    data, bad = mixed_files()
    good = sorted(k for k in data if k not in bad)
    # Parquet: one file with ids (row groups of 2, so 3-row chunks straddle them), one without
    shards = tmp_path / "shards"
    shards.mkdir()
    first = good[:5] + ["corrupt.jpg", "empty.jpg"]
    pq.write_table(
        pa.table({"image_id": first, "image": [data[k] for k in first]}), shards / "a.parquet", row_group_size=2
    )
    second = [data[good[5]], None, data["truncated.jpg"], data[good[6]]]
    pq.write_table(pa.table({"pixels": pa.array(second, pa.binary())}), shards / "b.parquet", row_group_size=3)
    out = tmp_path / "from-parquet"
    with pytest.raises(ValueError, match="b.parquet has no image column 'image'"):
        explain_to_parquet(str(saved_model), str(shards), str(out), progress=False)
    pq.write_table(pa.table({"image": pa.array(second, pa.binary())}), shards / "b.parquet", row_group_size=3)
    summary = explain_to_parquet(str(saved_model), str(shards), str(out), chunk_size=3, progress=False)
    assert (summary.images, summary.errors) == (11, 4)
    df = read_explanations(str(out))
    expected = {k: data[k] for k in first} | {"b.parquet#0": data[good[5]], "b.parquet#3": data[good[6]]}
    expected |= {"b.parquet#1": b"", "b.parquet#2": data["truncated.jpg"]}
    check_rows(df, explainer, expected, {"corrupt.jpg", "empty.jpg", "b.parquet#1", "b.parquet#2"}, str(saved_model))
    assert df.set_index("image_id").loc["b.parquet#1", "error"] == "no image bytes (null)"

    # a text file of paths: a duplicate line is explained once, a missing file is an error row
    images = write_files(tmp_path / "images", {k: data[k] for k in good[:3]})
    listing = tmp_path / "list.txt"
    paths = [str(images / k) for k in good[:3]] + [str(images / good[0]), str(tmp_path / "gone.png")]
    listing.write_text("# inputs\n" + "\n".join(paths) + "\n")
    out = tmp_path / "from-list"
    summary = explain_to_parquet(str(saved_model), str(listing), str(out), progress=False)
    assert (summary.images, summary.errors) == (4, 1)
    df = read_explanations(str(out))
    listed = {str(images / k): data[k] for k in good[:3]} | {str(tmp_path / "gone.png"): b""}
    check_rows(df, explainer, listed, {str(tmp_path / "gone.png")}, str(saved_model))
    assert "cannot read" in df.set_index("image_id").loc[str(tmp_path / "gone.png"), "error"]


def test_cli_classes_choose_the_map_for_all_or_per_row(tmp_path, saved_model, explainer, local_ray) -> None:
    data, bad = mixed_files()
    good = sorted(k for k in data if k not in bad)[:5]
    images = write_files(tmp_path / "images", {k: data[k] for k in good})

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(_cli("--model", str(saved_model), *args, "--address", local_ray), env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def check(row, body: bytes, target: int | None) -> None:
        tensor = prepare_image(body, explainer.preprocessing).tensor[None]
        top = explainer.explain(tensor, topk=4)
        chosen = explainer.explain(tensor, classes=target) if target is not None else top
        assert row.pred_class == int(top.classes[0, 0]) and list(row.topk_classes) == top.classes[0].tolist()
        assert list(row.topk_labels) == [str(c) for c in row.topk_classes]  # the tiny CNN's names are "0".."3"
        assert row.saliency_class == int(chosen.classes[0, 0]) and row.saliency_label == str(row.saliency_class)
        np.testing.assert_allclose(row.saliency_score, float(chosen.scores[0, 0]), atol=1e-5)
        np.testing.assert_allclose(row.saliency, chosen.saliency[0, 0].numpy(), atol=QUANT)

    run("--input", str(images), "--output", str(tmp_path / "all"), "--classes", "2")
    df = read_explanations(str(tmp_path / "all")).set_index("image_id")
    for k in good:
        check(df.loc[k], data[k], 2)
    assert read_manifest(str(tmp_path / "all"))["classes"] == 2

    # per row: a Parquet column of indices or labels; null explains the prediction, a class the model lacks is an error row
    shard = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"image_id": good, "image": [data[k] for k in good], "target": ["1", None, "3", "9", "-1"]}), shard)
    run("--input", str(shard), "--output", str(tmp_path / "rows"), "--classes", "target")
    df = read_explanations(str(tmp_path / "rows")).set_index("image_id")
    for k, target in zip(good[:3] + good[4:], (1, None, 3, None)):
        check(df.loc[k], data[k], target)
    assert "class 9 is out of range" in df.loc[good[3], "error"]

    # -1 is the prediction, as ?class=-1 of `ptame serve` and the pyfunc's class -1: the default's job
    assert (_class_option("-1"), _class_option("-x")) == (-1, "-x")
    run("--input", str(images), "--output", str(tmp_path / "pred"), "--classes", "-1")
    df = read_explanations(str(tmp_path / "pred")).set_index("image_id")
    for k in good:
        check(df.loc[k], data[k], None)
    assert read_manifest(str(tmp_path / "pred"))["classes"] is None

    from ptame.cli import main as cli

    for classes, why in (("7", "class 7 is out of range"), ("-2", "-1 \\(the prediction\\)"), ("target", "names a column, but the input is image files")):
        with pytest.raises(ValueError, match=why):
            explain_to_parquet(str(saved_model), str(images), str(tmp_path / "no"), classes=_class_option(classes), progress=False)
    assert cli(["explain", "--model", str(saved_model), "--input", str(shard), "--output", str(tmp_path / "no"), "--classes", "nope"]) == 1


def test_cli_full_view_maps_the_whole_image_and_a_job_keeps_its_view(tmp_path, local_ray) -> None:
    from ptame.commands.explain import VIEWS
    from ptame.cli import main as cli
    from ptame.data import VIEWS as DATA_VIEWS
    from ptame.show import render_overlays

    assert VIEWS == DATA_VIEWS
    model = red_explainer().save(tmp_path / "red")
    scene = red_scene()
    images = write_files(tmp_path / "images", {"wide.png": scene, "tall.png": encode(Image.new("RGB", (40, 100), "grey"), "PNG")})
    out = tmp_path / "out"
    command = _cli("--model", str(model), "--input", str(images), "--output", str(out), "--view", "full", "--address", local_ray)
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    df = read_explanations(str(out)).set_index("image_id")
    wide, tall = df.loc["wide.png"], df.loc["tall.png"]
    assert list(wide.crop_box) == [0, 0, 128, 64] and list(tall.crop_box) == [0, 0, 40, 100]
    assert wide.saliency.shape == (8, 16) and tall.saliency.shape == (16, 6)  # the images' aspect ratios
    assert wide.pred_class == 0 and torch.equal(torch.from_numpy(wide.saliency >= 0.5), red_cells((8, 16)))
    assert read_manifest(str(out))["view"] == "full"

    # the overlay of `ptame show` spreads the 8 x 16 map over the whole picture
    (picture,) = render_overlays(str(out), tmp_path / "overlays", limit=2)[1:]
    original = np.asarray(Image.open(io.BytesIO(scene)).convert("RGB"), dtype=np.int16)
    shown = np.asarray(Image.open(picture).convert("RGB"), dtype=np.int16)[:64]
    assert np.abs(shown - original).sum(2).min() > 30  # every pixel is coloured by the map

    assert "--view {crop,full}" in subprocess.run(_cli("--help"), capture_output=True, text=True).stdout
    for view in ("crop", None):  # another view, or the default, is never mixed into a finished job
        argv = ["explain", "--model", str(model), "--input", str(images), "--output", str(out), "--no-progress"]
        assert cli(argv + (["--view", view] if view else [])) == 1
    with pytest.raises(ValueError, match="written with view='full', this run asks for 'crop'"):
        explain_to_parquet(str(model), str(images), str(out), progress=False)
    with pytest.raises(ValueError, match=r"view must be one of \['crop', 'full'\]"):
        explain_to_parquet(str(model), str(images), str(tmp_path / "other"), view="wide", progress=False)


# ----------------------------------------------------------- adding to an existing output


def test_cli_adds_only_new_images_and_resumes_an_interrupted_addition(tmp_path, saved_model, explainer, local_ray) -> None:
    data, bad = mixed_files()
    names = sorted(data)
    first = {k: data[k] for k in names[:7] if k != "bomb.png"}  # the bomb is slow to refuse: once is enough
    images = write_files(tmp_path / "images", first)
    out = tmp_path / "out"
    command = _cli("--model", str(saved_model), "--input", str(images), "--output", str(out), "--chunk-size", "2",
                   "--topk", "4", "--address", local_ray)  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sorted(before) == [chunk_file(i) for i in range(3)]

    added = {k: data[k] for k in names[7:]}  # the folder grows by images and bad files
    write_files(images, added)
    grown = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert f"{len(first)} images already explained in {out}, explaining {len(added)} new" in grown.stderr, grown.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in before} == before  # not redone
    new_parts = sorted(p.name for p in out.glob("part-*.parquet") if p.name not in before)
    assert new_parts == [chunk_file(i) for i in range(3, 3 + -(-len(added) // 2))]
    check_rows(read_explanations(str(out)), explainer, first | added, bad, str(saved_model.resolve()))
    manifest = read_manifest(str(out))
    assert [(g["first_chunk"], g["num_chunks"]) for g in manifest["generations"]] == [(0, 3), (3, len(new_parts))]

    # an addition killed half-way: one of its chunks lost, a temporary left; the same command finishes it
    (out / new_parts[1]).unlink()
    (out / f".{new_parts[1]}.{'0123abcd' * 4}.tmp").write_bytes(b"PAR1 half-written by a killed run")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    summary = explain_to_parquet(str(saved_model), str(images), str(out), topk=4, progress=False)
    assert (summary.chunks_written, summary.chunks_skipped, summary.images) == (1, len(new_parts) - 1, 2)
    assert summary.already_explained == len(first)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in kept} == kept
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [chunk_file(i) for i in range(3 + len(new_parts))])
    check_rows(read_explanations(str(out)), explainer, first | added, bad, str(saved_model.resolve()))
    assert read_explanations(str(out), columns=["topk_saliency"])["topk_saliency"].isna().all()  # --maps pred

    again = explain_to_parquet(str(saved_model), str(images), str(out), topk=4, progress=False)
    assert (again.images, again.chunks_written) == (0, 0)
    # removed inputs keep their rows; an input that is already there is not explained again
    (images / sorted(first)[0]).unlink()
    same = explain_to_parquet(str(saved_model), str(images), str(out), topk=4, progress=False)
    assert (same.images, same.already_explained) == (0, len(first) + len(added) - 1)
    assert len(read_explanations(str(out), columns=["image_id"])) == len(first) + len(added)

    # another model or other settings are never mixed in
    other = Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP).save(tmp_path / "other")
    write_files(images, {"late.png": data[names[8]]})
    with pytest.raises(ValueError, match="never mixed. Choose another --output"):
        explain_to_parquet(str(other), str(images), str(out), topk=4, progress=False)
    with pytest.raises(ValueError, match="maps='pred', this run asks for 'topk'.*choose another --output"):
        explain_to_parquet(str(saved_model), str(images), str(out), maps="topk", topk=4, progress=False)
    assert len(read_explanations(str(out), columns=["image_id"])) == len(first) + len(added)


def test_parquet_input_addition_explains_only_new_rows(tmp_path, saved_model, explainer, local_ray) -> None:
    data, bad = mixed_files()
    good = sorted(k for k in data if k not in bad)
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"image_id": good[:3], "image": [data[k] for k in good[:3]]}), shards / "a.parquet")
    out = tmp_path / "out"
    assert explain_to_parquet(str(saved_model), str(shards), str(out), chunk_size=2, progress=False).images == 3
    # a new shard repeats two explained ids between new ones; row groups of 2, so the new rows straddle them
    ids = [good[3], good[0], good[4], good[1], good[5], "corrupt.jpg"]
    pq.write_table(pa.table({"image_id": ids, "image": [data[k] for k in ids]}), shards / "b.parquet", row_group_size=2)
    summary = explain_to_parquet(str(saved_model), str(shards), str(out), progress=False)
    assert (summary.images, summary.errors, summary.already_explained, summary.chunks_written) == (4, 1, 3, 2)
    expected = {k: data[k] for k in good[:6] + ["corrupt.jpg"]}
    check_rows(read_explanations(str(out)), explainer, expected, {"corrupt.jpg"}, str(saved_model.resolve()))

    (out / chunk_file(2)).unlink()  # the addition's first chunk lost: resumed from the same plan
    resumed = explain_to_parquet(str(saved_model), str(shards), str(out), progress=False)
    assert (resumed.images, resumed.chunks_written, resumed.chunks_skipped) == (2, 1, 1)
    check_rows(read_explanations(str(out)), explainer, expected, {"corrupt.jpg"}, str(saved_model.resolve()))


# ------------------------------------------------------------------------- --maps topk


def test_cli_maps_topk_stores_every_top_class_map(tmp_path, local_ray) -> None:
    from test_records import alternate_signs

    torch.manual_seed(0)
    model = Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP)
    alternate_signs(model)  # known ground truth: maps of even and odd classes are inverses
    saved = model.save(tmp_path / "model")
    data, bad = mixed_files()
    chosen = sorted(k for k in data if k not in bad)[:3] + ["corrupt.jpg"]
    images = write_files(tmp_path / "images", {k: data[k] for k in chosen})
    out = tmp_path / "out"
    done = subprocess.run(_cli("--model", str(saved), "--input", str(images), "--output", str(out), "--maps", "topk",
                               "--topk", "3", "--address", local_ray), env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_manifest(str(out))["maps"] == "topk"
    df = read_explanations(str(out)).set_index("image_id")
    assert df.loc["corrupt.jpg", "topk_saliency"] is None
    for k in chosen[:3]:
        row = df.loc[k]
        maps = row.topk_saliency
        assert len(maps) == 3 and all(m.shape == (16, 16) for m in maps)
        np.testing.assert_array_equal(maps[0], row.saliency)  # the prediction's map is the first top-k map
        expected = model.explain(prepare_image(data[k], model.preprocessing).tensor[None], classes=[list(row.topk_classes)])
        for got, want in zip(maps, expected.saliency[0]):
            np.testing.assert_allclose(got, want.numpy(), atol=QUANT)
        parity = [(c - row.topk_classes[0]) % 2 for c in row.topk_classes]
        for m, odd in zip(maps, parity):
            np.testing.assert_allclose(m, 1 - maps[0] if odd else maps[0], atol=1 / 255 + 1e-6)
        assert any(parity)  # 3 of 4 classes: some map differs from the first
    with pytest.raises(ValueError, match="maps='topk', this run asks for 'pred'"):
        explain_to_parquet(str(saved), str(images), str(out), topk=3, progress=False)


# --------------------------------------------------------------- refusals before any work


def test_refuses_foreign_output_and_bad_arguments(tmp_path, saved_model) -> None:
    images = write_files(tmp_path / "images", {"a.png": encode(Image.new("RGB", (8, 8)), "PNG")})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.parquet").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match="not empty and holds no _ptame_job.json"):
        explain_to_parquet(str(saved_model), str(images), str(foreign), progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        explain_to_parquet(str(saved_model), str(images), str(tmp_path / "o"), batch_size=0)
    with pytest.raises(TypeError, match="topk must be an int"):
        explain_to_parquet(str(saved_model), str(images), str(tmp_path / "o"), topk=2.5)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="neither a directory saved by Explainer.save"):
        explain_to_parquet(str(tmp_path / "nope"), str(images), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _cli_explain(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [sys.executable, "-m", "ptame.cli", "explain", "--input", "images", "--output", "out", *extra]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_explain_never_creates_a_registry(tmp_path, saved_model) -> None:
    from ptame import registry

    (tmp_path / "images").mkdir()
    proc = _cli_explain(tmp_path, "--model", "models:/tiny@champion")
    assert proc.returncode == 1 and "no MLflow registry at sqlite:///" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli_explain(tmp_path, "--model", "models:/tiny@champion", "--tracking-uri", "sqlite:///elsewhere.db")
    assert proc.returncode == 1 and "elsewhere.db: that SQLite file does not exist" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no mlflow.db, no mlartifacts, no output

    registry.configure(f"sqlite:///{tmp_path / 'reg' / 'r.db'}", artifact_root=tmp_path / "reg" / "artifacts")
    registry.log_explainer(saved_model, "tiny")
    proc = _cli_explain(tmp_path, "--model", "models:/tiny@nobody", "--tracking-uri", "sqlite:///reg/r.db")
    assert proc.returncode == 1 and f"not in the registry at sqlite:///{tmp_path / 'reg' / 'r.db'}" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_cpu_explain_actors_reserve_a_cpu_per_thread_and_fit_the_nodes() -> None:
    assert actor_layout([{"CPU": 2.0}], None, False, 100) == (2, 1)  # the default: an actor per CPU, one thread
    assert actor_layout([{"CPU": 2.0}, {"CPU": 6.0}, {"GPU": 1.0}], None, False, 100) == (8, 1)
    assert actor_layout([{"CPU": 2.0}], 1, False, 100) == (1, 2)  # fewer actors use the other CPUs as threads
    assert actor_layout([{"CPU": 16.0}], 4, False, 100) == (4, 4)
    assert actor_layout([{"CPU": 2.0}, {"CPU": 6.0}], 2, False, 100) == (2, 2)  # threads fit the smallest node
    assert actor_layout([{"CPU": 2.0}, {"CPU": 2.0}], 3, False, 100) == (3, 1)
    assert actor_layout([{"CPU": 3.0}, {"CPU": 3.0}], 3, False, 100) == (3, 1)  # 2 threads each: only 2 would fit
    assert actor_layout([{"CPU": 2.0}], None, False, 1) == (1, 2)  # one chunk: one actor with every thread
    with pytest.raises(ValueError, match="need a CPU each"):
        actor_layout([{"CPU": 2.0}], 3, False, 100)


@pytest.mark.parametrize("view", ["full", "crop"])
def test_gpu_decode_stage_hands_the_actors_what_cpu_actors_prepare_themselves(tmp_path, view) -> None:
    """The row a decode stage sends to GPU actors unpacks to the items a CPU actor makes: the same
    metadata, pixels within float16's rounding (2**-12 in [0, 1]), a letterbox's padding exact."""
    from ptame.sources import resolve_source

    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (80 + 20 * i, 64), colour).save(tmp_path / f"{i}.png")
    noise = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)  # resized: values float16 rounds
    Image.fromarray(noise).save(tmp_path / "3.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    source = resolve_source(str(tmp_path))
    (chunk,), _, _ = plan_chunks(source, 10)
    job = ExplainJob(model="m", input=str(tmp_path), output=str(tmp_path / "out"), batch_size=32, concurrency=None,
                     topk=5, use_gpu=True, chunk_size=10, max_pixels=10**6, image_column="image", id_column="image_id",
                     classes=2, view=view, maps="pred", address=None, progress=False, tracking_uri=None)  # fmt: skip
    reader = ChunkReader(job, source.filesystem, TINY_PREP.to_dict())
    ids, items, wanted = read_and_prepare(chunk, reader)
    row = prepare_chunk(chunk, reader)
    assert len(row["pixels"]) == 4 * 3 * TINY_PREP.input_size**2 * 2  # two bytes per value: half of float32
    ids2, items2, wanted2 = unpack_chunk(row, TINY_PREP)
    assert ids2 == ids == ["0.png", "1.png", "2.png", "3.png", "broken.jpg"] and wanted2 == ["2"] * 5 and wanted == [2] * 5
    assert [it.error is None for it in items2] == [it.error is None for it in items] == [True] * 4 + [False]
    for a, b in zip(items, items2):
        assert (a.width, a.height, a.crop_box, a.content, a.error) == (b.width, b.height, b.crop_box, b.content, b.error)
        assert (a.tensor is None and b.tensor is None) or (a.tensor - b.tensor).abs().max() <= 2**-12
        assert b.tensor is None or b.tensor.dtype == torch.float32
    assert 0 < (items[3].tensor - items2[3].tensor).abs().max()  # the noise is rounded, not shipped exactly
    if view == "full":
        assert items2[1].content == (0, 11, 64, 52)  # 100 x 64 letterboxed into 64 x 64: 64 x 41, 11 rows above
        for a, b in zip(items[:4], items2):  # the padding is the exact mean, as on a CPU actor
            torch.testing.assert_close(b.tensor[:, : b.content[1]], a.tensor[:, : a.content[1]], rtol=0, atol=0)


def test_gpu_explain_actors_leave_cpus_to_decode() -> None:
    assert actor_layout([{"CPU": 12.0, "GPU": 4.0}], None, True, 100) == (4, 1)
    assert actor_layout([{"CPU": 16.0, "GPU": 1.0}], None, True, 100) == (1, 2)
    assert actor_layout([{"CPU": 2.0, "GPU": 1.0}], None, True, 100) == (1, 1)
    with pytest.raises(ValueError, match="no GPU"):
        actor_layout([{"CPU": 16.0}], None, True, 100)
    with pytest.raises(ValueError, match="leaves no CPU to decode"):
        actor_layout([{"CPU": 2.0, "GPU": 2.0}], 2, True, 100)
    assert actor_layout([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], 2, True, 100) == (2, 2)
    with pytest.raises(ValueError, match="concurrency=3 GPU explain actors need a GPU each; this cluster has 2"):
        actor_layout([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], 3, True, 100)  # one could never be placed


@pytest.mark.slow  # ~25 s on 2 cores: two Ray nodes and three actors start
def test_two_nodes_explain_every_input_exactly_once(tmp_path, saved_model, explainer) -> None:
    """A head and a worker node of 2 CPUs each; three explain actors of one CPU cannot fit on one node."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        data, bad = mixed_files()
        images = write_files(tmp_path / "images", data)
        out = tmp_path / "out"
        command = _cli("--model", str(saved_model), "--input", str(images), "--output", str(out), "--chunk-size", "3",
                       "--batch-size", "2", "--topk", "4", "--concurrency", "3", "--address", cluster.address)  # fmt: skip
        job = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    finally:
        cluster.shutdown()
    assert job.returncode == 0, job.stderr[-3000:]
    assert "with 3 CPU actor(s), 1 torch thread(s) each" in job.stderr, job.stderr[-3000:]
    chunks = -(-len(data) // 3)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [chunk_file(i) for i in range(chunks)])
    check_rows(read_explanations(str(out)), explainer, data, bad, str(saved_model.resolve()))
