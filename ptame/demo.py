"""The embedded default data set: real photographs shipped inside scikit-image and scikit-learn.

Nothing is downloaded. Training images are random square crops of the photos and 2 x 2 grid
composites of four crops; evaluation images are 2 x 2 grids built from another seed whose four
cells each hold a photo that the backbone, looking at that cell alone, predicts confidently and
with a class different from the other three cells. Those cell classes are the ground truth of the
grid pointing game (Rao et al., CVPR 2022). Single evaluation photos (no grid) come from the same
evaluation seed and are made unlike the training crops: other scales, aspect ratios and sizes,
mirrored half of the time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ptame.data import preprocess
from ptame.models import Classifier

__all__ = ["PHOTOS", "GridCell", "EvalGrid", "cell_candidates", "eval_grids", "grid", "load_photos", "random_crop", "single_photos", "train_images", "write_sample_jpegs"]

logger = logging.getLogger(__name__)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, name)()
        return out[0] if isinstance(out, tuple) else out  # stereo_motorcycle -> (left, right, disparity)

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


#: photo name -> loader of an ``(H, W[, C])`` uint8 array; all ship inside the installed wheels
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "camera": _skimage("camera"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "coins": _skimage("coins"),
    "clock": _skimage("clock"),
    "brick": _skimage("brick"),
    "china": _sklearn("china"),
    "flower": _sklearn("flower"),
}


def load_photos(names: Sequence[str] | None = None) -> dict[str, Image.Image]:
    """The photos in ``names`` (default: all of :data:`PHOTOS`) as RGB images.

    A photo that cannot be loaded offline (some scikit-image data need a download) is skipped
    with a warning; it is an error only when none at all load.
    """
    chosen = list(PHOTOS) if names is None else list(names)
    unknown = [n for n in chosen if n not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown demo photos {unknown}; choose from {sorted(PHOTOS)}")
    photos: dict[str, Image.Image] = {}
    for name in chosen:
        try:
            arr = np.asarray(PHOTOS[name]())
        except Exception as e:  # noqa: BLE001 - e.g. pooch missing or no network: report and go on
            logger.warning("demo photo %r is not available offline, skipped (%s: %s)", name, type(e).__name__, e)
            continue
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0, 1) * 255 if arr.max() <= 1 else arr).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        photos[name] = Image.fromarray(arr[..., :3])
    if not photos:
        raise RuntimeError("no demo photo could be loaded; check the scikit-image and scikit-learn installs")
    return photos


def random_crop(photo: Image.Image, rng: np.random.Generator, size: int, min_scale: float = 0.35) -> Image.Image:
    """A random square crop of side ``s * min(w, h)``, ``s`` uniform in ``[min_scale, 1]``, resized to ``size``."""
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    w, h = photo.size
    side = max(1, round(rng.uniform(min_scale, 1.0) * min(w, h)))
    left = int(rng.integers(0, w - side + 1))
    top = int(rng.integers(0, h - side + 1))
    return photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def grid(cells: Sequence[Image.Image], size: int) -> Image.Image:
    """Tile four images row-major (top-left, top-right, bottom-left, bottom-right) into ``size x size``."""
    if len(cells) != 4:
        raise ValueError(f"a 2 x 2 grid needs 4 cells, got {len(cells)}")
    half = size // 2
    canvas = Image.new("RGB", (2 * half, 2 * half))
    for i, cell in enumerate(cells):
        canvas.paste(cell.resize((half, half), Image.BICUBIC), ((i % 2) * half, (i // 2) * half))
    return canvas


def train_images(
    photos: dict[str, Image.Image], n: int, seed: int, grid_fraction: float = 0.5, size: int = 320
) -> Iterator[tuple[str, Image.Image, list[str]]]:
    """``n`` training images: single crops and (share ``grid_fraction``) 2 x 2 grids of crops.

    Yields:
        ``(image_id, image, source photo names)``; ids encode the seed so sets never collide.
    """
    if not 0.0 <= grid_fraction <= 1.0:
        raise ValueError(f"grid_fraction must be in [0, 1], got {grid_fraction}")
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if rng.random() < grid_fraction and len(names) >= 4:
            picked = [names[j] for j in rng.choice(len(names), 4, replace=False)]
            cells = [random_crop(photos[p], rng, size // 2, min_scale=0.5) for p in picked]
            yield f"train-s{seed}-{i:05d}-grid", grid(cells, size), picked
        else:
            name = names[int(rng.integers(len(names)))]
            yield f"train-s{seed}-{i:05d}-crop", random_crop(photos[name], rng, size), [name]


@dataclass(frozen=True)
class GridCell:
    """A crop that the backbone, seeing it alone, predicts as ``label`` with probability ``score``."""

    photo: str
    image: Image.Image
    label: int
    score: float


@dataclass(frozen=True)
class EvalGrid:
    """An evaluation composite and the class of each of its four cells (row-major)."""

    image_id: str
    image: Image.Image
    grid_classes: list[int]
    photos: list[str]


def _predict(backbone: Classifier, images: Sequence[Image.Image], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([preprocess(im, backbone.preprocessing)[0] for im in images[start : start + batch_size]])
            probs = backbone(batch).softmax(1)
            s, c = probs.max(1)
            labels.append(c.numpy())
            scores.append(s.float().numpy())
    return np.concatenate(labels), np.concatenate(scores)


def cell_candidates(
    photos: dict[str, Image.Image],
    backbone: Classifier,
    rng: np.random.Generator,
    per_photo: int = 6,
    cell_size: int = 160,
    min_score: float = 0.2,
) -> list[GridCell]:
    """Random crops of each photo that the backbone classifies with probability >= ``min_score``.

    Each crop is judged at the size it will have in the grid, alone, by the backbone's own
    preprocessing; crops below ``min_score`` are dropped.
    """
    crops: list[tuple[str, Image.Image]] = []
    for name in sorted(photos):
        for _ in range(per_photo):
            crops.append((name, random_crop(photos[name], rng, cell_size, min_scale=0.6)))
    labels, scores = _predict(backbone, [c for _, c in crops])
    kept = [GridCell(n, im, int(c), float(s)) for (n, im), c, s in zip(crops, labels, scores) if s >= min_score]
    logger.info("%d of %d candidate cells predicted with probability >= %.2f", len(kept), len(crops), min_score)
    return kept


def eval_grids(
    photos: dict[str, Image.Image],
    backbone: Classifier,
    n: int,
    seed: int,
    size: int = 320,
    min_score: float = 0.2,
    per_photo: int = 6,
) -> list[EvalGrid]:
    """``n`` 2 x 2 composites whose four cells come from four photos with four different classes.

    Raises:
        ValueError: fewer than four distinct confidently predicted classes exist (lower
            ``min_score`` or add photos).
    """
    rng = np.random.default_rng(seed)
    pool = cell_candidates(photos, backbone, rng, per_photo, size // 2, min_score)
    by_label: dict[int, list[GridCell]] = {}
    for cell in pool:
        by_label.setdefault(cell.label, []).append(cell)
    labels = sorted(by_label)
    if len(labels) < 4:
        raise ValueError(
            f"only {len(labels)} classes are predicted with probability >= {min_score} on the photos; "
            "a 2 x 2 pointing game needs 4: lower min_score"
        )
    out = []
    for i in range(n):
        for _ in range(100):  # pick four classes whose chosen cells also come from four photos
            chosen = [by_label[labels[j]] for j in rng.choice(len(labels), 4, replace=False)]
            cells = [group[int(rng.integers(len(group)))] for group in chosen]
            if len({c.photo for c in cells}) == 4:
                break
        else:
            raise ValueError("cannot find four cells from four different photos; add photos or lower min_score")
        out.append(
            EvalGrid(f"eval-s{seed}-{i:05d}-grid", grid([c.image for c in cells], size), [c.label for c in cells], [c.photo for c in cells])
        )
    return out


def _single_candidate(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 30-100 % of the photo's shorter side, aspect 3:4 to 4:3, 224-448 px, mirrored half the time."""
    w, h = photo.size
    side = rng.uniform(0.3, 1.0) * min(w, h)
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
    cw, ch = min(w, round(side * aspect**0.5)), min(h, round(side / aspect**0.5))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.uniform(224, 448) / max(cw, ch)
    return crop.resize((max(32, round(cw * scale)), max(32, round(ch * scale))), Image.BICUBIC)


