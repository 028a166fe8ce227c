"""Saliency overlays (a map blended over the region of the original image it covers) and static plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ptame.data import CropBox

__all__ = ["caption", "colorize", "describe", "overlay", "plot_csv", "side_by_side"]


def colorize(saliency: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """``(h, w)`` map in ``[0, 1]`` -> ``(h, w, 3)`` uint8 RGB through a matplotlib colormap."""
    from matplotlib import colormaps

    arr = np.clip(np.asarray(saliency, dtype=np.float32), 0.0, 1.0)
    if arr.ndim != 2:
        raise ValueError(f"saliency must be (h, w), got shape {arr.shape}")
    return (colormaps[cmap](arr)[..., :3] * 255).round().astype(np.uint8)


def overlay(
    image: Image.Image, saliency: np.ndarray, crop_box: CropBox | None = None, alpha: float = 0.5, cmap: str = "jet"
) -> Image.Image:
    """Blend the coloured map over ``image`` inside ``crop_box`` (the whole image when ``None``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    left, top, right, bottom = crop_box or (0, 0, base.size[0], base.size[1])
    region = base.crop((left, top, right, bottom))
    heat = Image.fromarray(colorize(saliency, cmap)).resize(region.size, Image.BILINEAR)
    out = base.copy()
    out.paste(Image.blend(region, heat, alpha), (left, top))
    return out


def describe(label: str, class_index: int, score: float) -> str:
    """What a map shows, in one line: ``"tabby (281) 87.3%"``."""
    return f"{label} ({class_index}) {100 * score:.1f}%"


def caption(image: Image.Image, text: str) -> Image.Image:
    """``image`` with ``text`` in a white strip below it: the strip covers none of the picture."""
    from PIL import ImageDraw, ImageFont

    base = image.convert("RGB")
    size = max(10, min(32, base.size[0] // 16))
    font = ImageFont.load_default(size=size)
    out = Image.new("RGB", (base.size[0], base.size[1] + size + 6), "white")
    out.paste(base, (0, 0))
    ImageDraw.Draw(out).text((3, base.size[1] + 3), text, fill="black", font=font)
    return out


def side_by_side(images: list[Image.Image], height: int = 224, gap: int = 4) -> Image.Image:
    """Panels scaled to the same ``height``, left to right on a white strip."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    scaled = [im.resize((max(1, round(im.size[0] * height / im.size[1])), height), Image.BILINEAR) for im in images]
    strip = Image.new("RGB", (sum(im.size[0] for im in scaled) + gap * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        strip.paste(im, (x, 0))
        x += im.size[0] + gap
    return strip


def plot_csv(
    csv_path: str | Path, png_path: str | Path, x: str, columns: list[str], title: str, xlabel: str = "", ylabel: str = ""
) -> Path:
    """Line plot of ``columns`` against ``x`` from a CSV file, as a PNG: a DVC plot that needs no network.

    Columns missing from the file are skipped; empty cells are gaps.
    """
    import csv

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = [float(r[x]) for r in rows]
    for column in columns:
        if rows and column in rows[0]:
            ax.plot(xs, [float(r[column]) if r[column] not in ("", None) else np.nan for r in rows], label=column)
    ax.set(title=title, xlabel=xlabel or x, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
