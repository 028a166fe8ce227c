"""``ptame show``: render saliency overlays of an explanations directory on the original images.

The explanations do not store the images; the job manifest records the input that
``ptame explain`` read, so each ``image_id`` is found there again (``--input`` points elsewhere
when the images moved). Each overlay covers the ``crop_box`` of the original image that the map
explains (the centre crop, or the whole image for ``ptame explain --view full``, whose map has the
image's aspect ratio); a strip below the picture names the class the map shows, its label and score.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main", "render_overlays"]

logger = logging.getLogger(__name__)


def _image_bytes(source: Any, wanted: set[str]) -> dict[str, bytes]:
    """Encoded bytes of the ``wanted`` ids of ``source`` (files are opened directly, Parquet scanned)."""
    from ptame.sources import ImageSource, iter_image_bytes

    if source.kind == "files":
        pairs = [(i, p) for i, p in zip(source.ids, source.paths) if i in wanted]
        source = ImageSource("files", [p for _, p in pairs], [i for i, _ in pairs], source.filesystem)
    found: dict[str, bytes] = {}
    for image_id, data, error in iter_image_bytes(source):
        if image_id in wanted and data is not None:
            found[image_id] = data
            if len(found) == len(wanted):
                break
        elif image_id in wanted:
            logger.warning("cannot read %s again: %s", image_id, error)
    return found


def _shown(row: Any) -> tuple[str, int, float]:
    """Label, class and score of the map in ``row`` (outputs older than ``saliency_class`` show the prediction)."""
    import pandas as pd

    if pd.isna(row.saliency_class):
        return row.pred_label, int(row.pred_class), float(row.pred_score)
    return row.saliency_label, int(row.saliency_class), float(row.saliency_score)


def _file_name(index: int, image_id: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id).strip('_')[:120]}.png"


def render_overlays(
    explanations: str,
    out: str | Path,
    limit: int = 16,
    input: str | None = None,  # noqa: A002 - the CLI's name for it
    alpha: float = 0.5,
    max_size: int | None = 1024,
) -> list[Path]:
    """Write PNG overlays of the first ``limit`` explained images of ``explanations`` into ``out``.

    Args:
        explanations: output directory of ``ptame explain``.
        out: directory for the PNG files (created).
        limit: how many explained (non-error) rows to render.
        input: where the original images are (default: the input recorded in the job manifest).
        alpha: opacity of the map over the image.
        max_size: longest side of a written overlay (``None`` keeps the original size).

    Returns:
        The paths written, in ``image_id`` order.
    """
    from ptame.data import decode_image
    from ptame.explanations import read_explanations, read_manifest
    from ptame.sources import resolve_source
    from ptame.viz import caption, describe, overlay

    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    rows = read_explanations(explanations, limit=limit, errors=False)
    manifest = read_manifest(explanations) or {}
    spec = input or manifest.get("input")
    if not spec:
        raise ValueError(f"{explanations!r} has no job manifest naming its input; pass --input with the original images")
    if rows.empty:
        logger.warning("%s holds no explained images (only error rows); nothing to render", explanations)
        return []
    source = resolve_source(
        spec, image_column=manifest.get("image_column", "image"), id_column=manifest.get("id_column", "image_id")
    )
    images = _image_bytes(source, set(rows["image_id"]))
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, row in enumerate(rows.itertuples(index=False)):
        data = images.get(row.image_id)
        if data is None:
            logger.warning("%s is not in %s any more; skipped", row.image_id, spec)
            continue
        image = decode_image(data, **({"max_pixels": manifest["max_pixels"]} if "max_pixels" in manifest else {}))
        if image.size != (row.width, row.height):
            logger.warning("%s is %s now but was %d x %d when explained; skipped", row.image_id, image.size, row.width, row.height)
            continue
        picture = overlay(image, row.saliency, crop_box=tuple(int(v) for v in row.crop_box), alpha=alpha)
        if max_size:
            picture.thumbnail((max_size, max_size))
        picture = caption(picture, describe(*_shown(row)))
        path = directory / _file_name(index, row.image_id)
        picture.save(path)
        written.append(path)
    logger.info("wrote %d overlays to %s", len(written), directory)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Render saliency overlays (PNG) of the explained images in an explanations directory written by "
        "`ptame explain`, on the original images."
    )
    parser.add_argument("--explanations", required=True, metavar="DIR", help="output directory of `ptame explain`")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the overlay PNGs (created)")
    parser.add_argument("--limit", type=int, default=16, help="how many explained images to render (default: %(default)s)")
    parser.add_argument("--input", default=None, help="where the original images are now (default: the input recorded by `ptame explain`)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the map (default: %(default)s)")
    parser.add_argument("--max-size", type=int, default=1024, help="longest side of an overlay in pixels, 0 keeps the original size (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    render_overlays(args.explanations, args.out, limit=args.limit, input=args.input, alpha=args.alpha, max_size=args.max_size or None)
    return 0
