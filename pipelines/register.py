"""DVC stage ``register``: log the evaluated explainer to MLflow, register it, maybe promote it.

The alias (``champion``) moves to the new version only when it was scored on the same evaluation
images and settings as the champion (the fingerprint in ``reports/evaluation.json``) and wins by
``register.decide_by`` (``headline``: all headline measures; see :mod:`ptame.champion`). The
pinned version, the decision and its reason are written to ``reports/registered.json`` for the
``explain`` stage and for people (a registry under the project recorded by a relative path). The
version's description says what it was trained on and its headline metrics.
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
TRAIN = Path("reports/train.json")
PREPARE = Path("reports/prepare.json")
ARTIFACTS = [
    "params.yaml", "reports/metrics.json", "reports/evaluation.json", "reports/differences.json", "reports/gallery", "reports/plots",
    "reports/train.json", "reports/prepare.json",
]  # fmt: skip


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def describe(params, metrics: dict) -> str:  # noqa: ANN001 - ptame.params.Params
    """What the version was trained on and its headline metrics (next to Grad-CAM's), in one paragraph."""
    from ptame.measures import HEADLINE

    train, prepare, saved = _read(TRAIN), _read(PREPARE), _read(Path(MODEL) / "config.json")
    images = f"{prepare['train']} training images" if "train" in prepare else "its training images"
    text = (
        f"P-TAME explainer of {saved.get('backbone', '?')} (auxiliary: {saved.get('auxiliary', '?')}), trained "
        f"{train.get('steps', '?')} steps on {images} from data source {params['data.source']!r}."
    )
    for method in ("ptame", "gradcam"):
        values = metrics.get(method, {})
        shown = ", ".join(f"{k} {values[k]:.4g}" for k in HEADLINE if k in values)
        if shown:
            text += f" {method} on {values.get('n', '?')} evaluation images: {shown}."
    return text


def run(params) -> None:
    from ptame.champion import register_and_promote
    from ptame.registry import relative_sqlite

    r = params["register"]
    fingerprint = json.loads(EVALUATION.read_text())["fingerprint"] if EVALUATION.exists() else None
    if fingerprint is None:
        logger.warning("%s is missing: the new version cannot be compared with the champion", EVALUATION)
    metrics = json.loads(METRICS.read_text())
    record = register_and_promote(
        MODEL, r["name"], metrics, params=params.flat(), description=describe(params, metrics),
        artifacts=[a for a in ARTIFACTS if Path(a).exists()], alias=r["alias"], measure=r["decide_by"],
        tracking_uri=r["tracking_uri"], experiment=r["experiment"], fingerprint=fingerprint,
    )  # fmt: skip
    record["tracking_uri"] = relative_sqlite(record["tracking_uri"])  # the project can move
    OUT.write_text(json.dumps(record, indent=2))
    logger.info("version %s %s: %s", record["version"], "promoted" if record["promoted"] else "not promoted", record["decision_reason"])


if __name__ == "__main__":
    main(run)
