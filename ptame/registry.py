"""MLflow registry glue: log a saved explainer as a model version, load one back by URI.

Tracking and registry default to ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` under
the working directory; ``MLFLOW_TRACKING_URI`` points elsewhere. A registered version holds the
saved explainer (``config.json`` + ``head.safetensors``) as its ``explainer`` artifact and a
pyfunc wrapper with a signature (an ``image`` binary column, base64 strings in JSON; params
``topk``, ``class``, ``view``) and an input example, so ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` work too; ptame itself only reads JSON and
safetensors back (:meth:`Explainer.load`), never pickles.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptame.explainer import Explainer

__all__ = [
    "DEFAULT_TRACKING_URI",
    "LoadedExplainer",
    "absolute_sqlite",
    "configure",
    "connect",
    "explain_rows",
    "explainer_files",
    "input_example",
    "load_explainer",
    "log_explainer",
    "metric_key",
    "parse_model_uri",
    "pip_requirement",
    "pyfunc_signature",
    "relative_sqlite",
    "resolve_version",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPLAINER_ARTIFACT = "explainer"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclass(frozen=True)
class LoadedExplainer:
    """An explainer and where it came from (``model_uri`` pins the exact registered version)."""

    explainer: Explainer
    model_uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    description: str | None = None


def _no_progress_bars_in_logs() -> None:
    """MLflow's artifact progress bars only on a terminal: in a log file every update is a line."""
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def configure(tracking_uri: str | None = None, experiment: str = "ptame", artifact_root: str | Path | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (default: env or local SQLite) and select ``experiment``.

    Returns:
        The tracking URI in use.
    """
    import mlflow

    _no_progress_bars_in_logs()
    uri = absolute_sqlite(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if _is_local_store(uri):
            location = Path(artifact_root or "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    found = mlflow.set_experiment(experiment)
    _check_shared_artifacts(uri, found.artifact_location)
    return uri


def _is_local_store(uri: str) -> bool:
    """A tracking or artifact URI that only this machine reads (SQLite file, ``file:``, a plain path)."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri and not uri.startswith("mlflow-artifacts:")


def _check_shared_artifacts(tracking_uri: str, artifact_location: str) -> None:
    """Warn when a remote registry files artifacts on this machine's disk: other nodes could not load them."""
    if artifact_location and not _is_local_store(tracking_uri) and _is_local_store(artifact_location):
        logger.warning(
            "the registry at %s keeps artifacts in %s, a file path: other nodes load these versions only if it "
            "is shared storage mounted at the same place. For a cluster, start the server with `mlflow server "
            "--serve-artifacts --artifacts-destination <dir or s3://...>` (and use a new experiment name)",
            tracking_uri, artifact_location,
        )


def connect(tracking_uri: str | None = None) -> str:
    """Point MLflow at an existing registry for reading (default: env or local SQLite); returns its URI.

    Raises:
        FileNotFoundError: the URI is a SQLite file that does not exist (MLflow would create an
            empty registry there instead of finding the model).
    """
    import mlflow

    _no_progress_bars_in_logs()
    uri = absolute_sqlite(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and ":memory:" not in uri and not Path(uri[len(prefix):]).is_file():
        raise FileNotFoundError(
            f"no MLflow registry at {uri}: that SQLite file does not exist; run `dvc repro` (its register stage) "
            "here first, or point --tracking-uri / $MLFLOW_TRACKING_URI at the registry that holds the model"
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def absolute_sqlite(uri: str) -> str:
    """``sqlite:///mlflow.db`` relative to the working directory -> an absolute SQLite URI.

    MLflow caches stores by URI string, so a relative one would keep pointing at the database of
    the directory it was first used in; Ray workers and Serve replicas also run elsewhere.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def relative_sqlite(uri: str, root: str | Path | None = None) -> str:
    """A SQLite URI whose file lies under ``root`` (default: the working directory) as ``sqlite:///<relative path>``."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        return uri
    path, base = Path(uri[len(prefix):]), Path(root or Path.cwd()).resolve()
    if not path.is_absolute() or not path.resolve().is_relative_to(base):
        return uri
    return prefix + path.resolve().relative_to(base).as_posix()


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> ``(name, version, alias)``."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise ValueError(f"{uri!r} is not a registry URI; use models:/<name>/<version> or models:/<name>@<alias>")
    return m["name"], m["version"], m["alias"]


def resolve_version(uri: str) -> tuple[str, str]:
    """The registered model name and the version number a registry URI points to now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    client = MlflowClient()
    try:
        if alias is not None:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as e:
        raise LookupError(f"{uri} is not in the registry at {_tracking_uri()}: {e.message}") from None


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


#: pyfunc params (``mlflow models serve``: ``{"dataframe_split": ..., "params": {"topk": 3}}``)
PYFUNC_PARAMS: dict[str, Any] = {"topk": 5, "class": -1, "view": "crop"}


def pyfunc_signature() -> Any:
    """Input ``image`` (binary; base64 strings in JSON), params ``topk``, ``class`` (-1: predicted), ``view`` (crop or full)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    params = ParamSchema([
        ParamSpec("topk", DataType.long, PYFUNC_PARAMS["topk"]),
        ParamSpec("class", DataType.long, PYFUNC_PARAMS["class"]),
        ParamSpec("view", DataType.string, PYFUNC_PARAMS["view"]),
    ])  # fmt: skip
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image")]), params=params)


def input_example() -> Any:
    """A one-row DataFrame holding a small JPEG (stored by MLflow as base64 JSON)."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    ramp = np.linspace(0, 255, 48, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def _pyfunc_options(params: dict[str, Any] | None) -> tuple[int, int, str]:
    """``(topk, class, view)`` from the pyfunc params (class ``-1``: the prediction); a wrong value is a ``ValueError`` naming it."""
    from ptame.data import check_view

    options = {**PYFUNC_PARAMS, **(params or {})}
    topk, chosen, view = int(options["topk"]), int(options["class"]), str(options["view"])
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    return topk, chosen, check_view(view)


def explain_rows(
    explainer: Explainer, images: Any, topk: int = 5, chosen: int | None = None, view: str = "crop"
) -> list[dict[str, Any]]:
    """Rows for encoded ``images``; with ``chosen`` the ``saliency`` is that class's map (``saliency_class``;
    ``None`` or ``-1``: the prediction); ``view="full"`` maps the whole image (letterboxed) instead of the centre crop."""
    from ptame.classes import resolve_class
    from ptame.data import check_view, prepare_image
    from ptame.records import explain_prepared

    chosen = None if chosen is None else resolve_class(chosen, explainer.class_names)
    check_view(view)
    items = [prepare_image(bytes(b), explainer.preprocessing, view=view) for b in images]
    return explain_prepared(explainer, items, topk=topk, classes=[chosen] * len(items))


def pip_requirement() -> str:
    """``ptame==<version>``: the ptame that logs a model, pinned in its pyfunc environment."""
    from ptame import __version__

    if __version__ == "0.0.0":  # a source tree that is not installed: no version to pin
        logger.warning("ptame is not installed, so the pyfunc's requirement is an unpinned 'ptame'")
        return "ptame"
    return f"ptame=={__version__}"


def _pyfunc_class() -> type:
    import mlflow.pyfunc

    class PtameModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: a DataFrame with an ``image`` bytes column -> one explanation row (dict) per image."""

        def load_context(self, context: Any) -> None:
            self.explainer = Explainer.load(context.artifacts[EXPLAINER_ARTIFACT])

        def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:  # noqa: ANN001 - a hint would make MLflow infer a schema from it
            from mlflow.exceptions import MlflowException

            try:  # MlflowException: the scoring server answers 400 with the message, not a bare 500
                topk, chosen, view = _pyfunc_options(params)
                # rows as dicts: a DataFrame would turn None into NaN and ints into floats
                return explain_rows(self.explainer, model_input["image"], topk, chosen, view)
            except ValueError as e:
                raise MlflowException.invalid_parameter_value(str(e)) from None

    PtameModel.__module__ = __name__
    return PtameModel


def log_explainer(
    explainer: Explainer | str | Path,
    registered_name: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    artifacts: list[str | Path] | None = None,
    description: str | None = None,
) -> tuple[str, str]:
    """Log ``explainer`` (object or saved directory) in a new run and register a version (with ``description``).

    Returns:
        ``(run_id, version)``.
    """
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / EXPLAINER_ARTIFACT
        if isinstance(explainer, Explainer):
            explainer.save(directory)
        else:  # MLflow files an artifact directory under its own name: stage it as "explainer"
            shutil.copytree(explainer, directory)
        with mlflow.start_run() as run:
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            if metrics:
                mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()})
            for path in artifacts or []:
                p = Path(path)
                (mlflow.log_artifacts if p.is_dir() else mlflow.log_artifact)(str(p), "reports")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=_pyfunc_class()(),
                artifacts={EXPLAINER_ARTIFACT: str(directory)},
                registered_model_name=registered_name,
                signature=pyfunc_signature(),
                input_example=(input_example(), {"topk": 3}),
                pip_requirements=[pip_requirement()],
            )
    version = str(info.registered_model_version)
    if description:
        from mlflow import MlflowClient

        MlflowClient().update_model_version(registered_name, version, description=description)
    logger.info("registered %s version %s (run %s)", registered_name, version, run.info.run_id)
    return run.info.run_id, version


