"""One Ray Serve replica of the explanation server: a loaded explainer, a request batcher, the answers.

Requests are decoded and answered (JSON, or an overlay PNG) on a thread pool; the forward passes of
concurrent requests are shared through ``@serve.batch`` on one model thread. The HTTP routes are
:func:`ptame.serve_api.create_api`'s. Ray is imported inside functions.
"""

import asyncio
import base64
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from PIL import Image

from ptame.serve_api import RequestError, create_api
from ptame.serve_config import BatchConfig, ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ptame.data import Prepared
    from ptame.registry import LoadedExplainer

__all__ = ["ExplainerServer"]

logger = logging.getLogger("ptame.serve")  # the name the server's log lines have always had


class ExplainerServer:
    """One Serve replica: a loaded explainer, a request batcher and the HTTP API.

    Args:
        config: the application's :class:`ServeConfig`, located (:meth:`ServeConfig.located`): the
            alias is resolved when the replica starts.
        shipped: the explainer as bytes (:func:`ptame.cluster.ship_explainer`), resolved on the driver
            for replicas on nodes without its files; ``config.model`` then only names it.
    """

    def __init__(self, config: ServeConfig, shipped: dict[str, Any] | None = None) -> None:
        from ray import serve

        self.model = config.model
        self.settings = config.settings
        self.loaded: "LoadedExplainer" = _load(config, shipped)
        self.num_classes = int(self.loaded.explainer.backbone.num_classes)
        self._decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="ptame-decode")
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="ptame-explain")
        self._batches = self._images = 0  # forward passes and images of this replica
        batch = config.batch  # Serve then calls reconfigure with the deployment's user_config
        self.explain_batch = serve.batch(
            max_batch_size=batch.max_batch_size, batch_wait_timeout_s=batch.batch_wait_timeout_s
        )(self._explain_batch)
        logger.info("replica serves %s (from %s)", self.loaded.model_uri, config.model)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new :class:`BatchConfig` (Serve calls this on ``user_config`` changes)."""
        batch = BatchConfig(**(user_config or {}))
        self.explain_batch.set_max_batch_size(batch.max_batch_size)
        self.explain_batch.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> "FastAPI":
        """Serve's hook: the ASGI app, built on the replica after ``__init__``."""
        return create_api(self)

    # ------------------------------------------------------------------------------ requests

    async def explain(
        self, body: bytes, topk: int | None = None, fmt: str = "json", target: str | None = None, view: str = "crop"
    ) -> dict[str, Any] | tuple[bytes, dict[str, str]]:
        """Decode, explain (batched with concurrent requests) and answer one image.

        ``target``: the class to explain (an index or a label; default or ``-1``: the prediction); ``view``:
        ``crop`` or ``full`` (the whole image). Answers the JSON dict, or with ``fmt="png"`` the
        overlay PNG and the headers that say what it shows.
        """
        from ptame.data import check_view

        k = min(self.settings.default_topk, self.num_classes) if topk is None else topk
        if not 1 <= k <= self.num_classes:
            raise RequestError(422, f"topk must be in [1, {self.num_classes}] for this model, got {k}")
        try:
            check_view(view)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        chosen = self._resolve_target(target)
        loop = asyncio.get_running_loop()
        image, prepared = await loop.run_in_executor(self._decode_pool, self._decode, body, view)
        if fmt != "png":
            image = None  # only the overlay needs the decoded original: free it while waiting
        row = await self.explain_batch((prepared, k, chosen))
        if image is not None:
            png = await loop.run_in_executor(self._decode_pool, _overlay_png, image, row)
            return png, _png_headers(row)
        return self._answer(row)

    def _resolve_target(self, target: str | None) -> int | None:
        from ptame.classes import resolve_class

        if target is None:
            return None
        try:
            return resolve_class(target, self.loaded.explainer.class_names)
        except ValueError as e:
            raise RequestError(400, str(e)) from None

    def _decode(self, body: bytes, view: str = "crop") -> tuple[Image.Image, "Prepared"]:
        from ptame.data import ImageDecodeError, decode_image, prepare

        try:
            image = decode_image(body, max_pixels=self.settings.max_pixels)
        except ImageDecodeError as e:
            raise RequestError(400, f"unreadable image: {e}") from None
        width, height = image.size
        if max(width, height) > self.settings.max_aspect_ratio * min(width, height):
            raise RequestError(
                400, f"image is {width} x {height}: aspect ratio over the limit of {self.settings.max_aspect_ratio:g}"
            )
        return image, prepare(image, self.loaded.explainer.preprocessing, view)

    async def _explain_batch(self, requests: list[tuple["Prepared", int, int | None]]) -> list[dict[str, Any]]:
        """``@serve.batch`` target: one forward pass for every request waiting in the queue."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_pool, self._explain_rows, requests)

    def _explain_rows(self, requests: list[tuple["Prepared", int, int | None]]) -> list[dict[str, Any]]:
        from ptame.records import explain_prepared

        rows = explain_prepared(
            self.loaded.explainer,
            [p for p, _, _ in requests],
            topk=max(k for _, k, _ in requests),
            classes=[c for _, _, c in requests],
        )
        self._batches, self._images = self._batches + 1, self._images + len(requests)
        for row, (_, k, _) in zip(rows, requests):
            for key in ("topk_classes", "topk_labels", "topk_scores"):
                row[key] = row[key][:k]
        return rows

    def _answer(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["error"] is not None:  # decoding errors never get here; keep the contract anyway
            raise RequestError(400, row["error"])
        return {
            "pred_class": row["pred_class"],
            "pred_label": row["pred_label"],
            "pred_score": row["pred_score"],
            "topk_classes": row["topk_classes"],
            "topk_labels": row["topk_labels"],
            "topk_scores": row["topk_scores"],
            "saliency_class": row["saliency_class"],
            "saliency_label": row["saliency_label"],
            "saliency_score": row["saliency_score"],
            "saliency_png": base64.b64encode(_map_png(row["saliency"], row["saliency_shape"])).decode("ascii"),
            "saliency_shape": row["saliency_shape"],
            "crop_box": row["crop_box"],
            "width": row["width"],
            "height": row["height"],
            "model_uri": self.loaded.model_uri,
        }

    def model_info(self) -> dict[str, Any]:
        """What this replica serves: the registry entry and the explainer's configuration."""
        loaded, explainer = self.loaded, self.loaded.explainer
        return {
            "model": self.model,
            "model_uri": loaded.model_uri,
            "name": loaded.name,
            "version": loaded.version,
            "alias": loaded.alias,
            "description": loaded.description,
            "metrics": loaded.metrics,
            "backbone": explainer.backbone.uri,
            "auxiliary": explainer.auxiliary.uri,
            "num_classes": self.num_classes,
            "input_size": explainer.preprocessing.input_size,
            "limits": asdict(self.settings),
            "replica": {"images": self._images, "forward_passes": self._batches, "torch_threads": _torch_threads()},
        }



