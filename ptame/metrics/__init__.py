"""Evaluation measures (means, and per image for bootstraps): AD/IC, ROAD (noisy linear imputation), grid pointing game, mask scores."""

from .adic import average_drop_increase, average_drop_increase_per_image, keep_top_fraction
from .common import upsample_maps
from .pointing import energy_in_mask, grid_pointing_game, pointing_hit
from .road import (
    noisy_linear_impute,
    road,
    road_auc,
    road_auc_per_image,
    road_correct,
    road_curve,
    road_per_image,
    telea_impute,
)

__all__ = [
    "average_drop_increase",
    "average_drop_increase_per_image",
    "energy_in_mask",
    "grid_pointing_game",
    "keep_top_fraction",
    "noisy_linear_impute",
    "pointing_hit",
    "road",
    "road_auc",
    "road_auc_per_image",
    "road_correct",
    "road_curve",
    "road_per_image",
    "telea_impute",
    "upsample_maps",
]
