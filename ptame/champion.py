"""Register an evaluated explainer; move the ``champion`` alias only to a comparable, more faithful model.

Comparable first: the new version is compared with the current champion only when both were scored
on the same evaluation images and settings, i.e. their evaluation fingerprints
(:func:`ptame.evaluate.fingerprint`, stored as the version tag ``eval_fingerprint``) are equal.
Otherwise the alias stays where it is and the reason says why (move it by hand with
``MlflowClient().set_registered_model_alias`` when a new evaluation set should take over).

Then, with ``decide_by: headline`` (the default), all headline measures decide together
(:data:`ptame.measures.HEADLINE`: AD@100, IC@100, ROAD-MoRF, ROAD-LeRF, GridPG; those the new
metrics have). The new version is promoted when both hold:

1. it is at least as good as the champion (``<=`` for lower-is-better, ``>=`` otherwise) on a
   strict majority of them (3 of 5), and
2. it is not worse *beyond its bootstrap interval* on any of them: the champion's value lies
   outside the new version's 95 % interval (``<measure>_lo`` / ``_hi``) on the better side. A
   measure without an interval counts as beyond it whenever it is worse.

So one measure alone cannot decide (a barely trained head once won on ROAD-MoRF while clearly
worse on GridPG). ``decide_by: <measure>`` (e.g. ``ROAD-MoRF``, or ``ROAD-gap`` = LeRF - MoRF)
keeps the single-measure rule: promoted when at least as good on that measure. With no champion
yet, the new version becomes champion. Each decision's reason is logged, set as the version tag
``decision_reason`` and returned.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ptame.measures import HEADLINE, MEASURES

__all__ = [
    "HEADLINE_RULE",
    "Comparison",
    "Decision",
    "at_least_as_good",
    "decide",
    "higher_is_better",
    "register_and_promote",
]

logger = logging.getLogger(__name__)

#: ``decide_by`` value of the all-headline-measures rule
HEADLINE_RULE = "headline"

#: extra decision measures besides :data:`ptame.measures.MEASURES` (higher is better)
_EXTRA = {"ROAD-gap": True}


@dataclass(frozen=True)
class Comparison:
    """One headline measure: new and champion values, the new value's interval and the verdict.

    ``verdict`` is ``better``, ``equal``, ``worse`` (within the new version's interval) or
    ``worse_beyond_interval``.
    """

    measure: str
    new: float
    champion: float
    lo: float | None
    hi: float | None
    verdict: str


@dataclass(frozen=True)
class Decision:
    """Whether to move the alias, and why (``comparisons`` empty unless the headline rule compared)."""

    promote: bool
    reason: str
    comparisons: tuple[Comparison, ...] = ()


def higher_is_better(measure: str) -> bool:
    """Direction of ``measure`` (``ROAD-gap`` = LeRF - MoRF is also accepted)."""
    table = {**MEASURES, **_EXTRA}
    if measure not in table:
        raise ValueError(f"unknown decision measure {measure!r}; choose {HEADLINE_RULE!r} or one of {sorted(table)}")
    return table[measure]


def at_least_as_good(new: float, current: float | None, measure: str) -> bool:
    """Whether ``new`` is at least as faithful as ``current`` by ``measure`` (``None``: no champion)."""
    if current is None:
        return True
    return new >= current if higher_is_better(measure) else new <= current


def _value(metrics: Mapping[str, float], measure: str) -> float | None:
    """``metrics[measure]`` (``ROAD-gap`` derived), ``None`` when absent."""
    if measure == "ROAD-gap":
        if "ROAD-LeRF" not in metrics or "ROAD-MoRF" not in metrics:
            return None
        return float(metrics["ROAD-LeRF"]) - float(metrics["ROAD-MoRF"])
    return float(metrics[measure]) if measure in metrics else None


def _compare(measure: str, new: Mapping[str, float], champion: Mapping[str, float]) -> Comparison:
    up = higher_is_better(measure)
    a, b = float(new[measure]), float(champion[measure])
    lo, hi = new.get(f"{measure}_lo"), new.get(f"{measure}_hi")
    if a == b:
        verdict = "equal"
    elif (a > b) == up:
        verdict = "better"
    else:
        bound = hi if up else lo
        beyond = bound is None or (b > float(bound) if up else b < float(bound))
        verdict = "worse_beyond_interval" if beyond else "worse"
    return Comparison(measure, a, b, None if lo is None else float(lo), None if hi is None else float(hi), verdict)


def decide(
    new: Mapping[str, float],
    champion: Mapping[str, float] | None,
    new_fingerprint: str | None,
    champion_fingerprint: str | None,
    decide_by: str = HEADLINE_RULE,
) -> Decision:
    """The champion rule of the module docstring on plain metric dicts (``champion`` ``None``: none yet).

    Args:
        new: the new version's metrics, ``{measure: value}`` with ``<measure>_lo`` / ``_hi`` bounds.
        champion: the champion's metrics in the same keys, or ``None`` when there is no champion.
        new_fingerprint, champion_fingerprint: evaluation fingerprints (``None``: unknown).
        decide_by: ``"headline"`` or one measure name.
    """
    if decide_by != HEADLINE_RULE:
        higher_is_better(decide_by)
        if _value(new, decide_by) is None:
            raise ValueError(f"decide_by measure {decide_by!r} is not in the new metrics (have {sorted(new)})")
    if champion is None:
        return Decision(True, "no champion yet")
    if new_fingerprint is None or new_fingerprint != champion_fingerprint:
        return Decision(
            False,
            f"not comparable: evaluation fingerprint {str(new_fingerprint)[:12]} differs from the champion's "
            f"{str(champion_fingerprint)[:12]} (other images or settings); the alias stays",
        )
    if decide_by != HEADLINE_RULE:
        value, old = _value(new, decide_by), _value(champion, decide_by)
        if old is None:
            return Decision(True, f"the champion has no {decide_by}; the new version replaces it")
        ok = at_least_as_good(value, old, decide_by)  # type: ignore[arg-type]
        relation = "at least as good as" if ok else "worse than"
        return Decision(ok, f"{decide_by} {value:.4g} is {relation} the champion's {old:.4g}")
    measures = [m for m in HEADLINE if m in new]
    if not measures:
        raise ValueError(f"the new metrics have none of the headline measures {list(HEADLINE)} (have {sorted(new)})")
    missing = [m for m in measures if m not in champion]
    if missing:
        return Decision(False, f"not comparable: the champion has no {missing}; the alias stays")
    comparisons = tuple(_compare(m, new, champion) for m in measures)
    good = [c.measure for c in comparisons if c.verdict in ("better", "equal")]
    beyond = [c.measure for c in comparisons if c.verdict == "worse_beyond_interval"]
    majority = len(good) * 2 > len(measures)
    promote = majority and not beyond
    detail = "; ".join(f"{c.measure} {c.new:.4g} vs {c.champion:.4g} {c.verdict}" for c in comparisons)
    if promote:
        head = f"at least as good on {len(good)} of {len(measures)} headline measures, none worse beyond its interval"
    elif not majority:
        head = f"at least as good on only {len(good)} of {len(measures)} headline measures (needs a majority)"
    else:
        head = f"worse beyond the bootstrap interval on {beyond}"
    return Decision(promote, f"{head}: {detail}", comparisons)


def register_and_promote(
    explainer_dir: str | Path,
    name: str,
    metrics: Mapping[str, Mapping[str, float]],
    params: Mapping[str, Any] | None = None,
    artifacts: Sequence[str | Path] = (),
    alias: str = "champion",
    measure: str = HEADLINE_RULE,
    method: str = "ptame",
    tracking_uri: str | None = None,
    experiment: str = "ptame",
    fingerprint: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Log the saved explainer with its metrics, register a version, promote it by the champion rule.

    Args:
        explainer_dir: a directory written by :meth:`Explainer.save`.
        metrics: ``{method: {measure: value}}`` (``reports/metrics.json``); the ``method`` entry is
            the explainer's own and is logged unprefixed, the others as ``<method>.<measure>``.
        artifacts: files or folders logged under ``reports/`` (gallery, plots, params).
        measure: ``"headline"`` (all headline measures) or one measure (``register.decide_by``).
        fingerprint: the evaluation fingerprint (``reports/evaluation.json``), set as the version
            tag ``eval_fingerprint``; ``None`` makes the new version incomparable to a champion.
        description: the version's description in the registry (what it was trained on, its metrics).

    Returns:
        What happened: ``name``, ``version``, ``model_uri`` (pinned), ``run_id``, ``alias``,
        ``promoted``, ``decided_by``, ``decision_reason``, ``comparisons``, ``value`` (the
        ``decide_by`` measure's, ``None`` for the headline rule), ``values`` (headline measures),
        ``fingerprint``, ``champion_before`` and ``tracking_uri``.
    """
    from mlflow import MlflowClient

    from ptame.registry import configure

    own, value = _own_metrics(metrics, method, measure)
    uri = configure(tracking_uri, experiment)
    client = MlflowClient()
    before, champion = _current_champion(client, name, alias, measure)
    decision = decide(own, champion, fingerprint, before and before["fingerprint"], measure)
    run_params = {**dict(params or {}), **({"eval_fingerprint": fingerprint} if fingerprint else {})}
    run_id, version = _log_version(
        explainer_dir, name, own, _logged_metrics(metrics, method, own, measure, value), run_params, artifacts, description
    )
    _tag_version(client, name, version, measure, value, fingerprint, decision)
    _move_alias(client, name, version, alias, decision, before)
    return {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "champion_uri": f"models:/{name}@{alias}",
        "run_id": run_id,
        "alias": alias,
        "promoted": decision.promote,
        "decided_by": measure,
        "decision_reason": decision.reason,
        "comparisons": [asdict(c) for c in decision.comparisons],
        "higher_is_better": None if measure == HEADLINE_RULE else higher_is_better(measure),
        "value": value,
        "values": {k: own[k] for k in HEADLINE if k in own},
        "fingerprint": fingerprint,
        "champion_before": before,
        "tracking_uri": uri,
    }


def _own_metrics(
    metrics: Mapping[str, Mapping[str, float]], method: str, measure: str
) -> tuple[dict[str, float], float | None]:
    """The explainer's own metrics and its ``measure`` value (``None`` for the headline rule); refuses
    metrics that cannot decide."""
    if method not in metrics:
        raise ValueError(f"metrics have no entry for {method!r} (have {sorted(metrics)})")
    if measure != HEADLINE_RULE:
        higher_is_better(measure)
    own = {k: float(v) for k, v in metrics[method].items()}
    value = None if measure == HEADLINE_RULE else _value(own, measure)
    if measure != HEADLINE_RULE and value is None:
        raise ValueError(f"the decision measure {measure!r} is not in the metrics (have {sorted(own)})")
    return own, value


def _current_champion(
    client: Any, name: str, alias: str, measure: str
) -> tuple[dict[str, Any] | None, dict[str, float] | None]:
    """What ``alias`` points to now (``champion_before`` of the record) and its decision metrics;
    ``(None, None)`` when no version holds it."""
    from mlflow.exceptions import MlflowException

    from ptame.registry import metric_key

    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, None
    run_metrics = client.get_run(current.run_id).data.metrics if current.run_id else {}
    keys = [*HEADLINE, "ROAD-gap"] if measure == HEADLINE_RULE else [measure, "ROAD-LeRF", "ROAD-MoRF"]
    champion = {k: float(run_metrics[metric_key(k)]) for k in keys if metric_key(k) in run_metrics}
    before = {
        "version": str(current.version),
        "fingerprint": current.tags.get("eval_fingerprint"),
        **({"values": {k: champion[k] for k in HEADLINE if k in champion}} if measure == HEADLINE_RULE else {"value": _value(champion, measure)}),
    }
    return before, champion


def _logged_metrics(
    metrics: Mapping[str, Mapping[str, float]], method: str, own: Mapping[str, float], measure: str, value: float | None
) -> dict[str, float]:
    """The run's metrics: the explainer's own unprefixed (and a derived ``ROAD-gap``), the others' as
    ``<method>.<measure>``."""
    from ptame.registry import metric_key

    logged = {metric_key(k): v for k, v in own.items()}
    if measure == "ROAD-gap":
        logged["ROAD-gap"] = value  # type: ignore[assignment]
    for other, values in metrics.items():
        if other != method:
            logged.update({f"{other}.{metric_key(k)}": float(v) for k, v in values.items()})
    return logged


def _log_version(
    explainer_dir: str | Path,
    name: str,
    own: Mapping[str, float],
    logged: dict[str, float],
    params: dict[str, Any],
    artifacts: Sequence[str | Path],
    description: str | None,
) -> tuple[str, str]:
    """Log a copy of the saved explainer with its own metrics beside it as a new version of ``name``;
    returns ``(run_id, version)``."""
    from ptame.registry import log_explainer

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "explainer"
        shutil.copytree(explainer_dir, bundle)
        (bundle / "metrics.json").write_text(json.dumps(own, indent=2))  # read back by load_explainer
        return log_explainer(
            bundle, name, metrics=logged, params=params, artifacts=list(artifacts), description=description
        )


def _tag_version(
    client: Any, name: str, version: str, measure: str, value: float | None, fingerprint: str | None, decision: Decision
) -> None:
    """Tag the version with the rule, the decision's reason, the fingerprint and the ``measure`` value."""
    client.set_model_version_tag(name, version, "decided_by", measure)
    client.set_model_version_tag(name, version, "decision_reason", decision.reason[:5000])
    if fingerprint is not None:
        client.set_model_version_tag(name, version, "eval_fingerprint", fingerprint)
    if value is not None:
        client.set_model_version_tag(name, version, measure, f"{value:.6g}")


def _move_alias(
    client: Any, name: str, version: str, alias: str, decision: Decision, before: dict[str, Any] | None
) -> None:
    """Point ``alias`` at ``version`` when the decision promotes it; log either way."""
    if decision.promote:
        client.set_registered_model_alias(name, alias, version)
        logger.info("%s version %s is the new %s: %s", name, version, alias, decision.reason)
    else:
        logger.info("%s version %s registered; %s stays at version %s: %s", name, version, alias, before and before["version"], decision.reason)