def _load(config: ServeConfig, shipped: dict[str, Any] | None) -> "LoadedExplainer":
    """The explainer on ``config.device``: from ``shipped`` bytes, else from its directory or the registry."""
    from ptame.registry import load_explainer

    device = config.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu was set but this replica sees no CUDA device")
    if shipped is not None:
        from ptame.cluster import load_shipped

        return load_shipped(shipped, device)
    config.connect_registry()
    return load_explainer(config.model, map_location=device)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _map_png(saliency: bytes, shape: list[int]) -> bytes:
    """The uint8 map as a greyscale PNG at its native resolution."""
    import numpy as np

    out = io.BytesIO()
    Image.fromarray(np.frombuffer(saliency, np.uint8).reshape(shape), mode="L").save(out, format="PNG")
    return out.getvalue()


def _png_headers(row: dict[str, Any]) -> dict[str, str]:
    """What an overlay PNG shows, as response headers (the label percent-encoded: headers are Latin-1)."""
    from urllib.parse import quote

    return {
        "X-Ptame-Class": str(row["saliency_class"]),
        "X-Ptame-Label": quote(row["saliency_label"], safe=" ,'()-_."),
        "X-Ptame-Score": f"{row['saliency_score']:.6g}",
    }


def _overlay_png(image: Image.Image, row: dict[str, Any]) -> bytes:
    """The map over the region it covers (``crop_box``: the crop, or the whole image), its label and
    score written in a strip below."""
    from ptame.records import dequantize
    from ptame.viz import caption, describe, overlay

    out = io.BytesIO()
    picture = overlay(image, dequantize(row["saliency"], row["saliency_shape"]), tuple(row["crop_box"]))
    text = describe(row["saliency_label"], row["saliency_class"], row["saliency_score"])
    caption(picture, text).save(out, format="PNG", compress_level=3)
    return out.getvalue()
