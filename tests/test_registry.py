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
