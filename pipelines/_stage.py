"""Shared start-up of the stage scripts: logging, params, the backbone's preprocessing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ptame.params import MissingParamError, Params, check_keys, load_params

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
    """Run a stage: ``run(params)`` with ``params.yaml`` from the working directory (unknown keys refused); clean errors."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(Path("params.yaml"))
        check_keys(params)
        run(params)
    except (MissingParamError, ValueError, FileNotFoundError, LookupError) as e:
        logger.error("%s", e)
        sys.exit(1)
