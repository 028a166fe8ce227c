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
