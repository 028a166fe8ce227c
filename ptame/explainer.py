"""The P-TAME explainer: frozen backbone + frozen auxiliary network + trainable attention head."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptame.head import AttentionHead, minmax_normalize, smooth_maps, upsample_to
from ptame.losses import LossWeights, ptame_loss, share_masks
from ptame.maps import MapSettings
from ptame.models import Classifier, FeaturePyramid, Preprocessing, load_auxiliary, load_backbone, warn_if_random
from ptame.taps import BACKBONE_AUX, BackboneTaps, backbone_taps, classifier_weight

__all__ = ["Explanation", "Explainer", "ExplainerConfig", "ImageExplanation", "check_images"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
#: 2: the map settings under ``"maps"`` (1: flat ``smoothing``/``cam_weight``/``activity_weight`` keys, or none)
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Explanation:
    """Saliency maps and the scores of the classes they explain.

    Attributes:
        saliency: ``(B, k, h, w)`` maps in ``[0, 1]`` at the head's native resolution.
        classes: ``(B, k)`` class indices explained (top-k predictions unless requested).
        scores: ``(B, k)`` backbone softmax probabilities of those classes.
        probs: ``(B, K)`` the backbone's softmax over all classes (top-k lists come from it).
    """

    saliency: Tensor
    classes: Tensor
    scores: Tensor
    probs: Tensor


@dataclass(frozen=True)
class ImageExplanation:
    """The explanation of one image file, from :meth:`Explainer.explain_image`.

    Attributes:
        saliency: ``(h, w)`` float32 map in ``[0, 1]`` at the head's native resolution.
        class_index: the class the map explains; ``label`` its name; ``score`` its probability.
        crop_box: ``(left, top, right, bottom)`` of the original image that the map covers (the
            centre crop, or ``(0, 0, width, height)`` with ``view="full"``).
        size: ``(width, height)`` of the original image (after EXIF rotation).
    """

    saliency: Any  # numpy.ndarray
    class_index: int
    label: str
    score: float
    crop_box: tuple[int, int, int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class ExplainerConfig:
    """Everything besides the head's weights needed to rebuild an explainer."""

    backbone: str
    auxiliary: str
    num_classes: int
    channels: list[int]
    stages: list[int] | None = None
    pretrained: bool = False
    preprocessing: dict[str, Any] = field(default_factory=lambda: Preprocessing().to_dict())
    class_names: list[str] = field(default_factory=list)
    loss: dict[str, float] = field(default_factory=lambda: asdict(LossWeights()))
    maps: MapSettings = field(default_factory=MapSettings)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExplainerConfig:
        """Read a saved ``config.json`` (without ``extra``), older formats included: flat map settings become ``maps``."""
        raw = dict(raw)
        flat = {f.name: raw.pop(f.name) for f in fields(MapSettings) if f.name in raw}  # format 1
        maps = MapSettings.from_dict({**flat, **raw.pop("maps", {})})
        return cls(**raw, maps=maps)


