"""The evaluation's measures by name: which way is better, which decide the champion, which get intervals.

Kept apart from :mod:`ptame.evaluate` so that readers of the numbers (the champion rule, reports)
need no torch.
"""

from __future__ import annotations

__all__ = ["HEADLINE", "INTERVAL_MEASURES", "MEASURES"]

#: measure -> True when higher is better
MEASURES: dict[str, bool] = {
    "AD@100": False,
    "AD@50": False,
    "AD@15": False,
    "IC@100": True,
    "IC@50": True,
    "IC@15": True,
    "ROAD-MoRF": False,
    "ROAD-LeRF": True,
    "ROAD-MoRF@10": False,
    "GridPG": True,
    "sec_per_image": False,
}

#: the measures the champion rule decides on (:mod:`ptame.champion`)
HEADLINE: tuple[str, ...] = ("AD@100", "IC@100", "ROAD-MoRF", "ROAD-LeRF", "GridPG")

#: measures reported with a bootstrap interval (``<measure>_lo``, ``<measure>_hi``)
INTERVAL_MEASURES: tuple[str, ...] = tuple(m for m in MEASURES if m != "sec_per_image")
