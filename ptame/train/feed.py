"""The training data feed: Parquet in, decoded and augmented batches out, one shard per worker.

The driver checks and stamps the data (:func:`data_files`, :func:`inspect_data`; other image sources
are prepared into Parquet once, :func:`training_data`) and builds the Ray Data pipeline
(:func:`training_images`): encoded images are decoded, resized and centre-cropped on CPU in
``map_batches`` (:func:`decode_batch`; undecodable rows are dropped with a logged warning naming
them), then materialised when a worker's share fits in ``cache_gb`` (:func:`fits_cache`). Each worker
reads its shard through :class:`ShardImages`: seeded order, seeded crops and flips (:func:`crop_flip`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ptame.models import Preprocessing
from ptame.train.config import TrainConfig, is_uri, training_preprocessing

__all__ = [
    "ShardImages", "crop_flip", "data_files", "decode_batch", "fits_cache", "inspect_data", "training_data",
    "training_images",
]  # fmt: skip

logger = logging.getLogger(__package__)


def data_files(data: str) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of the Parquet files under ``data``; refuses a missing path."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(data)
    except (pafs.ArrowInvalid, ValueError, TypeError) as e:
        raise ValueError(f"TrainConfig.data: cannot open {data!r}: {e}") from None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"TrainConfig.data: {data!r} does not exist; run the prepare stage or fix the path")
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        (i.path, int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos
        if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
    )
    if not files:
        raise ValueError(f"TrainConfig.data: no Parquet files under {data!r}")
    return files


def training_data(cfg: TrainConfig) -> str:
    """``cfg.data`` as Parquet: Parquet files as they are; images (folder, glob, ``.txt`` list) prepared once.

    Other sources go through :func:`ptame.prepare.prepare_source` (what ``dvc repro``'s prepare stage
    runs, with every image for training) into ``<storage_path>/prepared/<key>``; the key hashes the
    source's files (names, sizes, modification times), so a rerun reuses the shards and resumes.
    """
    from ptame.prepare import prepare_source
    from ptame.sources import PARQUET_SUFFIXES, resolve_source

    data = cfg.data
    if not any(ch in data for ch in "*?[") and not data.endswith(".txt"):
        if all(path.endswith(PARQUET_SUFFIXES) for path, _, _ in data_files(data)):
            return data
    try:
        source = resolve_source(data, image_column=cfg.image_column)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"TrainConfig.data: {e}; fix the path") from None
    if is_uri(cfg.storage_path):
        raise ValueError(
            f"TrainConfig.data {data!r} is not Parquet and storage_path is a URI: prepare the images first with "
            f"ptame.prepare.prepare_source({data!r}, out_dir, eval_fraction=0.0) and pass data=out_dir + '/train'"
        )
    listing = []
    for path in source.paths:
        info = source.filesystem.info(path)
        listing.append((path, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")))
    key = hashlib.sha256(json.dumps([data, source.image_column, listing], default=str).encode()).hexdigest()[:10]
    out = Path(cfg.storage_path) / "prepared" / key
    if (out / "report.json").is_file():
        logger.info("TrainConfig.data %s: reusing its prepared shards in %s", data, out)
    else:
        logger.info("TrainConfig.data %s is not Parquet: preparing it into %s (ptame.prepare.prepare_source)", data, out)
        staging = out.with_name(f".{key}-{os.getpid()}")
        report = prepare_source(data, staging, eval_fraction=0.0)
        (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        os.replace(staging, out)
    return str(out / "train")


def inspect_data(cfg: TrainConfig) -> tuple[int, list[str]]:
    """Row count and columns of the Parquet data, from the file footers (nothing decoded)."""
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(cfg.data, format="parquet")
        names, rows = list(dataset.schema.names), dataset.count_rows()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"TrainConfig.data {cfg.data!r} is not a readable Parquet dataset: {e}") from None
    if cfg.image_column not in names:
        raise ValueError(
            f"TrainConfig.data {cfg.data!r} has no column {cfg.image_column!r} (columns: {names}); "
            "set TrainConfig.image_column"
        )
    return rows, names


def fits_cache(cfg: TrainConfig, rows: int) -> bool:
    """Whether one worker's decoded shard (uint8, ``resize`` x ``resize``) fits in ``cache_gb``."""
    prep = Preprocessing.from_dict(training_preprocessing(cfg))
    side = prep.resize if cfg.augment else prep.input_size
    gib = rows / cfg.num_workers * 3 * side * side / 2**30
    cache = gib <= cfg.cache_gb
    logger.info("training images: %.2f GiB decoded per worker: %s", gib,
                "decoded once and kept in memory" if cache else f"streamed every epoch (over cache_gb={cfg.cache_gb})")
    return cache


