"""The DVC pipeline end to end (real DVC, Ray, MLflow on SQLite) on a tiny configuration, params errors,
and the champion rule of the register stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from ptame.params import MissingParamError, Params, UnknownParamError, check_keys, load_params

ROOT = Path(__file__).resolve().parents[1]
MEASURE_KEYS = ("AD@100", "AD@50", "AD@15", "IC@100", "IC@50", "IC@15", "ROAD-MoRF", "ROAD-LeRF", "GridPG", "sec_per_image")
STAGES = ("prepare", "train", "maps", "evaluate", "register", "explain")


def _tiny_params() -> dict:
    """The repository's params.yaml shrunk: EfficientNet-Lite0 at 64 px, a few steps, RISE N=16."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(backbone="builtin:efficientnet_lite0", preprocessing={"input_size": 64, "resize": 64})
    params["data"]["demo"].update(train_images=16, eval_images=2, single_images=2, image_size=128, min_score=0.05)
    params["train"].update(max_steps=3, batch_size=4, checkpoint_every=2, lr=1e-3)
    params["evaluate"].update(max_images=2, batch_size=4)
    params["evaluate"]["methods"]["rise"] = {"num_masks": 16, "max_images": 1, "batch_size": 16}  # opt-in: the subsets
    params["evaluate"]["gallery"]["images"] = 1
    params["register"]["name"] = "tiny-ptame"
    params["explain"].update(batch_size=4, concurrency=1)
    return params


def _project_copy(dst: Path, params: dict) -> Path:
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / ".dvc", dst / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for folder in ("pipelines", "ptame", "classes"):  # ptame/: code dependencies (imports use the installed ptame)
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'registry.db'}"
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    (tmp / "project").mkdir()
    project = _project_copy(tmp / "project", _tiny_params())
    env = _env(tmp)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    proc = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=2000)
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return project, env, proc


