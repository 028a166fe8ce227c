"""DVC stage ``maps``: the trained head (``models/head``) with the explain-time map settings -> ``models/explainer``.

The fields of :class:`ptame.maps.MapSettings` (``model.smoothing``, ``model.cam_weight``,
``model.activity_weight``) change how maps are made from the trained head, not what the head
learns: this stage applies them in seconds, so changing one re-runs evaluation and what follows,
never training.
"""

import logging

from _stage import main

logger = logging.getLogger("pipelines.maps")

HEAD = "models/head"
OUT = "models/explainer"


def run(params) -> None:
    from dataclasses import fields

    from ptame.explainer import Explainer
    from ptame.maps import MapSettings

    explainer = Explainer.load(HEAD)
    # a setting missing from params.yaml keeps its default (0: the paper's maps)
    explainer.set_maps(MapSettings(**{f.name: float(params.get(f"model.{f.name}", f.default)) for f in fields(MapSettings)}))
    explainer.save(OUT, extra=explainer.saved_extra)
    logger.info("%s: map settings %s", OUT, explainer.maps.describe())


if __name__ == "__main__":
    main(run)
