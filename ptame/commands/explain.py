"""``ptame explain``: the command line of the bulk-explain job (:func:`ptame.batch.explain_to_parquet`)."""

from __future__ import annotations

import argparse
import re

from ptame.batch import DEFAULT_CHUNK_SIZE, MAPS

__all__ = ["VIEWS", "add_arguments", "main"]

VIEWS = ("crop", "full")  # ptame.data.VIEWS, repeated so that `ptame --help` does not import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ptame explain``, one for each argument of :func:`ptame.batch.explain_to_parquet`."""
    parser.description = (
        "Explain every image of INPUT with a P-TAME explainer into Parquet files under DIR (one row per "
        "image; bad inputs become rows with `error` set). Rerun the same command after a crash to finish "
        "the job: finished chunks are kept, nothing is duplicated. Run it again with a grown or another INPUT "
        "into the same DIR (same model and settings) to explain only the images DIR lacks; rows of inputs "
        "removed since are kept."
    )
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, or a directory saved by Explainer.save")
    parser.add_argument("--input", required=True, help="folder (recursive), glob, .txt list of paths, or Parquet with an image-bytes column; local or s3://, gs://, ...")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (local or URI) for part-*.parquet and the job manifest; an existing one made with the same model and settings gets only the images it lacks")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=None, help="explain actors (default: one per CPU, each decoding its own images with one torch thread; fewer actors get more threads each; with --use-gpu one per GPU, fed by decoding tasks on the CPUs)")
    parser.add_argument("--topk", type=int, default=5, help="top classes recorded per image (default: %(default)s)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per explain actor")
    parser.add_argument("--chunk-size", type=int, default=None, help=f"images per output file and unit of resumption (default: the job's, else {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--max-pixels", type=int, default=None, help="larger images are refused as decompression bombs, an error row (default: the job's, else 64 megapixels)")
    parser.add_argument("--image-column", default="image", help="image-bytes column of a Parquet input (default: %(default)s)")
    parser.add_argument("--id-column", default="image_id", help="id column of a Parquet input; without it ids are <file>#<row> (default: %(default)s)")
    parser.add_argument("--classes", type=_class_option, default=None, metavar="INDEX|COLUMN", help="class the maps explain: an index for every image (-1: the predicted class), or the column of a Parquet input holding each row's class index or label (null or -1: the prediction) (default: the predicted class)")
    parser.add_argument("--view", choices=VIEWS, default="crop", help="what each map covers: 'crop', the centre square the classifier sees (crop_box says where); 'full', the whole image, letterboxed (longer side resized, padded with the mean, the map cut to the image: its shape follows the aspect ratio, crop_box is the whole image). A rerun must keep the job's view (default: %(default)s)")
    parser.add_argument("--maps", choices=MAPS, default="pred", help="pred: the map of the explained class (saliency); topk: also the maps of all --topk classes in topk_saliency, from the same pass (default: %(default)s)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI of a models:/ model (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _class_option(text: str) -> int | str:
    """``--classes``: an integer is a class index (``-1``: the prediction), anything else a column name."""
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def main(args: argparse.Namespace) -> int:
    """Run the job the arguments describe (looked up in :mod:`ptame.batch` at each call)."""
    from ptame import batch

    batch.explain_to_parquet(
        args.model, args.input, args.output,
        batch_size=args.batch_size, concurrency=args.concurrency, topk=args.topk, use_gpu=args.use_gpu,
        chunk_size=args.chunk_size, max_pixels=args.max_pixels, image_column=args.image_column,
        id_column=args.id_column, classes=args.classes, view=args.view, maps=args.maps, address=args.address,
        progress=not args.no_progress,
        tracking_uri=args.tracking_uri,
    )  # fmt: skip
    return 0