@pytest.mark.timeout(2400)  # ~3 min on an idle 2-core machine; Ray and DVC start-up stretch a lot under load
def test_dvc_repro_end_to_end(repro) -> None:
    project, env, proc = repro
    for stage in STAGES:
        assert f"Running stage '{stage}'" in proc.stdout

    # every stage's outs exist
    assert sorted(p.name for p in (project / "data/prepared").iterdir()) == ["eval", "single", "train"]
    for folder in ("models/head", "models/explainer"):
        assert {"config.json", "head.safetensors"} <= {p.name for p in (project / folder).iterdir()}
    saved = json.loads((project / "models/explainer/config.json").read_text())
    wanted = yaml.safe_load((project / "params.yaml").read_text())["model"]
    assert saved["maps"] == {k: wanted[k] for k in saved["maps"]}  # the maps stage applied them
    assert saved["extra"]["train"]["steps"] == 3  # and kept what training recorded
    for path in ("reports/prepare.json", "reports/train.json", "reports/plots/train_loss.csv", "reports/plots/road_morf.csv",
                 "reports/plots/road_lerf.csv", "reports/plots/road_morf_single.csv", "reports/gallery/gallery.png",
                 "reports/registered.json", "reports/per_image.parquet"):
        assert (project / path).is_file(), path
    for name in ("train_loss", "road_morf", "road_lerf"):  # the curves as PNGs: `dvc plots show` draws them offline
        with Image.open(project / f"reports/plots/{name}.png") as im:
            assert im.format == "PNG" and im.size[0] >= 300, name

    prepared = json.loads((project / "reports/prepare.json").read_text())
    assert (prepared["train"], prepared["eval"], prepared["single"], prepared["skipped"]) == (16, 2, 2, 0)
    trained = json.loads((project / "reports/train.json").read_text())
    assert trained["steps"] == 3
    assert (project / "reports/plots/train_loss.csv").read_text().splitlines()[0] == "step,loss,ce,area,tv,deletion,lr"

    metrics = json.loads((project / "reports/metrics.json").read_text())
    grids = {"ptame", "cam", "gradcam", "rise", "ptame@rise", "cam@rise", "gradcam@rise"}
    assert set(metrics) == grids | {f"{m}/single" for m in grids}  # the single photos: their own table
    for method, values in metrics.items():
        assert set(MEASURE_KEYS) - {"GridPG"} <= set(values) and values["AD@15_lo"] <= values["AD@15"] <= values["AD@15_hi"], method
        assert 0.0 <= values["ROAD-MoRF"] <= 1.0 and ("GridPG" in values) == ("/" not in method), method
    assert metrics["rise"]["images"] == 1.0 and metrics["ptame"]["images"] == 2.0 and metrics["ptame@rise"]["n"] == 1
    assert metrics["ptame/single"]["n"] == 2
    differences = json.loads((project / "reports/differences.json").read_text())
    pairs = ("ptame - cam", "ptame - gradcam", "ptame - rise")
    assert set(differences) == {*pairs, *(f"ptame/single - {p.split(' - ')[1]}/single" for p in pairs)}
    for peer, mine, suffix in (("gradcam", "ptame", ""), ("rise", "ptame@rise", ""), ("cam", "ptame", "/single")):
        d = differences[f"ptame{suffix} - {peer}{suffix}"]
        for key in ("AD@100", "ROAD-LeRF", "ROAD-MoRF@10") + (("GridPG",) if not suffix else ()):
            assert d[key] == pytest.approx(metrics[mine + suffix][key] - metrics[peer + suffix][key])
            assert d[f"{key}_lo"] - 1e-9 <= d[key] <= d[f"{key}_hi"] + 1e-9
        assert d["n"] == metrics[peer + suffix]["n"]
    per_image = pq.read_table(project / "reports/per_image.parquet").to_pylist()
    assert len(per_image) == 2 * (2 * 3 + 1)  # two sets: 2 images x (ptame, cam, gradcam) + RISE's 1
    row = next(r for r in per_image if (r["set"], r["method"]) == ("single", "cam"))
    assert row["image_id"].startswith("single-") and row["GridPG"] is None

    # registered, promoted (first version), and the champion gives the same maps as the trained explainer
    record = json.loads((project / "reports/registered.json").read_text())
    assert record["version"] == "1" and record["promoted"] and record["decided_by"] == "headline"
    assert record["values"]["ROAD-MoRF"] == pytest.approx(metrics["ptame"]["ROAD-MoRF"])
    evaluation = json.loads((project / "reports/evaluation.json").read_text())
    assert record["fingerprint"] == evaluation["fingerprint"] and evaluation["n"] == 2
    code = (
        "import json, sys, torch\n"
        "from ptame.explainer import Explainer\n"
        "from ptame.registry import configure, load_explainer\n"
        "configure()\n"
        "loaded = load_explainer('models:/tiny-ptame@champion')\n"
        "local = Explainer.load('models/explainer')\n"
        "x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))\n"
        "a, b = loaded.explainer.explain(x, topk=2), local.explain(x, topk=2)\n"
        "torch.testing.assert_close(a.saliency, b.saliency, rtol=0, atol=0)\n"
        "assert torch.equal(a.classes, b.classes)\n"
        "print(json.dumps({'uri': loaded.model_uri, 'metrics': loaded.metrics}))\n"
    )
    check = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    loaded = json.loads(check.stdout.strip().splitlines()[-1])
    assert loaded["uri"] == "models:/tiny-ptame/1"
    assert loaded["metrics"]["ROAD-MoRF"] == pytest.approx(metrics["ptame"]["ROAD-MoRF"])

    # the explain stage explained every evaluation image with the pinned version
    table = pq.read_table(project / "data/explanations", columns=["image_id", "model_uri", "error", "saliency_shape"])
    assert table.num_rows == 2
    assert set(table.column("model_uri").to_pylist()) == {"models:/tiny-ptame/1"}
    assert table.column("error").to_pylist() == [None, None]
    assert table.column("saliency_shape").to_pylist() == [[16, 16], [16, 16]]

    # a second repro has nothing to do
    status = subprocess.run(["dvc", "status"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout

    # a map setting re-runs train (the head learns on the explained maps) and maps; a change to how maps are
    # made re-runs evaluate (dvc status names the stages whose own deps changed; the ones below them follow)
    assert _changed(project, env, lambda p: p["model"].update(smoothing=p["model"]["smoothing"] + 1)) == {"train", "maps"}
    assert _changed(project, env, lambda p: p["evaluate"].update(seed=p["evaluate"]["seed"] + 1)) == {"evaluate"}
    assert {"train", "maps", "evaluate", "explain"} <= _changed(project, env, code="ptame/explainer.py")


def _changed(project: Path, env: dict[str, str], edit=None, code: str | None = None) -> set[str]:  # noqa: ANN001
    """The stages ``dvc status`` says changed after one edit of params.yaml or of a code file (undone after)."""
    params_file, before = project / "params.yaml", (project / "params.yaml").read_text()
    target = project / (code or "params.yaml")
    original = target.read_text()
    try:
        if edit is not None:
            params = yaml.safe_load(before)
            edit(params)
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        if code is not None:
            target.write_text(original + "\n# edited\n")
        status = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert status.returncode == 0, status.stderr
        return {name.split(":")[-1] for name in json.loads(status.stdout or "{}")}
    finally:
        target.write_text(original)
        params_file.write_text(before)


def test_params_errors_name_the_key(tmp_path) -> None:
    params = Params({"train": {"lr": 0.1, "loss": {"ce": 1.0}}})
    assert params["train.lr"] == 0.1
    assert params["train"]["loss.ce"] == 1.0
    assert params.get("train.batch_size", 8) == 8
    with pytest.raises(MissingParamError, match=r"^params.yaml: missing key 'train.batch_size'$"):
        params["train.batch_size"]
    with pytest.raises(MissingParamError, match="missing key 'train.loss.area'"):
        params["train"]["loss"]["area"]
    with pytest.raises(MissingParamError, match="missing key 'evaluate'"):
        params["evaluate.road.seed"]
    assert params.flat() == {"train.lr": 0.1, "train.loss.ce": 1.0}
    with pytest.raises(FileNotFoundError, match="project root"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_params(tmp_path / "bad.yaml")


def test_stage_with_missing_param_exits_naming_it(tmp_path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["train"]["batch_size"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    proc = subprocess.run([sys.executable, "pipelines/train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "params.yaml: missing key 'train.batch_size'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_class_names_files_are_a_dependency_of_train(tmp_path) -> None:
    """``model.class_names`` files live in classes/, which dvc.yaml's train stage depends on; others are refused."""
    from ptame.params import CLASS_NAMES_DIR, check_class_names_file

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert CLASS_NAMES_DIR in stages["train"]["deps"] and (ROOT / CLASS_NAMES_DIR).is_dir()
    assert "model.class_names" in stages["train"]["params"]  # a list of names in params.yaml is a tracked param
    for ok in (None, ["cat", "dog"], "classes/birds.txt", "./classes/sub/x.txt"):
        check_class_names_file(ok, tmp_path)
    with pytest.raises(ValueError, match=r"outside classes/.*model.class_names: classes/names.txt"):
        check_class_names_file("data/names.txt", tmp_path)

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["class_names"] = "names.txt"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "names.txt").write_text("a\nb\n")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    proc = subprocess.run([sys.executable, "pipelines/train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "lies outside classes/" in proc.stderr and "Traceback" not in proc.stderr


def test_repository_params_have_only_known_keys() -> None:
    check_keys(load_params(ROOT / "params.yaml"))


def test_stage_refuses_an_unknown_key_naming_the_nearest(tmp_path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["explain"]["top_k"] = params["explain"].pop("topk")
    params["train"]["loss"]["areaa"] = 1.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    proc = subprocess.run([sys.executable, "pipelines/prepare.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "explain.top_k (did you mean explain.topk?)" in proc.stderr
    assert "train.loss.areaa (did you mean train.loss.area?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "pipelines"]  # nothing done
    with pytest.raises(UnknownParamError, match="did you mean model"):
        check_keys(Params({"modle": {}}))


def test_stage_logs_hold_no_progress_bars(tmp_path) -> None:
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 20, 200)).save(tmp_path / "photos" / f"{i}.png")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "photos"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    proc = subprocess.run([sys.executable, "pipelines/prepare.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    assert report["train"] + report["eval"] == 3
    assert "%|" not in proc.stderr and "\r" not in proc.stderr  # stderr is no terminal: no tqdm bar


def test_register_stage_describes_the_version_and_records_relative_paths(tiny_explainer, tmp_path) -> None:
    from mlflow import MlflowClient

    from ptame import registry

    tiny_explainer.save(tmp_path / "models" / "explainer")
    (tmp_path / "reports").mkdir()
    metrics = {"ptame": {"AD@100": 12.5, "IC@100": 30.0, "ROAD-MoRF": 0.25, "n": 2}, "gradcam": {"AD@100": 20.0, "n": 2}}
    (tmp_path / "reports/metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "reports/train.json").write_text(json.dumps({"steps": 3}))
    (tmp_path / "reports/prepare.json").write_text(json.dumps({"train": 16, "eval": 2}))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "pipelines/register.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Downloading artifacts" not in proc.stderr  # no progress bars in a log file
    record = json.loads((tmp_path / "reports/registered.json").read_text())
    assert record["tracking_uri"] == "sqlite:///mlflow.db"  # under the project: relative, so it can move
    assert json.dumps(record).count(str(tmp_path)) == 0
    name = record["name"]
    registry.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    entry = MlflowClient().get_model_version(name, record["version"])
    assert not entry.source.startswith(("/", "file:"))
    description = entry.description
    assert "explainer of python:ptame.testing:tiny_cnn (auxiliary: builtin:efficientnet_lite0)" in description
    assert "3 steps on 16 training images from data source 'demo'" in description
    assert "ptame on 2 evaluation images: AD@100 12.5, IC@100 30, ROAD-MoRF 0.25" in description
    assert "gradcam on 2 evaluation images: AD@100 20" in description
    assert registry.load_explainer(record["model_uri"]).description == description


def test_champion_moves_only_to_an_at_least_as_faithful_version(tiny_explainer, tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from ptame.champion import at_least_as_good, register_and_promote

    assert at_least_as_good(0.3, 0.4, "ROAD-MoRF") and not at_least_as_good(0.5, 0.4, "ROAD-MoRF")
    assert at_least_as_good(0.4, 0.4, "ROAD-MoRF") and at_least_as_good(0.9, None, "GridPG")
    assert not at_least_as_good(0.2, 0.3, "GridPG") and at_least_as_good(0.2, 0.1, "ROAD-gap")
    with pytest.raises(ValueError, match="unknown decision measure"):
        at_least_as_good(1.0, 1.0, "accuracy")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    saved = tiny_explainer.save(tmp_path / "explainer")

    def register(morf: float) -> dict:
        metrics = {"ptame": {"ROAD-MoRF": morf, "AD@100": 10.0}, "gradcam": {"ROAD-MoRF": 0.3}}
        return register_and_promote(
            saved, "tiny", metrics, params={"train.lr": 0.1}, artifacts=[saved / "config.json"], measure="ROAD-MoRF", fingerprint="fp"
        )

    first, worse, tie = register(0.40), register(0.55), register(0.40)
    assert (first["version"], first["promoted"], first["champion_before"]) == ("1", True, None)
    assert (worse["version"], worse["promoted"]) == ("2", False)
    assert worse["champion_before"] == {"version": "1", "value": 0.40, "fingerprint": "fp"}
    assert (tie["version"], tie["promoted"]) == ("3", True)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "3"
    run = client.get_run(client.get_model_version("tiny", "2").run_id)
    assert run.data.metrics["gradcam.ROAD-MoRF"] == 0.3 and run.data.metrics["AD_at_100"] == 10.0
    assert run.data.params["train.lr"] == "0.1"
    assert client.get_model_version("tiny", "2").tags["decided_by"] == "ROAD-MoRF"
    assert (tmp_path / "mlflow.db").is_file()
