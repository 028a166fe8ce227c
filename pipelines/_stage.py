"""Shared start-up of the stage scripts: logging, params, the backbone's preprocessing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ptame.params import Params, check_keys, load_params

__all__ = ["main", "preprocessing"]

logger = logging.getLogger("pipelines")


def preprocessing(params: Params):  # -> ptame.models.Preprocessing
    """``model.preprocessing`` merged over the backbone's own (``null`` keeps the backbone's)."""
    from ptame.models import Preprocessing, load_backbone

    overrides = params.get("model.preprocessing")
    own = load_backbone(params["model.backbone"], pretrained=False).preprocessing
    if overrides is None:
        return own
    merged = {**own.to_dict(), **overrides.to_dict()}
    unknown = set(merged) - set(own.to_dict())
    if unknown:
        raise ValueError(f"params.yaml: model.preprocessing has unknown keys {sorted(unknown)}; use input_size, resize, mean, std")
    return Preprocessing.from_dict(merged)


def main(run) -> None:  # noqa: ANN001 - run(params) -> None
    """Run a stage: ``run(params)`` with ``params.yaml`` from the working directory (unknown keys refused); one
    line for a refusal (a traceback for a bug, :func:`ptame.errors.report_failure`), and on Ctrl-C / SIGTERM one
    line and exit code 130 / 143."""
    from ptame.errors import REFUSALS, report_failure
    from ptame.process import exit_code, interrupted_message, stop_on_sigterm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_on_sigterm()  # SIGTERM (dvc killed, a scheduler's stop) ends a stage like Ctrl-C: one line, no traceback
    try:
        params = load_params(Path("params.yaml"))
        check_keys(params)
        run(params)
    except REFUSALS as e:  # one line for a refusal (MissingParamError too); a bug keeps its traceback
        report_failure(logger, e, roots=[Path(__file__).resolve().parent])
        sys.exit(1)
    except KeyboardInterrupt as e:
        logger.warning("%s", interrupted_message(e))
        sys.exit(exit_code(e))
