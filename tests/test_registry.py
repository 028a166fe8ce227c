"""MLflow on a temporary SQLite file: register an explainer and load it back by alias."""

import pytest
import torch

from ptame import registry


@pytest.fixture()
def mlflow_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.configure()
    return tmp_path


def test_register_and_load_by_alias(tiny_explainer, mlflow_dir) -> None:
    from mlflow import MlflowClient

    _, version = registry.log_explainer(tiny_explainer, "tiny", metrics={"AD@100": 12.5})
    assert version == "1"
    assert (mlflow_dir / "mlflow.db").is_file() and (mlflow_dir / "mlartifacts").is_dir()
    MlflowClient().set_registered_model_alias("tiny", "champion", version)
    loaded = registry.load_explainer("models:/tiny@champion")
    assert loaded.model_uri == "models:/tiny/1" and loaded.alias == "champion"
    assert loaded.metrics["AD_at_100"] == 12.5
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.explainer.explain(images).saliency, tiny_explainer.explain(images).saliency)


def test_pyfunc_pins_the_ptame_that_logged_it(tiny_explainer, mlflow_dir) -> None:
    from importlib.metadata import version

    import mlflow

    registry.log_explainer(tiny_explainer, "tiny")
    requirements = open(mlflow.pyfunc.get_model_dependencies("models:/tiny/1")).read().split()
    assert f"ptame=={version('ptame')}" in requirements and "ptame" not in requirements