def single_photos(
    photos: dict[str, Image.Image], backbone: Classifier, n: int, seed: int, min_score: float = 0.2, per_photo: int = 24
) -> list[tuple[str, Image.Image, str]]:
    """``n`` single photos (no grid) the backbone predicts with probability >= ``min_score``, photos taking turns.

    Candidates are :func:`_single_candidate` crops drawn from ``seed`` (``per_photo`` of each photo);
    the kept ones are spread over the photos round-robin, so no one photo dominates.

    Returns:
        ``(image_id, image, photo name)`` triples; fewer than ``n`` only when too few candidates qualify.
    """
    rng = np.random.default_rng([seed, 2])
    names = sorted(photos)
    candidates = [(name, _single_candidate(photos[name], rng)) for name in names for _ in range(per_photo)]
    _, scores = _predict(backbone, [im for _, im in candidates])
    kept: dict[str, list[Image.Image]] = {}
    for (name, image), score in zip(candidates, scores):
        if score >= min_score:
            kept.setdefault(name, []).append(image)
    out: list[tuple[str, Image.Image, str]] = []
    for turn in range(per_photo):
        for name in names:
            if len(out) < n and turn < len(kept.get(name, [])):
                out.append((f"single-s{seed}-{len(out):05d}-{name}", kept[name][turn], name))
    logger.info("%d single evaluation photos from %d photos (%d candidates predicted with p >= %.2f)",
                len(out), len(kept), sum(map(len, kept.values())), min_score)  # fmt: skip
    return out


def write_sample_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of random 300-640 px crops of the photos (every third one non-square), for benchmarks."""
    photos = load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        crop = random_crop(photos[names[i % len(names)]], rng, int(rng.integers(300, 641)))
        if i % 3 == 0:
            crop = crop.resize((crop.size[0], int(crop.size[1] * rng.uniform(0.6, 0.9))))
        path = folder / f"img{i:05d}.jpg"
        crop.save(path, quality=90)
        paths.append(path)
    return paths