def training_images(cfg: TrainConfig, columns: list[str], cache: bool):  # -> ray.data.Dataset
    """The Ray Data pipeline of decoded training images; with ``cache``, materialised before the workers
    start, so decoding never competes with training for the CPUs."""
    import ray.data

    from ptame.cluster import nodes_missing, read_parquet_here

    if nodes_missing(cfg.data):  # only this node has the data: read here, decoded and trained on anywhere
        images = read_parquet_here([path for path, _, _ in data_files(cfg.data)], columns)
    else:
        images = ray.data.read_parquet(cfg.data)
    images = images.select_columns(columns).randomize_block_order(seed=cfg.seed).map_batches(
        decode_batch,
        fn_kwargs={"image_column": cfg.image_column, "prep": training_preprocessing(cfg), "augment": cfg.augment},
        batch_size=64,
        batch_format="numpy",
    )
    return images.materialize() if cache else images


def decode_batch(batch: dict[str, np.ndarray], image_column: str, prep: dict, augment: bool) -> dict[str, np.ndarray]:
    """Encoded images -> ``(n, 3, S, S)`` uint8, decoded once; undecodable rows are dropped and logged.

    ``S`` is ``resize`` when augmenting (shorter side resized, centre square; the worker cuts a
    random ``input_size`` crop and flip per step), else ``input_size`` (resize + centre crop).
    """
    from ptame.data import ImageDecodeError, decode_image, preprocess

    p = Preprocessing.from_dict(prep)
    view = replace(p, input_size=p.resize) if augment else p
    ids = batch.get("image_id")
    out, kept, bad = [], [], []
    for i, data in enumerate(batch[image_column]):
        name = str(ids[i]) if ids is not None else f"row {i}"
        try:
            image = decode_image(bytes(data) if data is not None else b"")
        except ImageDecodeError as e:
            bad.append(f"{name} ({e})")
            continue
        out.append(preprocess(image, view)[0].mul(255).round_().to(torch.uint8).numpy())
        kept.append(name)
    if bad:
        logger.warning("dropped %d undecodable image(s) of %d: %s", len(bad), len(batch[image_column]), "; ".join(bad))
    s = view.input_size
    return {"image": np.stack(out) if out else np.zeros((0, 3, s, s), np.uint8), "image_id": np.array(kept, dtype=object)}


def crop_flip(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """method.md's augmentation on decoded ``(B, 3, R, R)`` uint8: random ``size`` crop and h-flip
    per image, seeded; returns float in ``[0, 1]``."""
    b, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (b,), generator=generator).tolist()
    left = torch.randint(0, w - size + 1, (b,), generator=generator).tolist()
    flip = (torch.rand(b, generator=generator) < 0.5).tolist()
    crops = []
    for x, t, l, f in zip(images, top, left, flip):
        c = x[:, t : t + size, l : l + size]
        crops.append(c.flip(-1) if f else c)
    return torch.stack(crops).to(torch.float32).div_(255.0)


class ShardImages:
    """One worker's training images, batch by batch, in an order fixed by the seed.

    Cached: the shard is read once into memory (sorted by ``image_id``), and each epoch is a seeded
    permutation of it, so a run is repeatable and a resumed epoch continues with the very batches
    it still owed. Streamed: Ray Data decodes the shard again every epoch (local shuffle, seeded).
    """

    def __init__(self, shard, cfg: TrainConfig, rank: int, cache: bool) -> None:
        self.shard, self.cfg, self.rank, self.cache = shard, cfg, rank, cache
        self.size = training_preprocessing(cfg)["input_size"]
        self._images: torch.Tensor | None = None

    def _seed(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.seed, self.rank, *parts)) % 2**63)

    def _load(self) -> torch.Tensor:
        if self._images is None:
            chunks, ids = [], []
            for b in self.shard.iter_batches(batch_size=256, batch_format="numpy"):
                chunks.append(b["image"])  # read-only views of the object store: copied once below
                ids.extend(str(i) for i in b["image_id"])
            order = sorted(range(len(ids)), key=ids.__getitem__)
            self._images = torch.from_numpy(np.concatenate(chunks)[order]) if chunks else torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
            logger.info("worker %d: %d training images decoded once and kept in memory (%.0f MiB)",
                        self.rank, len(ids), self._images.numel() / 2**20)
        return self._images

    def epoch(self, epoch: int, skip: int, steps: int):  # -> Iterator[torch.Tensor]
        """Batches ``skip..steps-1`` of ``epoch`` as float ``(B, 3, S, S)`` in ``[0, 1]`` on the CPU."""
        bs = self.cfg.batch_size
        if self.cache:
            images = self._load()
            order = torch.randperm(images.shape[0], generator=self._seed(epoch))
            for i in range(skip, min(steps, images.shape[0] // bs)):
                yield self._augment(images[order[i * bs : (i + 1) * bs]], epoch, i)
            return
        batches = self.shard.iter_batches(
            batch_size=bs, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=4 * bs,
            local_shuffle_seed=self.cfg.seed + epoch,
        )
        for i, batch in enumerate(batches, start=skip):
            if i >= steps:
                return
            yield self._augment(torch.from_numpy(batch["image"]), epoch, i)

    def _augment(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if not self.cfg.augment:
            return images.to(torch.float32).div_(255.0)
        return crop_flip(images, self.size, self._seed(epoch, step))
