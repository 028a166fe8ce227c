"""The champion rule: same evaluation fingerprint, then all headline measures with their intervals."""

from __future__ import annotations

import pytest

from ptame.champion import decide, register_and_promote

#: the champion's headline values; AD@100 and ROAD-MoRF: lower is better
BASE = {"AD@100": 30.0, "IC@100": 10.0, "ROAD-MoRF": 0.40, "ROAD-LeRF": 0.60, "GridPG": 0.50}
WIDTH = {"AD@100": 4.0, "IC@100": 5.0, "ROAD-MoRF": 0.05, "ROAD-LeRF": 0.05, "GridPG": 0.05}


def scored(values: dict[str, float] | None = None) -> dict[str, float]:
    """Headline values (``BASE`` overridden) with symmetric intervals of ``WIDTH`` around each."""
    out = {**BASE, **(values or {})}
    for measure, width in WIDTH.items():
        out[f"{measure}_lo"], out[f"{measure}_hi"] = out[measure] - width, out[measure] + width
    out["n"] = 32
    return out


BETTER_ALL = scored({"AD@100": 25.0, "IC@100": 15.0, "ROAD-MoRF": 0.35, "ROAD-LeRF": 0.65, "GridPG": 0.55})
MORF_ONLY = scored({"AD@100": 31.0, "IC@100": 9.0, "ROAD-MoRF": 0.30, "ROAD-LeRF": 0.58, "GridPG": 0.48})
GRIDPG_FAR_WORSE = scored({"AD@100": 25.0, "IC@100": 15.0, "ROAD-MoRF": 0.35, "ROAD-LeRF": 0.65, "GridPG": 0.30})


def test_decide_on_hand_made_metrics() -> None:
    champion = scored()
    assert decide(BETTER_ALL, None, "fp", None).reason == "no champion yet"
    # better on ROAD-MoRF only: 1 of 5, no majority
    morf = decide(MORF_ONLY, champion, "fp", "fp")
    assert not morf.promote and "only 1 of 5" in morf.reason
    assert [c.verdict for c in morf.comparisons] == ["worse", "worse", "better", "worse", "worse"]
    # the same version would win if ROAD-MoRF alone decided
    assert decide(MORF_ONLY, champion, "fp", "fp", decide_by="ROAD-MoRF").promote
    # better on four, but GridPG 0.30 with interval [0.25, 0.35] excludes the champion's 0.50: vetoed
    far = decide(GRIDPG_FAR_WORSE, champion, "fp", "fp")
    assert not far.promote and "beyond the bootstrap interval on ['GridPG']" in far.reason
    # worse on GridPG within its interval (0.48 in [0.43, 0.53] holds 0.50): the majority decides
    near_values = {**GRIDPG_FAR_WORSE, "GridPG": 0.48, "GridPG_lo": 0.43, "GridPG_hi": 0.53}
    near = decide(near_values, champion, "fp", "fp")
    assert near.promote and near.comparisons[-1].verdict == "worse"
    # ties count as at least as good; without an interval any worsening vetoes
    assert decide(scored(), champion, "fp", "fp").promote
    bare = {k: v for k, v in near_values.items() if k not in ("GridPG_lo", "GridPG_hi")}
    assert not decide(bare, champion, "fp", "fp").promote
    # other images or settings: not compared at all
    other = decide(BETTER_ALL, champion, "fp", "fp2")
    assert not other.promote and other.reason.startswith("not comparable") and other.comparisons == ()
    assert not decide(BETTER_ALL, champion, None, None).promote
    with pytest.raises(ValueError, match="unknown decision measure"):
        decide(BETTER_ALL, champion, "fp", "fp", decide_by="accuracy")


def test_champion_rule_through_mlflow(tiny_explainer, tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    saved = tiny_explainer.save(tmp_path / "explainer")

    def register(own: dict[str, float], fingerprint: str = "fp") -> dict:
        metrics = {"ptame": own, "gradcam": scored(), "gradcam@rise": {"AD@100": 33.0}}
        return register_and_promote(saved, "tiny", metrics, fingerprint=fingerprint)

    first = register(scored())
    assert (first["version"], first["promoted"], first["decision_reason"]) == ("1", True, "no champion yet")
    moved = register(BETTER_ALL, fingerprint="another-eval-set")
    assert not moved["promoted"] and moved["decision_reason"].startswith("not comparable")
    assert moved["champion_before"] == {"version": "1", "fingerprint": "fp", "values": BASE}
    morf = register(MORF_ONLY)
    assert not morf["promoted"] and "only 1 of 5" in morf["decision_reason"]
    assert {c["measure"]: c["verdict"] for c in morf["comparisons"]}["GridPG"] == "worse"
    far = register(GRIDPG_FAR_WORSE)
    assert not far["promoted"] and "['GridPG']" in far["decision_reason"]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    best = register(BETTER_ALL)
    assert best["promoted"] and best["version"] == "5" and best["values"]["GridPG"] == 0.55
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "5"

    tags = client.get_model_version("tiny", "3").tags
    assert tags["decided_by"] == "headline" and tags["eval_fingerprint"] == "fp"
    assert tags["decision_reason"] == morf["decision_reason"]
    assert client.get_model_version("tiny", "2").tags["eval_fingerprint"] == "another-eval-set"
    run = client.get_run(client.get_model_version("tiny", "5").run_id)
    assert run.data.metrics["GridPG_hi"] == pytest.approx(0.60) and run.data.metrics["gradcam_at_rise.AD_at_100"] == 33.0
    assert run.data.params["eval_fingerprint"] == "fp"
