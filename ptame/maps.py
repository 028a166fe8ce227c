"""How :meth:`ptame.explainer.Explainer.explain` turns the head's logits into maps (and training, with ``loss.maps: explained``).

One frozen :class:`MapSettings` travels from ``params.yaml`` (``model.<field>``), through
:class:`~ptame.train.TrainConfig` and the DVC ``maps`` stage, into the saved explainer's
``config.json`` (``"maps": {...}``). A new setting is a field here and its use in
``Explainer._map_logits``; ``params.yaml`` and the ``maps`` stage's params pick it up by name.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["MapSettings"]

#: field metadata: the setting reads the backbone's final linear layer over its last tapped map
_READS_CLASSIFIER = {"reads_classifier": True}


@dataclass(frozen=True)
class MapSettings:
    """The explain-time map settings; all ``0`` are the paper's maps.

    Attributes:
        smoothing: std, in map pixels, of a Gaussian blur of the map logits before the sigmoid.
        cam_weight: weight of the backbone's own class activation map of ``log p`` (see
            :meth:`~ptame.explainer.Explainer.class_activation_maps`) added to the head's logits;
            needs the backbone as auxiliary and a final linear layer over its last tapped map.
        activity_weight: weight of the backbone's activity (see
            :meth:`~ptame.explainer.Explainer.activity`) added to the map logits where the map is
            off: among the regions the map leaves out, those where the network sees nothing rank
            below those where it sees something, so ROAD's LeRF removes empty background first.
            Needs what ``cam_weight`` needs.
    """

    smoothing: float = 0.0
    cam_weight: float = field(default=0.0, metadata=_READS_CLASSIFIER)
    activity_weight: float = field(default=0.0, metadata=_READS_CLASSIFIER)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{f.name} must be a number, got {type(value).__name__}")
            if not value >= 0:
                raise ValueError(f"{f.name} must be >= 0 (0: none), got {value}")
            object.__setattr__(self, f.name, float(value))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MapSettings:
        """Rebuild from a mapping of fields (missing ones keep their default); unknown keys are refused by name."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown map settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**values)

    def reading_classifier(self) -> list[str]:
        """The settings in use (non-zero) that read the backbone's classifier: they need it to exist."""
        return [f.name for f in fields(self) if f.metadata.get("reads_classifier") and getattr(self, f.name) > 0]

    def describe(self) -> str:
        """``"smoothing 5, cam_weight 0.5, activity_weight 1"`` for logs."""
        return ", ".join(f"{f.name} {getattr(self, f.name):g}" for f in fields(self))