def metric_key(key: str) -> str:
    """MLflow metric names allow ``[\\w.\\-/ ]``; ``AD@100`` becomes ``AD_at_100``."""
    return key.replace("@", "_at_")


def load_explainer(ref: str | Path, map_location: str = "cpu") -> LoadedExplainer:
    """Load an explainer from a saved directory or a registry URI (``models:/<name>@<alias>``).

    The returned ``model_uri`` names the exact version (``models:/<name>/<version>``) so that rows
    and answers say which version made them even after the alias moves.
    """
    directory, origin = explainer_files(ref)
    return LoadedExplainer(Explainer.load(directory, map_location), **origin)


def explainer_files(ref: str | Path) -> tuple[Path, dict[str, Any]]:
    """The saved explainer directory of ``ref`` on this machine (a registry version downloaded) and
    where it came from: the :class:`LoadedExplainer` fields other than ``explainer``."""
    import json

    text = str(ref)
    if not text.startswith("models:/"):
        path = Path(text)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is neither a saved explainer directory nor a models:/ URI")
        return path, {"model_uri": str(path.resolve())}
    import mlflow
    from mlflow import MlflowClient

    _no_progress_bars_in_logs()
    name, version = resolve_version(text)
    _, _, alias = parse_model_uri(text)
    pinned = f"models:/{name}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned)) / "artifacts" / EXPLAINER_ARTIFACT
    entry = MlflowClient().get_model_version(name, version)
    run_id = entry.run_id
    metrics: dict[str, float] = {}
    if run_id:
        metrics = dict(MlflowClient().get_run(run_id).data.metrics)
    extra = local / "metrics.json"
    if extra.is_file():
        metrics = json.loads(extra.read_text())
    origin = {"model_uri": pinned, "name": name, "version": version, "alias": alias, "metrics": metrics,
              "description": entry.description or None}  # fmt: skip
    return local, origin
