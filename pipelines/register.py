"""DVC stage ``register``: log the evaluated explainer to MLflow, register it, maybe promote it.

The alias (``champion``) moves to the new version only when it was scored on the same evaluation
images and settings as the champion (the fingerprint in ``reports/evaluation.json``) and wins by
``register.decide_by`` (``headline``: all headline measures; see :mod:`ptame.champion`). The
pinned version, the decision and its reason are written to ``reports/registered.json`` for the
``explain`` stage and for people.
"""

import json
import logging
from pathlib import Path

from _stage import main

logger = logging.getLogger("pipelines.register")

MODEL = "models/explainer"
METRICS = Path("reports/metrics.json")
EVALUATION = Path("reports/evaluation.json")
OUT = Path("reports/registered.json")
ARTIFACTS = [
    "params.yaml", "reports/metrics.json", "reports/evaluation.json", "reports/gallery", "reports/plots",
    "reports/train.json", "reports/prepare.json",
]  # fmt: skip


def run(params) -> None:
    from ptame.champion import register_and_promote

    r = params["register"]
    fingerprint = json.loads(EVALUATION.read_text())["fingerprint"] if EVALUATION.exists() else None
    if fingerprint is None:
        logger.warning("%s is missing: the new version cannot be compared with the champion", EVALUATION)
    record = register_and_promote(
        MODEL, r["name"], json.loads(METRICS.read_text()), params=params.flat(),
        artifacts=[a for a in ARTIFACTS if Path(a).exists()], alias=r["alias"], measure=r["decide_by"],
        tracking_uri=r["tracking_uri"], experiment=r["experiment"], fingerprint=fingerprint,
    )  # fmt: skip
    OUT.write_text(json.dumps(record, indent=2))
    logger.info("version %s %s: %s", record["version"], "promoted" if record["promoted"] else "not promoted", record["decision_reason"])


if __name__ == "__main__":
    main(run)
