"""Register an evaluated explainer and move the ``champion`` alias only to a model at least as faithful.

One measure decides (default ``ROAD-MoRF``: the accuracy left after removing the most relevant
pixels first, lower is better; ROAD's authors show it ranks methods consistently). The new
version becomes champion when there is none yet, when the champion has no value for the measure,
or when the new value is at least as good (``<=`` for lower-is-better measures, ``>=`` otherwise).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ptame.evaluate import MEASURES

__all__ = ["at_least_as_good", "register_and_promote"]

logger = logging.getLogger(__name__)

#: extra decision measures besides :data:`ptame.evaluate.MEASURES` (higher is better)
_EXTRA = {"ROAD-gap": True}


def higher_is_better(measure: str) -> bool:
    """Direction of ``measure`` (``ROAD-gap`` = LeRF - MoRF is also accepted)."""
    table = {**MEASURES, **_EXTRA}
    if measure not in table:
        raise ValueError(f"unknown decision measure {measure!r}; choose one of {sorted(table)}")
    return table[measure]


def at_least_as_good(new: float, current: float | None, measure: str) -> bool:
    """Whether ``new`` is at least as faithful as ``current`` by ``measure`` (``None``: no champion)."""
    if current is None:
        return True
    return new >= current if higher_is_better(measure) else new <= current


def _value(metrics: Mapping[str, float], measure: str) -> float:
    if measure == "ROAD-gap":
        return float(metrics["ROAD-LeRF"]) - float(metrics["ROAD-MoRF"])
    if measure not in metrics:
        raise ValueError(f"the decision measure {measure!r} is not in the metrics (have {sorted(metrics)})")
    return float(metrics[measure])


def _mlflow_key(key: str) -> str:
    return key.replace("@", "_at_")


def register_and_promote(
    explainer_dir: str | Path,
    name: str,
    metrics: Mapping[str, Mapping[str, float]],
    params: Mapping[str, Any] | None = None,
    artifacts: Sequence[str | Path] = (),
    alias: str = "champion",
    measure: str = "ROAD-MoRF",
    method: str = "ptame",
    tracking_uri: str | None = None,
    experiment: str = "ptame",
) -> dict[str, Any]:
    """Log the saved explainer with its metrics, register a version, promote it if it is as faithful.

    Args:
        explainer_dir: a directory written by :meth:`Explainer.save`.
        metrics: ``{method: {measure: value}}`` (``reports/metrics.json``); the ``method`` entry is
            the explainer's own and is logged unprefixed, the baselines as ``<method>.<measure>``.
        artifacts: files or folders logged under ``reports/`` (gallery, plots, params).

    Returns:
        What happened: ``name``, ``version``, ``model_uri`` (pinned), ``run_id``, ``alias``,
        ``promoted``, ``decided_by``, ``value``, ``champion_before`` and ``tracking_uri``.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ptame.registry import configure, log_explainer

    if method not in metrics:
        raise ValueError(f"metrics have no entry for {method!r} (have {sorted(metrics)})")
    higher_is_better(measure)
    own = {k: float(v) for k, v in metrics[method].items()}
    value = _value(own, measure)
    uri = configure(tracking_uri, experiment)
    client = MlflowClient()

    before: dict[str, Any] | None = None
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None:
        run_metrics = client.get_run(current.run_id).data.metrics if current.run_id else {}
        key = "ROAD-gap" if measure == "ROAD-gap" else _mlflow_key(measure)
        old = run_metrics.get(key)
        before = {"version": str(current.version), "value": old}
        if old is None:
            logger.warning("champion version %s has no %r metric; the new version replaces it", current.version, key)

    logged = {_mlflow_key(k): v for k, v in own.items()}
    if measure == "ROAD-gap":
        logged["ROAD-gap"] = value
    for other, values in metrics.items():
        if other != method:
            logged.update({f"{other}.{_mlflow_key(k)}": float(v) for k, v in values.items()})
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "explainer"
        shutil.copytree(explainer_dir, bundle)
        (bundle / "metrics.json").write_text(json.dumps(own, indent=2))  # read back by load_explainer
        run_id, version = log_explainer(bundle, name, metrics=logged, params=dict(params or {}), artifacts=list(artifacts))

    promoted = at_least_as_good(value, None if before is None else before["value"], measure)
    client.set_model_version_tag(name, version, "decided_by", measure)
    client.set_model_version_tag(name, version, measure, f"{value:.6g}")
    if promoted:
        client.set_registered_model_alias(name, alias, version)
        logger.info("%s version %s is the new %s (%s = %.4g, before: %s)", name, version, alias, measure, value, before)
    else:
        logger.info(
            "%s version %s registered but %s stays at version %s (%s = %.4g vs %.4g)",
            name, version, alias, before and before["version"], measure, value, before and before["value"],
        )  # fmt: skip
    return {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "champion_uri": f"models:/{name}@{alias}",
        "run_id": run_id,
        "alias": alias,
        "promoted": promoted,
        "decided_by": measure,
        "higher_is_better": higher_is_better(measure),
        "value": value,
        "champion_before": before,
        "tracking_uri": uri,
    }
