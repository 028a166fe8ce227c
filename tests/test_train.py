"""Ray Train layer: real Ray (a two-node cluster on this machine), real checkpoints, a real fault."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import AUXILIARY, TINY_BACKBONE, assert_maps
from ptame.explainer import Explainer
from ptame.maps import MapSettings
from ptame.testing import object_scenes
from ptame.train import LOSS_TERMS, TrainConfig, TrainResult, train
from ptame.train.worker import _LossLog, _mean_terms

ray = pytest.importorskip("ray")

TINY_PREP = {"input_size": 64, "resize": 64, "mean": [0.5] * 3, "std": [0.5] * 3}


def png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_scenes(folder: Path, n: int, shards: int = 2, corrupt: int = 0, seed: int = 0) -> Path:
    """``n`` object scenes as PNG bytes in ``shards`` Parquet files, plus ``corrupt`` garbage rows."""
    images, labels, _ = object_scenes(n, seed=seed)
    rows = [(f"scene-{i:04d}", png(im)) for i, im in enumerate(images)]
    rows += [(f"corrupt-{i}", b"\x89PNG not really") for i in range(corrupt)]
    folder.mkdir(parents=True)
    for s in range(shards):
        part = rows[s::shards]
        table = pa.table({
            "image_id": [r[0] for r in part],
            "image": pa.array([r[1] for r in part], pa.binary()),
            "split": ["train"] * len(part),
        })
        pq.write_table(table, folder / f"part-{s}.parquet")
    return folder


def tiny_config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        backbone=TINY_BACKBONE,
        auxiliary=AUXILIARY,
        data=str(data),
        output_dir=str(tmp_path / "explainer"),
        preprocessing=TINY_PREP,
        batch_size=8,
        lr=3e-3,
        storage_path=str(tmp_path / "ray_results"),
        checkpoint_every=8,
    )
    return replace(base, **overrides)


def mean_loss(history: list[dict], steps: range) -> float:
    return float(np.mean([h["loss"] for h in history if h["step"] in steps]))


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a worker node on this machine (2 logical CPUs each); shut down at teardown."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# --------------------------------------------------------------------------- bad settings (no Ray)


def test_zero_workers_is_refused_naming_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_workers"):
        tiny_config(tmp_path, tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_config(tmp_path, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="loss"):
        tiny_config(tmp_path, tmp_path, loss={"ce": 1.0, "nope": 2.0})
    with pytest.raises(ValueError, match="preprocessing"):
        tiny_config(tmp_path, tmp_path, preprocessing={"input_sise": 64})
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"data": "x"})  # type: ignore[arg-type]


def test_config_travels_as_plain_values_map_settings_included(tmp_path) -> None:
    from dataclasses import asdict

    from ptame.train.config import build_explainer

    cfg = tiny_config(tmp_path, tmp_path, auxiliary="backbone", maps=MapSettings(smoothing=1.5, cam_weight=0.5))
    raw = asdict(cfg)  # what Ray Train hands each worker
    assert raw["maps"] == {"smoothing": 1.5, "cam_weight": 0.5, "activity_weight": 0.0}
    assert TrainConfig(**raw) == cfg
    assert build_explainer(cfg).maps == cfg.maps  # the saved explainer's map settings
    with pytest.raises(ValueError, match="unknown map settings"):
        tiny_config(tmp_path, tmp_path, maps={"blur": 1.0})
    with pytest.raises(TypeError, match="TrainConfig.maps"):
        tiny_config(tmp_path, tmp_path, maps=1.5)


def test_crop_scale_shrinks_the_training_crops_only(tmp_path) -> None:
    from ptame.train.config import training_preprocessing

    prep = {"input_size": 260, "resize": 297, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    cfg = replace(tiny_config(tmp_path, tmp_path), preprocessing=prep, crop_scale=0.75)
    assert training_preprocessing(cfg) == {**prep, "input_size": 195, "resize": 223}  # 260 x 0.75, 297 x 0.75
    assert training_preprocessing(replace(cfg, crop_scale=1.0)) == prep
    assert cfg.preprocessing == prep  # what the saved explainer explains at
    for bad in (0, 1.5, -0.5):
        with pytest.raises(ValueError, match="crop_scale must be in"):
            replace(cfg, crop_scale=bad)


def test_the_first_training_log_line_says_the_precision_and_why(tmp_path, caplog) -> None:
    from ptame.precision import choose_precision

    with caplog.at_level(logging.INFO, logger="ptame.train"), pytest.raises(FileNotFoundError):
        train(tiny_config(tmp_path, tmp_path / "does-not-exist"))  # refused right after the first line
    first = next(r.getMessage() for r in caplog.records if r.name == "ptame.train")
    assert first == f"precision {choose_precision('auto', 'cpu').describe()}"
    assert "native bf16" in first


def test_missing_data_is_refused_naming_the_field(tmp_path) -> None:
    ray_before = ray.is_initialized()
    with pytest.raises(FileNotFoundError, match=r"TrainConfig\.data.*does-not-exist"):
        train(tiny_config(tmp_path, tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"TrainConfig\.data: no Parquet files"):
        train(tiny_config(tmp_path, tmp_path / "empty"))
    assert ray.is_initialized() == ray_before  # refused before any Ray started


def test_bad_backbone_column_or_size_is_refused_before_ray_starts(tmp_path) -> None:
    ray_before = ray.is_initialized()
    data = write_scenes(tmp_path / "data", 16, shards=1)
    with pytest.raises(ValueError, match=r"TrainConfig\.backbone"):
        train(tiny_config(tmp_path, data, backbone="python:ptame.testing:no_such_model"))
    with pytest.raises(ValueError, match=r"TrainConfig\.data .* no column 'pixels'"):
        train(tiny_config(tmp_path, data, image_column="pixels"))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(tiny_config(tmp_path, data, batch_size=32))
    assert ray.is_initialized() == ray_before


def test_run_directory_follows_settings_and_data(tmp_path) -> None:
    """Same settings and data: same run directory (a rerun resumes); anything that changes the result: new one."""
    from ptame.train.driver import _run_directory
    from ptame.train.feed import data_files

    data = write_scenes(tmp_path / "data", 8, shards=2)
    cfg = tiny_config(tmp_path, data)
    name = _run_directory(cfg, data_files(str(data)))
    assert name.startswith("ptame-train-")
    assert _run_directory(replace(cfg, checkpoint_every=3, storage_path="elsewhere", fail_at_step=2),
                          data_files(str(data))) == name
    # the map settings count (the head trains on the explained maps), as they do for DVC's train stage
    assert _run_directory(replace(cfg, maps=MapSettings(smoothing=2.0)), data_files(str(data))) != name
    assert _run_directory(replace(cfg, lr=1e-3), data_files(str(data))) != name
    assert _run_directory(replace(cfg, num_workers=2), data_files(str(data))) != name
    write_scenes(tmp_path / "data2", 9, shards=2)
    (data / "part-1.parquet").write_bytes((tmp_path / "data2" / "part-1.parquet").read_bytes())
    assert _run_directory(cfg, data_files(str(data))) != name, "new data must not resume an old run"
    assert _run_directory(replace(cfg, resume=False), data_files(str(data))) != _run_directory(cfg, data_files(str(data)))


# --------------------------------------------------------------------------- loss history


@pytest.fixture()
def process_group(request):
    """A one-rank torch.distributed group (gloo, or NCCL when the test asks for ``"nccl"``)."""
    import socket

    import torch.distributed as dist

    backend = getattr(request, "param", "gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def step_terms(step: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.tensor(step + i / 10, device=device) for i, k in enumerate(LOSS_TERMS)}


def test_loss_log_reduces_every_queued_step_in_one_collective(process_group, monkeypatch) -> None:
    calls = []
    original = process_group.all_reduce
    monkeypatch.setattr(process_group, "all_reduce", lambda t, *a, **k: calls.append(t.shape) or original(t, *a, **k))
    log = _LossLog()
    for step in range(1, 6):
        log.add(step_terms(step), {"step": step, "lr": 0.1 * step, "elapsed": float(step)}, keep=step != 4)
    rows, latest = log.flush()
    assert calls == [(5, len(LOSS_TERMS))]  # one collective for five steps
    assert [r["step"] for r in rows] == [1, 2, 3, 5]  # step 4 was checkpoint-only
    assert list(rows[0]) == ["step", *LOSS_TERMS, "lr", "elapsed"]
    assert rows[1]["ce"] == pytest.approx(2.1) and rows[-1]["tv"] == pytest.approx(5.3)
    assert latest == pytest.approx({"loss": 5.0, "ce": 5.1, "area": 5.2, "tv": 5.3, "deletion": 5.4, "lr": 0.5})
    assert log.flush() == ([], {})


@pytest.mark.gpu
@pytest.mark.parametrize("process_group", ["nccl"], indirect=True)
def test_loss_terms_are_reduced_on_the_gpu_with_nccl(process_group) -> None:
    values = torch.stack([torch.stack(list(step_terms(s, "cuda").values())) for s in (1, 2)])
    reduced = _mean_terms(values)
    assert len(reduced) == 2 and reduced[0] + reduced[1] == pytest.approx([1.0, 1.1, 1.2, 1.3, 2.0, 2.1, 2.2, 2.3])
    log = _LossLog()
    log.add(step_terms(7, "cuda"), {"step": 7, "lr": 0.5, "elapsed": 1.0})
    rows, latest = log.flush()
    assert rows[0]["area"] == pytest.approx(7.2) and isinstance(rows[0]["area"], float)


# --------------------------------------------------------------------------- real runs


@pytest.mark.gpu
def test_gpu_training_with_amp_logs_every_step(tmp_path) -> None:
    """One GPU worker on a local Ray that train() starts itself, mixed precision, per-step history."""
    if ray.is_initialized() and not ray.cluster_resources().get("GPU"):
        pytest.skip("a Ray without GPUs is already running in this process")
    data = write_scenes(tmp_path / "data", 48)
    result = train(tiny_config(tmp_path, data, use_gpu=True, amp=True, max_steps=6, checkpoint_every=4, log_every=1))
    assert result.steps == 6
    assert [h["step"] for h in result.history] == list(range(1, 7))
    assert all(np.isfinite([h[k] for h in result.history for k in LOSS_TERMS]))
    explainer = Explainer.load(result.explainer_dir)
    assert_maps(explainer.explain(object_scenes(2, seed=9)[0]).saliency, (2, 1, 16, 16))


def test_single_worker_trains_survives_a_worker_death_and_saves(tmp_path, two_node_cluster) -> None:
    """24 steps on one worker; the worker dies at step 12, the restart resumes at the step-8 checkpoint."""
    data = write_scenes(tmp_path / "data", 24 * 8, corrupt=3)  # 3 undecodable rows are dropped, not fatal
    cfg = tiny_config(tmp_path, data, max_steps=24, fail_at_step=12, augment=True)
    result = train(cfg)

    assert isinstance(result, TrainResult)
    assert result.steps == 24
    assert result.resumed_from == (8,), "the restart must resume at the last checkpoint, not at step 0"
    assert [h["step"] for h in result.history] == list(range(1, 25)), "no step repeated or missing"
    assert mean_loss(result.history, range(20, 25)) < 0.7 * mean_loss(result.history, range(1, 5))
    assert result.checkpoint is not None and Path(result.checkpoint).name == "checkpoint_0000024"
    state = json.loads((Path(result.checkpoint) / "train_state.json").read_text())
    assert state["step"] == 24 and state["resumed_from"] == [8]
    assert (Path(cfg.storage_path) / Path(result.run_path).name / ".fault-injected").read_text() == "12"

    explainer = Explainer.load(result.explainer_dir)
    assert explainer.preprocessing.input_size == 64
    images, _, _ = object_scenes(4, seed=77)
    assert_maps(explainer.explain(images).saliency, (4, 1, 16, 16))
    # the saved head is the checkpoint's head
    from safetensors.torch import load_file

    saved = load_file(str(Path(result.checkpoint) / "head.safetensors"))
    for name, tensor in explainer.head.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])

    # rerunning the finished job with identical settings reuses it: no step is redone
    checkpoints = sorted(Path(result.run_path).glob("checkpoint_0*"))
    again = train(replace(cfg, fail_at_step=None, output_dir=str(tmp_path / "again")))
    assert again.steps == 24 and again.resumed_from == (8, 24) and again.run_path == result.run_path
    assert [h["step"] for h in again.history] == list(range(1, 25))
    assert sorted(Path(result.run_path).glob("checkpoint_0*")) == checkpoints
    assert (tmp_path / "again" / "head.safetensors").read_bytes() == (tmp_path / "explainer" / "head.safetensors").read_bytes()

    # cached images, seeded order and crops: a run never killed ends with the very same head
    clean = train(replace(cfg, fail_at_step=None, resume=False, output_dir=str(tmp_path / "clean")))
    assert clean.run_path != result.run_path and clean.resumed_from == ()
    for name, tensor in Explainer.load(clean.explainer_dir).head.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)


def test_streamed_images_train_too(tmp_path, two_node_cluster) -> None:
    """Over ``cache_gb`` the shard is decoded again every epoch by Ray Data: it still trains."""
    data = write_scenes(tmp_path / "data", 8 * 8)
    cfg = tiny_config(tmp_path, data, epochs=2, cache_gb=0.0, checkpoint_every=100)
    result = train(cfg)
    assert [h["step"] for h in result.history] == list(range(1, 17))
    assert mean_loss(result.history, range(13, 17)) < mean_loss(result.history, range(1, 5))


def test_two_workers_on_two_nodes(tmp_path, two_node_cluster) -> None:
    """DDP over the head across two Ray nodes: one worker per node, loss goes down, one checkpoint."""
    data = write_scenes(tmp_path / "data", 16 * 4 * 2, shards=4)
    cfg = tiny_config(tmp_path, data, num_workers=2, batch_size=4, max_steps=16, checkpoint_every=100,
                      placement_strategy="STRICT_SPREAD", augment=False, log_every=2)
    result = train(cfg)

    assert result.steps == 16
    assert len(result.worker_nodes) == 2 and len(set(result.worker_nodes)) == 2
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(result.worker_nodes) == alive
    assert [h["step"] for h in result.history] == list(range(2, 17, 2))
    assert mean_loss(result.history, range(12, 17)) < 0.7 * mean_loss(result.history, range(1, 5))
    checkpoints = sorted(p.name for p in Path(result.run_path).glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_0000016"], "checkpoint_every=100: only the final checkpoint"
    assert Explainer.load(result.explainer_dir).head.num_classes == 4


@pytest.mark.slow
def test_epochs_with_undecodable_rows_end_cleanly(tmp_path, two_node_cluster) -> None:
    """Dropped rows leave each epoch short of its planned steps: the run ends after the last epoch."""
    data = write_scenes(tmp_path / "data", 40, shards=2, corrupt=8)  # 48 rows: 6 planned steps, 5 real
    cfg = tiny_config(tmp_path, data, epochs=2, checkpoint_every=100)
    result = train(cfg)
    assert result.steps == 10
    assert [h["step"] for h in result.history] == list(range(1, 11))
    assert Path(result.checkpoint).name == "checkpoint_0000010"
    again = train(cfg)  # finished: reused without training
    assert again.steps == 10 and again.resumed_from == (10,)


@pytest.mark.slow
def test_too_many_failures_raise(tmp_path, two_node_cluster) -> None:
    from ray.train import TrainingFailedError

    data = write_scenes(tmp_path / "data", 64, shards=1)
    with pytest.raises(TrainingFailedError):
        train(tiny_config(tmp_path, data, max_steps=6, fail_at_step=3, max_failures=0))
    assert not (tmp_path / "explainer").exists()


def test_class_names_must_match_the_classifier_and_reach_the_explainer(tmp_path) -> None:
    from ptame.train.config import build_explainer

    ray_before = ray.is_initialized()
    data = write_scenes(tmp_path / "data", 16, shards=1)
    with pytest.raises(ValueError, match=r"TrainConfig\.class_names has 3 names but .* has 4 outputs"):
        train(tiny_config(tmp_path, data, class_names=["red", "green", "blue"]))
    with pytest.raises(TypeError, match=r"TrainConfig\.class_names"):
        tiny_config(tmp_path, data, class_names="red,green")
    assert ray.is_initialized() == ray_before
    names = ["red", "green", "blue", "nothing"]
    assert build_explainer(tiny_config(tmp_path, data, class_names=names)).class_names == names


# --------------------------------------------------------------------------- data sources, steps (no Ray)


def test_image_folder_glob_and_list_are_prepared_once(tmp_path) -> None:
    """``data`` may be any ``data.source``: images are prepared into Parquet under storage_path, once."""
    from ptame.train.feed import data_files, inspect_data, training_data

    images, _, _ = object_scenes(6, seed=5)
    folder = tmp_path / "my_images"
    (folder / "cats").mkdir(parents=True)
    for i, im in enumerate(images):
        (folder / ("cats" if i % 2 else "") / f"img{i}.png").write_bytes(png(im))
    (folder / "notes.txt").write_text("not an image")  # left out with a warning, as prepare does
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in sorted(folder.rglob("*.png"))[:4]))

    cfg = tiny_config(tmp_path, folder)
    prepared = training_data(cfg)
    assert Path(prepared).parent.parent == tmp_path / "ray_results" / "prepared"
    rows, names = inspect_data(replace(cfg, data=prepared))
    assert rows == 6 and {"image_id", "image"} <= set(names)
    stamps = data_files(prepared)
    assert training_data(cfg) == prepared and data_files(prepared) == stamps  # reused: a rerun resumes
    assert inspect_data(replace(cfg, data=training_data(replace(cfg, data=str(folder / "*.png")))))[0] == 3
    assert inspect_data(replace(cfg, data=training_data(replace(cfg, data=str(tmp_path / "list.txt")))))[0] == 4
    parquet = write_scenes(tmp_path / "shards", 4)
    assert training_data(replace(cfg, data=str(parquet))) == str(parquet)  # Parquet is read as it is
    (folder / "img0.png").write_bytes(png(images[1]))  # a changed source is prepared anew
    assert training_data(cfg) != prepared
    with pytest.raises(ValueError, match=r"prepare_source\("):
        training_data(replace(cfg, storage_path="s3://bucket/runs"))


def test_log_says_whether_epochs_or_max_steps_limit(tmp_path, caplog) -> None:
    from ptame.train.driver import _train_total_steps

    cfg = tiny_config(tmp_path, tmp_path, batch_size=16, epochs=10, max_steps=200)
    with caplog.at_level("INFO", logger="ptame.train"):
        assert _train_total_steps(1200, cfg) == (75, 200)
    assert "training 200 steps (max_steps; 10 epochs would be 750)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="ptame.train"):
        assert _train_total_steps(1200, replace(cfg, epochs=2)) == (75, 150)
    assert "training 2 epochs of 75 steps = 150 steps (epochs; max_steps 200 not reached)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="ptame.train"):
        assert _train_total_steps(1200, replace(cfg, epochs=2, max_steps=None)) == (75, 150)
    assert "(epochs; no max_steps)" in caplog.text
