"""DVC stage ``maps``: the trained head (``models/head``) with the explain-time map settings -> ``models/explainer``.

``model.smoothing``, ``model.cam_weight`` and ``model.activity_weight`` change how maps are made
from the trained head, not what the head learns: this stage applies them in seconds, so changing
one re-runs evaluation and what follows, never training.
"""

import logging

from _stage import main

logger = logging.getLogger("pipelines.maps")

HEAD = "models/head"
OUT = "models/explainer"


def run(params) -> None:
    from ptame.explainer import Explainer

    explainer = Explainer.load(HEAD)
    explainer.set_maps(
        smoothing=float(params["model.smoothing"]),
        cam_weight=float(params.get("model.cam_weight", 0.0)),
        activity_weight=float(params.get("model.activity_weight", 0.0)),
    )
    explainer.save(OUT, extra=explainer.saved_extra)
    logger.info("%s: map settings smoothing %g, cam_weight %g, activity_weight %g", OUT,
                explainer.smoothing, explainer.cam_weight, explainer.activity_weight)


if __name__ == "__main__":
    main(run)
