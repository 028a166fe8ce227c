"""DVC stage ``maps``: the trained head (``models/head``) with the explain-time map settings -> ``models/explainer``.

The fields of :class:`ptame.maps.MapSettings` (``model.smoothing``, ``model.cam_weight``,
``model.activity_weight``) say how maps are made from the trained head. With ``train.loss.maps:
explained`` (the default) the head is trained on those maps, so ``train`` reads them too and a change
retrains; with ``head`` (the paper) this stage alone would need to rerun, but DVC cannot tell the two
apart and retrains either way.
"""

import logging

from _stage import main

logger = logging.getLogger("pipelines.maps")

HEAD = "models/head"
OUT = "models/explainer"


def run(params) -> None:
    from ptame.explainer import Explainer
    from ptame.params import map_settings

    explainer = Explainer.load(HEAD)
    explainer.set_maps(map_settings(params))
    explainer.save(OUT, extra=explainer.saved_extra)
    logger.info("%s: map settings %s", OUT, explainer.maps.describe())


if __name__ == "__main__":
    main(run)