def test_unknown_registry_references_say_so(mlflow_dir) -> None:
    with pytest.raises(LookupError, match="not in the registry"):
        registry.load_explainer("models:/nothing@champion")
    with pytest.raises(ValueError, match="registry URI"):
        registry.parse_model_uri("models:/a/b/c")
    with pytest.raises(FileNotFoundError, match="neither"):
        registry.load_explainer(mlflow_dir / "missing")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_pyfunc_signature_and_mlflow_models_serve(tiny_explainer, mlflow_dir) -> None:
    import base64
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow
    import numpy as np

    from ptame.records import dequantize

    registry.log_explainer(tiny_explainer, "tiny")
    info = mlflow.models.get_model_info("models:/tiny/1")
    assert [c.name for c in info.signature.inputs.inputs] == ["image"]
    assert {p.name: p.default for p in info.signature.params.params} == {"topk": 5, "class": -1, "view": "crop"}
    jpeg = registry.input_example()["image"][0]

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.absolute_sqlite("sqlite:///mlflow.db")}
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny/1", "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(argv, cwd=mlflow_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {server.stderr.read().decode()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 120 s"
            time.sleep(1)
        image = base64.b64encode(jpeg).decode()
        url = f"http://127.0.0.1:{port}/invocations"
        status, answer = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[image], ["bm90IGFuIGltYWdl"]]}, "params": {"topk": 3}})
        assert status == 200, answer
        good, bad = answer["predictions"]
        assert len(good["topk_classes"]) == 3 and good["saliency_class"] == good["pred_class"] and good["error"] is None
        assert bad["error"] and bad["saliency"] is None
        saliency = dequantize(base64.b64decode(good["saliency"]), good["saliency_shape"])
        assert saliency.shape == tuple(good["saliency_shape"]) and 0 <= saliency.min() <= saliency.max() <= 1
        chosen = (good["pred_class"] + 1) % tiny_explainer.backbone.num_classes
        status, answer = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[image]]}, "params": {"class": chosen}})
        assert status == 200 and answer["predictions"][0]["saliency_class"] == chosen
        assert not np.array_equal(dequantize(base64.b64decode(answer["predictions"][0]["saliency"]), good["saliency_shape"]), saliency)
        status, answer = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[image]]}, "params": {"view": "full"}})
        assert status == 200 and answer["predictions"][0]["crop_box"] == [0, 0, 48, 48], answer
        status, answer = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[image]]}, "params": {"view": "wide"}})
        assert status >= 400 and "view must be one of ['crop', 'full'], got 'wide'" in answer["message"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _wait_for(url: str, proc, log, seconds: float, what: str) -> None:  # noqa: ANN001 - Popen, Path
    """Poll ``url`` until it answers 200; fail with the log tail if ``proc`` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"{what} exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{what} did not answer {url} in {seconds:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def _stop(proc, sig: int = 15) -> None:  # noqa: ANN001 - Popen
    """Stop ``proc`` (and its process group) with ``sig``, killing it if it lingers."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_cluster_path_through_a_tracking_server(tiny_explainer, tmp_path, monkeypatch) -> None:
    """register -> ``ptame explain`` -> ``ptame serve`` against ``mlflow server --serve-artifacts``:
    every artifact goes through the server, the project folder gets no mlflow.db and no mlartifacts."""
    import base64
    import io
    import os
    import signal
    import subprocess
    import sys

    import mlflow
    from mlflow import MlflowClient
    from PIL import Image

    from ptame.explanations import read_explanations
    from ptame.testing import object_scenes

    server_dir, project = tmp_path / "server", tmp_path / "project"
    server_dir.mkdir()
    (project / "images").mkdir(parents=True)
    scenes, _, _ = object_scenes(3, size=72, seed=3)
    bodies = []
    for i, scene in enumerate(scenes):
        buf = io.BytesIO()
        Image.fromarray((scene.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(buf, "PNG")
        (project / "images" / f"scene{i}.png").write_bytes(buf.getvalue())
        bodies.append(buf.getvalue())

    port = _free_port()
    tracking = f"http://127.0.0.1:{port}"
    log = server_dir / "server.log"
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--serve-artifacts", "--backend-store-uri", f"sqlite:///{server_dir / 'backend.db'}",
            "--artifacts-destination", str(server_dir / "artifacts")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS")}
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # restored after the test (MLflow sets both)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(project)
    server = subprocess.Popen(argv, cwd=server_dir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    serving = None
    try:
        _wait_for(f"{tracking}/health", server, log, 180, "mlflow server")

        # register (this process), then pin the alias
        assert registry.configure(tracking) == tracking
        _, version = registry.log_explainer(tiny_explainer, "tiny", metrics={"AD@100": 3.0})
        MlflowClient().set_registered_model_alias("tiny", "champion", version)
        assert mlflow.get_experiment_by_name("ptame").artifact_location.startswith("mlflow-artifacts:")
        assert any((server_dir / "artifacts").rglob("head.safetensors"))  # the server holds the artifacts

        # bulk explanation in its own process and Ray
        cli = [sys.executable, "-m", "ptame.cli"]
        done = subprocess.run([*cli, "explain", "--model", "models:/tiny@champion", "--tracking-uri", tracking,
                               "--input", "images", "--output", "out", "--no-progress"],
                              cwd=project, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        df = read_explanations(str(project / "out"))
        assert sorted(df["image_id"]) == ["scene0.png", "scene1.png", "scene2.png"]
        assert set(df["model_uri"]) == {f"models:/tiny/{version}"} and df["error"].isna().all()

        # serving over HTTP, the replica loading the version from the server
        http_port, serve_log = _free_port(), project.parent / "serve.log"
        serving = subprocess.Popen([*cli, "serve", "--model", "models:/tiny@champion", "--tracking-uri", tracking,
                                    "--port", str(http_port), "--address", "local"],
                                   cwd=project, env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{http_port}"
        _wait_for(f"{url}/healthz", serving, serve_log, 300, "ptame serve")
        status, answer = _post_image(f"{url}/explain", bodies[1])
        assert status == 200, answer
        want = tiny_explainer.explain(_prepared(bodies[1], tiny_explainer), topk=1)
        assert answer["model_uri"] == f"models:/tiny/{version}" and answer["pred_class"] == int(want.classes[0, 0])
        assert base64.b64decode(answer["saliency_png"]).startswith(b"\x89PNG")
        _stop(serving, signal.SIGINT)
        assert serving.returncode == 130, serve_log.read_text()[-3000:]  # Ctrl-C: 128 + SIGINT
    finally:
        if serving is not None:
            _stop(serving)
        _stop(server)
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()
    assert sorted(p.name for p in project.iterdir()) == ["images", "out"]


def _post_image(url: str, body: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, body, {"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _prepared(body: bytes, explainer) -> torch.Tensor:  # noqa: ANN001 - Explainer
    from ptame.data import prepare_image

    return prepare_image(body, explainer.preprocessing).tensor[None]


def test_remote_registry_with_local_artifacts_warns(caplog) -> None:
    with caplog.at_level("WARNING", logger="ptame.registry"):
        registry._check_shared_artifacts("http://head:5000", "mlflow-artifacts:/1")
        registry._check_shared_artifacts("sqlite:////tmp/mlflow.db", "file:///tmp/mlartifacts")
        assert not caplog.records
        registry._check_shared_artifacts("http://head:5000", "/home/me/mlruns/1")
    assert "--serve-artifacts" in caplog.text and "/home/me/mlruns/1" in caplog.text


def test_pyfunc_view_param_maps_the_whole_image(mlflow_dir) -> None:
    import mlflow
    import pandas as pd
    from conftest import red_cells, red_explainer, red_scene
    from mlflow.exceptions import MlflowException

    from ptame.records import dequantize

    registry.log_explainer(red_explainer(), "red")
    model = mlflow.pyfunc.load_model("models:/red/1")
    frame = pd.DataFrame({"image": [red_scene()]})
    crop, full = model.predict(frame)[0], model.predict(frame, params={"view": "full"})[0]
    assert crop["crop_box"] == [32, 0, 96, 64] and crop["saliency_shape"] == [16, 16] and crop["pred_class"] == 3
    assert full["crop_box"] == [0, 0, 128, 64] and full["saliency_shape"] == [8, 16] and full["pred_class"] == 0
    assert torch.equal(torch.from_numpy(dequantize(full["saliency"], full["saliency_shape"]) >= 0.5), red_cells((8, 16)))
    with pytest.raises(MlflowException, match="view must be one of"):
        model.predict(frame, params={"view": "wide"})


def test_pyfunc_class_minus_one_is_the_prediction(mlflow_dir) -> None:
    import mlflow
    import pandas as pd
    from conftest import red_explainer, red_scene
    from mlflow.exceptions import MlflowException

    registry.log_explainer(red_explainer(), "red")
    model = mlflow.pyfunc.load_model("models:/red/1")
    frame = pd.DataFrame({"image": [red_scene()]})
    default, predicted, other = (model.predict(frame, params=p)[0] for p in (None, {"class": -1}, {"class": 1}))
    assert default["pred_class"] == 3 and predicted["saliency_class"] == default["saliency_class"] == 3
    assert predicted["saliency"] == default["saliency"] and other["saliency_class"] == 1
    for bad in (-2, 4):  # -1 alone stands for the prediction, as in `ptame explain` and `ptame serve`
        with pytest.raises(MlflowException, match=f"class {bad} is out of range"):
            model.predict(frame, params={"class": bad})