def check_images(images: Tensor, name: str = "images") -> None:
    """Refuse anything but finite ``(B, 3, H, W)`` floating images in ``[0, 1]``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"{name} must be RGB with 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if min(images.shape[-2:]) < 32:
        raise ValueError(f"{name} must be at least 32 x 32 pixels, got {tuple(images.shape[-2:])}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point in [0, 1], got dtype {images.dtype}")
    # one reduction and one host sync (min and max propagate NaN and carry any infinity)
    lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contain NaN or infinite values")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{name} must be in [0, 1] (got range [{lo:.3g}, {hi:.3g}]); pass un-normalised images, "
            "the explainer normalises them for each network"
        )


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, restoring its previous mode even on error."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class Explainer(nn.Module):
    """P-TAME (Ntrougkas et al., 2025): explains ``backbone`` with a head trained on ``auxiliary``.

    All inputs are ``(B, 3, H, W)`` images in ``[0, 1]``; each network normalises them itself.

    Args:
        backbone: the frozen classifier to explain.
        auxiliary: the frozen feature pyramid the head reads: a second network, or the backbone's
            own feature maps (:class:`~ptame.models.BackboneTaps`, one forward pass for both).
        head: the attention head (a fresh one sized from the auxiliary when ``None``).
        loss_weights: loss weights for :meth:`training_step`.
        maps: how :meth:`explain` makes maps from the head's logits (default: the paper's); training
            reads them only with ``loss_weights.maps == "explained"``.
    """

    def __init__(
        self,
        backbone: Classifier,
        auxiliary: FeaturePyramid | BackboneTaps,
        head: AttentionHead | None = None,
        loss_weights: LossWeights | None = None,
        maps: MapSettings | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.auxiliary = auxiliary
        self.head = head if head is not None else AttentionHead(auxiliary.channels, backbone.num_classes)
        if self.head.num_classes != backbone.num_classes:
            raise ValueError(f"head has {self.head.num_classes} classes, backbone {backbone.num_classes}")
        if list(self.head.channels) != list(auxiliary.channels):
            raise ValueError(f"head expects channels {self.head.channels}, auxiliary gives {auxiliary.channels}")
        self.loss_weights = loss_weights or LossWeights()
        self.set_maps(maps or MapSettings())
        self.stages: list[int] | None = None
        self.pretrained = False
        self.saved_extra: dict[str, Any] | None = None

    @classmethod
    def from_uris(
        cls,
        backbone: str,
        auxiliary: str,
        stages: Sequence[int] | None = None,
        pretrained: bool = False,
        loss_weights: LossWeights | None = None,
        class_names: Sequence[str] | None = None,
        preprocessing: Preprocessing | None = None,
        maps: MapSettings | None = None,
    ) -> Explainer:
        """Build an untrained explainer from model URIs (see :mod:`ptame.models`).

        ``auxiliary="backbone"`` taps the backbone's own feature maps instead of a second network.
        """
        warn_if_random(backbone, pretrained)
        bb = load_backbone(backbone, pretrained=pretrained, class_names=class_names, preprocessing=preprocessing)
        if auxiliary == BACKBONE_AUX:
            aux: FeaturePyramid | BackboneTaps = backbone_taps(bb, stages)
        else:
            aux = load_auxiliary(auxiliary, stages=stages, pretrained=pretrained)
        explainer = cls(bb, aux, loss_weights=loss_weights, maps=maps)
        explainer.stages = list(stages) if stages is not None else None
        explainer.pretrained = pretrained
        return explainer

    @property
    def preprocessing(self) -> Preprocessing:
        """The backbone's preprocessing; the auxiliary sees the same pixels."""
        return self.backbone.preprocessing

    @property
    def class_names(self) -> list[str]:
        return self.backbone.class_names

    def train(self, mode: bool = True) -> Explainer:
        """Only the head ever trains; backbone and auxiliary stay frozen in eval mode."""
        self.training = mode
        self.head.train(mode)
        return self

    def logits_and_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The backbone's logits ``(B, K)`` and the head's input features, without gradients.

        One pass when the auxiliary taps the backbone itself, two passes otherwise.
        """
        with torch.no_grad():
            if self.auxiliary.shares_backbone:
                return self.auxiliary.logits_and_features(images)
            return self.backbone(images), self.auxiliary(images)

    def head_logits(self, images: Tensor, classes: Tensor | None = None) -> Tensor:
        """Raw head output for ``classes`` (see :meth:`AttentionHead.forward`), ``(B, n, h, w)``."""
        with torch.no_grad():
            features = self.auxiliary(images)
        return self.head(features, classes)

    def init_head_from_classifier(self, scale: float = 0.2) -> None:
        """Start the head as the backbone's class activation maps (CAM; Zhou et al., CVPR 2016).

        Needs ``auxiliary="backbone"`` whose last tap is the feature map the backbone pools into
        its final linear layer: the fuser rows of that tap become ``scale`` x the classifier's
        weights (zero elsewhere) and the tap's block starts as the identity (BN scale 0), so an
        untrained head already gives ``sigmoid(scale * CAM)``; training then refines it.

        Raises:
            ValueError: the auxiliary is not the backbone, or no final linear layer matches.
        """
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        weight = self._check_cam_source("head init 'cam'", "use head_init 'random'")
        offset = sum(self.head.channels[:-1])
        with torch.no_grad():
            self.head.fuser.weight.zero_()
            self.head.fuser.weight[:, offset:, 0, 0] = scale * weight.to(self.head.fuser.weight)
            self.head.stages[-1].bn.weight.zero_()

    def starting_point(self, cam_scale: float = 0.5) -> Explainer:
        """This explainer before training: a fresh head started as the CAM (``head_init: cam``), the same map settings.

        Shares the backbone and auxiliary (no copy); the evaluation's ``cam`` peer, which tells
        what the training adds.
        """
        head = AttentionHead(self.head.channels, self.head.num_classes)
        start = Explainer(self.backbone, self.auxiliary, head, self.loss_weights, maps=self.maps)
        start.init_head_from_classifier(cam_scale)
        return start.to(next(self.head.parameters()).device)

    def set_maps(self, maps: MapSettings = MapSettings()) -> None:
        """Set the explain-time map settings (default: the paper's); refuses those this backbone cannot make."""
        if not isinstance(maps, MapSettings):
            raise TypeError(f"maps must be a MapSettings, got {type(maps).__name__}")
        for name in maps.reading_classifier():
            self._check_cam_source(name)
        self.maps = maps

    def _check_cam_source(self, what: str, instead: str = "set it to 0") -> Tensor:
        """The backbone's final linear weights ``(K, C)`` over its last tapped map, or a clear error."""
        if not self.auxiliary.shares_backbone:
            raise ValueError(
                f"{what} needs auxiliary 'backbone' (the backbone's own features), not {self.auxiliary.uri!r}; "
                f"{instead} with a separate auxiliary network"
            )
        weight = classifier_weight(self.backbone, self.head.channels[-1])
        if weight is None:
            raise ValueError(
                f"{what}: the backbone has no final linear layer from {self.head.channels[-1]} pooled "
                f"channels (its last tapped map, {self.auxiliary.names[-1]!r}) to {self.backbone.num_classes} "
                f"classes; {instead}"
            )
        return weight

    def class_activation_maps(self, features: Sequence[Tensor], classes: Tensor, probs: Tensor | None = None) -> Tensor:
        """The backbone's class activation maps (Zhou et al., 2016) of ``classes`` ``(B, n)``, ``(B, n, h, w)``.

        Each location's ``W_c . F(x, y)``: its share of the class logit (before pooling and bias),
        negative where it argues against the class. With the softmax ``probs`` ``(B, K)``, its share of
        ``log p_c`` instead (the softmax linearised): ``(W_c - sum_k p_k W_k) . F(x, y)``, the evidence
        for ``c`` over the classes the classifier weighs against it. ``features`` are the auxiliary's
        taps of the backbone, the last one the map its classifier pools.
        """
        weight = self._check_cam_source("class activation maps").float()
        chosen = weight[classes]  # (B, n, C)
        if probs is not None:
            chosen = chosen - (probs.float() @ weight)[:, None]
        return torch.einsum("bchw,bnc->bnhw", features[-1].float(), chosen)

    @staticmethod
    def activity(features: Sequence[Tensor]) -> Tensor:
        """How strongly the last tapped map fires at each location, ``(B, 1, h, w)``: the norm over its
        channels relative to the image's mean norm, minus 1 (negative where the network sees little)."""
        norm = features[-1].float().norm(dim=1, keepdim=True)
        return norm / norm.mean((2, 3), keepdim=True).clamp_min(1e-12) - 1

    def _fill(self, images: Tensor) -> Tensor | None:
        """What removed pixels become in training: ``None`` for black, else a heavy blur of the image."""
        if self.loss_weights.fill != "blur":
            return None
        from torchvision.transforms.v2.functional import gaussian_blur

        sigma = max(images.shape[-2:]) / 32
        k = 2 * math.ceil(3 * sigma) + 1
        return gaussian_blur(images, [k, k], [sigma, sigma])

    def training_step(self, images: Tensor, gather_classes: bool = True) -> dict[str, Tensor]:
        """The P-TAME loss on a batch (no optimiser step); ``loss`` carries gradients to the head.

        The map of each image's predicted class masks the image (kept pixels stay, the rest become
        the fill); with a ``deletion`` weight the complement (the map's region removed) is also
        classified (Dabkowski & Gal, 2017). ``keep_shares`` / ``delete_shares`` make some images'
        masks the map's top share instead (:func:`~ptame.losses.share_masks`).

        Args:
            images: ``(B, 3, H, W)`` in ``[0, 1]``.
            gather_classes: compute the fuser only for the batch's predicted classes (same loss,
                much cheaper than all ``K`` maps).

        Returns:
            ``{"loss", "ce", "area", "tv", "deletion"}`` scalars.
        """
        check_images(images)
        logits, features = self.logits_and_features(images)
        targets = logits.argmax(1)
        rows = torch.arange(images.shape[0], device=images.device)
        w = self.loss_weights
        if gather_classes:
            present, index = torch.unique(targets, return_inverse=True)
        else:
            present, index = torch.arange(logits.shape[1], device=images.device), targets
        if w.maps == "explained":
            chosen = present.expand(images.shape[0], -1)
            maps = torch.sigmoid(self._map_logits(features, chosen, logits.softmax(1)))
            masks = minmax_normalize(maps[rows, index])
        else:
            maps = torch.sigmoid(self.head(features, present if gather_classes else None))  # (B, n, h, w)
            masks = maps[rows, index]
        batch_maps = maps[:, index]
        fill = self._fill(images)

        def upsample(share: Tensor) -> Tensor:
            return F.interpolate(share[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)

        def remove(share: Tensor) -> Tensor:  # black fill needs no extra tensor in the hot path
            return images * (1 - share) if fill is None else images * (1 - share) + fill * share

        keep = share_masks(masks, w.keep_shares, w.share_sharpness)
        kept = upsample(keep)
        masked_logits = self.backbone(remove(1 - kept))
        deleted_logits = None
        if w.deletion > 0:
            delete = share_masks(masks, w.delete_shares, w.share_sharpness)
            deleted_logits = self.backbone(remove(kept if delete is keep else upsample(delete)))
        return ptame_loss(masked_logits, targets, batch_maps, self.loss_weights, deleted_logits)

    def _resolve_classes(self, probs: Tensor, classes: Tensor | Sequence[int] | int | None, topk: int) -> Tensor:
        if classes is None:
            if not 1 <= topk <= probs.shape[1]:
                raise ValueError(f"topk must be in [1, {probs.shape[1]}], got {topk}")
            return probs.topk(topk, dim=1).indices
        cls_t = torch.as_tensor(classes, dtype=torch.long, device=probs.device)
        if cls_t.dim() == 0:
            cls_t = cls_t.view(1, 1).expand(probs.shape[0], 1)
        elif cls_t.dim() == 1:
            cls_t = cls_t.view(-1, 1) if cls_t.numel() == probs.shape[0] else cls_t.view(1, -1).expand(probs.shape[0], -1)
        if cls_t.dim() != 2 or cls_t.shape[0] != probs.shape[0]:
            raise ValueError(f"classes must be an int, (B,) or (B, k); got shape {tuple(cls_t.shape)}")
        lo, hi = torch.stack(torch.aminmax(cls_t)).tolist()  # one host sync
        if lo < -probs.shape[1] or hi >= probs.shape[1]:
            raise ValueError(
                f"classes must be in [0, {probs.shape[1] - 1}] (or -1 to -{probs.shape[1]}: the top predictions), "
                f"got {lo}..{hi}"
            )
        if lo >= 0:
            return cls_t
        ranked = probs.topk(-lo, dim=1).indices  # -j: the j-th predicted class
        return torch.where(cls_t < 0, ranked.gather(1, (-cls_t - 1).clamp(min=0)), cls_t)

    def explain(
        self, images: Tensor, classes: Tensor | Sequence[int] | int | None = None, topk: int = 1
    ) -> Explanation:
        """Saliency maps for the requested ``classes`` (default: the ``topk`` predictions).

        Args:
            images: ``(B, 3, H, W)`` in ``[0, 1]``.
            classes: an int (same class for all), ``(B,)`` one class per image, or ``(B, k)``;
                ``-j`` stands for the image's j-th predicted class (``-1``: the prediction).
            topk: how many top predictions to explain when ``classes`` is ``None``.

        Returns:
            An :class:`Explanation` with ``(B, k, h, w)`` maps: the head's logits plus ``cam_weight``
            x the backbone's class activation maps of ``log p`` (plus ``activity_weight`` x its
            activity where that map is off), blurred (``smoothing``), sigmoid,
            per-map min-max.
        """
        check_images(images)
        with _eval_mode(self.head), torch.inference_mode():
            logits, features = self.logits_and_features(images)
            probs = logits.softmax(1)
            chosen = self._resolve_classes(probs, classes, topk)
            # min-max the *sigmoid* maps: the head was trained on sigmoid maps, and min-max of the raw
            # logits lifts the background (see the learning test's notes)
            saliency = minmax_normalize(torch.sigmoid(self._map_logits(features, chosen, probs)))
            return Explanation(saliency, chosen, probs.gather(1, chosen), probs)

    def _map_logits(self, features: Sequence[Tensor], chosen: Tensor, probs: Tensor) -> Tensor:
        """The explained logits of ``chosen`` ``(B, k)``: the head's, plus the CAM and activity terms, blurred."""
        settings = self.maps
        maps = self.head(features, chosen).float()
        size = tuple(maps.shape[-2:])
        if settings.cam_weight == 0 and settings.activity_weight == 0:
            return smooth_maps(maps, settings.smoothing)
        cam = self.class_activation_maps(features, chosen, probs)
        if settings.cam_weight > 0:  # counter-evidence (negative CAM) ranks below neutral background
            maps = maps + settings.cam_weight * upsample_to(cam, size)
        if settings.activity_weight > 0:  # in units of the CAM's mean magnitude, where the map is off
            activity = self.activity(features) * cam.abs().mean((2, 3), keepdim=True)
            off = 1 - torch.sigmoid(smooth_maps(maps, settings.smoothing))
            maps = maps + settings.activity_weight * upsample_to(activity, size) * off
        return smooth_maps(maps, settings.smoothing)

    def explain_image(
        self, image: str | Path | bytes | Any, class_: int | str | None = None, view: str = "crop"
    ) -> ImageExplanation:
        """Explain one image (a path, encoded bytes or a PIL image) for ``class_`` (index or label; default or -1: the prediction).

        ``view="crop"`` explains the classifier's centre crop; ``view="full"`` the whole image, letterboxed
        (longer side resized, padded with the mean), with a map of the image's aspect ratio. Decodes and
        preprocesses exactly as ``ptame explain`` and ``ptame serve`` do, so the three agree on the same picture.
        """
        from ptame.classes import resolve_class
        from ptame.data import content_map, load_image, prepare

        prepared = prepare(load_image(image), self.preprocessing, view)
        target = None if class_ is None else resolve_class(class_, self.class_names)
        device = next(self.head.parameters()).device
        result = self.explain(prepared.tensor[None].to(device), classes=target)  # type: ignore[index]
        index = int(result.classes[0, 0])
        saliency = content_map(result.saliency[0, 0].float().cpu(), prepared.content, self.preprocessing.input_size)
        return ImageExplanation(
            saliency=saliency.numpy(),
            class_index=index,
            label=self.class_names[index],
            score=float(result.scores[0, 0]),
            crop_box=prepared.crop_box,  # type: ignore[arg-type]
            size=(prepared.width, prepared.height),
        )

    # ------------------------------------------------------------------ persistence

    def config(self) -> ExplainerConfig:
        return ExplainerConfig(
            backbone=self.backbone.uri,
            auxiliary=self.auxiliary.uri,
            num_classes=self.backbone.num_classes,
            channels=list(self.head.channels),
            stages=self.stages,
            pretrained=self.pretrained,
            preprocessing=self.preprocessing.to_dict(),
            class_names=list(self.class_names),
            loss=asdict(self.loss_weights),
            maps=self.maps,
        )

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and the head's weights as safetensors into ``directory``."""
        from safetensors.torch import save_file

        if not self.backbone.uri or not self.auxiliary.uri:
            raise ValueError("only explainers built from model URIs can be saved (use Explainer.from_uris)")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config())
        if extra:
            config["extra"] = extra
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(out / HEAD_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Explainer:
        """Rebuild a saved explainer; only JSON and safetensors are read (nothing is unpickled)."""
        from safetensors.torch import load_file

        src = Path(directory)
        if not (src / CONFIG_FILE).is_file() or not (src / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{src} is not a saved explainer: expected {CONFIG_FILE} and {HEAD_FILE}")
        raw = json.loads((src / CONFIG_FILE).read_text())
        extra = raw.pop("extra", None)
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{src} was saved by a newer ptame (format {raw['format_version']})")
        cfg = ExplainerConfig.from_dict(raw)
        explainer = cls.from_uris(
            cfg.backbone,
            cfg.auxiliary,
            stages=cfg.stages,
            pretrained=cfg.pretrained,
            loss_weights=LossWeights(**cfg.loss),
            class_names=cfg.class_names or None,
            preprocessing=Preprocessing.from_dict(cfg.preprocessing),
            maps=cfg.maps,
        )
        if explainer.head.channels != cfg.channels:
            raise ValueError(f"auxiliary {cfg.auxiliary} now gives channels {explainer.head.channels}, saved {cfg.channels}")
        explainer.head.load_state_dict(load_file(str(src / HEAD_FILE), device=str(map_location)))
        explainer.saved_extra = extra  # what save(extra=...) recorded (e.g. the training run)
        return explainer.to(map_location)
