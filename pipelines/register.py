"""DVC stage ``register``: log the evaluated explainer to MLflow, register it, maybe promote it.

The alias (``champion``) moves to the new version only if it is at least as faithful as the
current champion by ``register.decide_by`` (see :mod:`ptame.champion`). The pinned version is
written to ``reports/registered.json`` for the ``explain`` stage.
"""

import json
from pathlib import Path

from _stage import main

MODEL = "models/explainer"
METRICS = Path("reports/metrics.json")
OUT = Path("reports/registered.json")
ARTIFACTS = ["params.yaml", "reports/metrics.json", "reports/gallery", "reports/plots", "reports/train.json", "reports/prepare.json"]


def run(params) -> None:
    from ptame.champion import register_and_promote

    r = params["register"]
    record = register_and_promote(
        MODEL, r["name"], json.loads(METRICS.read_text()), params=params.flat(),
        artifacts=[a for a in ARTIFACTS if Path(a).exists()], alias=r["alias"], measure=r["decide_by"],
        tracking_uri=r["tracking_uri"], experiment=r["experiment"],
    )  # fmt: skip
    OUT.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main(run)
