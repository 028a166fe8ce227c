"""Serve a registered explainer over HTTP with Ray Serve: FastAPI ingress, dynamic batching.

``ptame serve --model models:/<name>@<alias>`` resolves the alias, starts (or joins) a Ray
cluster and runs one Serve application:

- ``POST /explain``: an image as the raw body (``Content-Type: image/*``) or as the multipart
  field ``file``; answers the prediction and the saliency map of the predicted class, or of
  ``?class=`` (an index or a label); ``?topk=``, ``?view=full`` for a map of the whole image
  (letterboxed) instead of the classifier's centre crop, ``?format=png`` for an overlay PNG instead
  of JSON, whose ``X-Ptame-Class``, ``X-Ptame-Label`` and ``X-Ptame-Score`` headers say what it shows;
- ``GET /healthz``, ``GET /model`` (name, version, alias, metrics), OpenAPI at ``/docs``.

Concurrent requests share forward passes through ``@serve.batch``. Requests never choose a model
or a path: only the operator's ``--model`` (or the ``model`` of a Serve config file) does. Bad
input is answered 400 / 413 / 422 with ``{"error": ...}``; overload is answered 503 by Serve's
bounded queue (``max_queued_requests``).

Switching versions: move the alias, then run ``ptame serve --model ...`` again against the same
Ray cluster, or send ``SIGHUP`` to the running ``ptame serve``. Either redeploys the application:
Serve starts replicas that resolve the alias anew and stops the old ones only once the new ones
answer (``max_surge_percent=100``), letting in-flight requests finish.

Ray, Serve and FastAPI are imported inside functions, so ``ptame --help`` stays fast.
"""

import argparse
import asyncio
import base64
import io
import logging
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from ptame.data import Prepared
    from ptame.registry import LoadedExplainer

__all__ = [
    "APP_NAME",
    "DEPLOYMENT_NAME",
    "BatchConfig",
    "ExplainerServer",
    "RequestError",
    "ServeSettings",
    "add_arguments",
    "build_app",
    "check_model",
    "create_api",
    "deploy",
    "main",
    "read_body",
]

logger = logging.getLogger(__name__)

APP_NAME = "ptame"
DEPLOYMENT_NAME = "Explainer"


@dataclass(frozen=True)
class ServeSettings:
    """Per-request limits and defaults of the server (passed to every replica).

    Attributes:
        max_body_bytes: larger request bodies are refused with 413.
        max_pixels: decoded images with more pixels are refused with 400 (decompression bombs).
        max_aspect_ratio: longer / shorter side above this is refused with 400 (the resize to the
            model's input would otherwise blow up the memory of a 1 x 100000 image).
        default_topk: top-k classes answered when a request does not say (capped at the classes).
        decode_threads: threads per replica that decode images and encode PNGs.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_aspect_ratio: float = 32.0
    default_topk: int = 5
    decode_threads: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{f.name} must be a number, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{f.name} must be >= 1, got {value}")


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching knobs; the deployment's ``user_config`` (changed without a restart)."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) or self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s!r}")


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"error": message}``, never a 500."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------- the replica


class ExplainerServer:
    """One Serve replica: a loaded explainer, a request batcher and the HTTP API.

    Args:
        model: the operator's reference: ``models:/<name>@<alias>``, ``models:/<name>/<version>``
            or a saved explainer directory; the alias is resolved when the replica starts.
        tracking_uri: MLflow tracking/registry URI (given explicitly: replicas do not share the
            driver's working directory or environment).
        settings: :class:`ServeSettings` as a dict.
        device: ``"cpu"`` or ``"cuda"``.
        shipped: the explainer as bytes (:func:`ptame.cluster.ship_explainer`), resolved on the driver
            for replicas on nodes without its files; ``model`` then only names it.
    """

    def __init__(
        self,
        model: str,
        tracking_uri: str | None = None,
        settings: dict[str, Any] | None = None,
        device: str = "cpu",
        shipped: dict[str, Any] | None = None,
    ) -> None:
        from ray import serve

        from ptame.registry import load_explainer

        self.model = model
        self.settings = ServeSettings(**(settings or {}))
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("use_gpu was set but this replica sees no CUDA device")
        if shipped is not None:
            from ptame.cluster import load_shipped

            self.loaded: "LoadedExplainer" = load_shipped(shipped, device)
        else:
            if model.startswith("models:/"):
                _connect_registry(tracking_uri)
            self.loaded = load_explainer(model, map_location=device)
        self.num_classes = int(self.loaded.explainer.backbone.num_classes)
        self._decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="ptame-decode")
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="ptame-explain")
        self._batches = self._images = 0  # forward passes and images of this replica
        batch = BatchConfig()
        self.explain_batch = serve.batch(
            max_batch_size=batch.max_batch_size, batch_wait_timeout_s=batch.batch_wait_timeout_s
        )(self._explain_batch)
        logger.info("replica serves %s (from %s)", self.loaded.model_uri, model)

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


# ---------------------------------------------------------------------------------- HTTP API


async def read_body(request: Any, limit: int) -> bytes:
    """The image bytes of a request (raw body or multipart field ``file``), at most ``limit``."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body is {int(declared)} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16, max_part_size=limit)
    except Exception as e:  # noqa: BLE001 - any parser failure is the client's malformed body
        raise RequestError(400, f"malformed multipart body: {getattr(e, 'detail', e)}") from None
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise RequestError(400, "multipart body needs the image as a file in the field 'file'")
        return await file.read()
    finally:
        await form.close()


def create_api(server: ExplainerServer) -> "FastAPI":
    """The FastAPI app of one replica (routes close over ``server``)."""
    from typing import Literal

    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel

    from ptame import __version__
    from ptame.apidocs import openapi_html
    from ptame.data import VIEWS

    class Explanation(BaseModel):
        pred_class: int
        pred_label: str
        pred_score: float
        topk_classes: list[int]
        topk_labels: list[str]
        topk_scores: list[float]
        saliency_class: int
        saliency_label: str
        saliency_score: float
        saliency_png: str
        saliency_shape: list[int]
        crop_box: list[int]
        width: int
        height: int
        model_uri: str

    class Error(BaseModel):
        error: str

    api = FastAPI(
        title="ptame",
        version=__version__,
        description="P-TAME explanations of a registered explainer: the prediction of an image and "
        "the saliency map of the predicted class, from one batched forward pass.",
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: blank offline
        redoc_url=None,
    )

    @api.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        why = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": why or "invalid request"}, status_code=422)

    image_body = {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": Error, "description": "unreadable image, malformed body, unknown class or view"},
        413: {"model": Error, "description": "body over the size limit"},
        422: {"model": Error, "description": "query parameter out of range"},
        503: {"description": "overloaded: the request queue is full, retry later"},
    }

    @api.post(
        "/explain",
        response_model=Explanation,
        openapi_extra={"requestBody": image_body},
        responses={200: {"content": {"image/png": {}}, "description": "JSON, or an overlay PNG with format=png"}}
        | errors,
    )
    async def explain(
        request: Request,
        topk: int | None = Query(None, ge=1, description="top-k classes to return (default: the server's)"),
        fmt: Literal["json", "png"] = Query("json", alias="format", description="png: the map over the image"),
        target: str | None = Query(
            None, alias="class", description="class to explain: an index or a label (default, or -1: the predicted class)"
        ),
        view: str = Query(
            "crop",
            description="crop: the map covers the centre square the classifier sees; full: the whole image "
            "(letterboxed: the map follows its aspect ratio, crop_box is the whole image)",
            json_schema_extra={"enum": list(VIEWS)},  # documented only: a bad value is answered 400, not 422
        ),
    ) -> Any:
        """Explain one image: its prediction and the saliency map of the predicted (or requested) class."""
        body = await read_body(request, server.settings.max_body_bytes)
        answer = await server.explain(body, topk, fmt, target, view)
        if isinstance(answer, tuple):
            png, headers = answer
            return Response(png, media_type="image/png", headers={"X-Model-URI": server.loaded.model_uri} | headers)
        return answer

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        """200 once the model is loaded (the app exists only after that)."""
        return {"status": "ok", "model_uri": server.loaded.model_uri}

    @api.get("/model")
    async def model() -> dict[str, Any]:
        """The served model: registry name, version, alias, metrics and configuration."""
        return server.model_info()

    @api.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        """The API reference as one self-contained page (no script or stylesheet from the network)."""
        return HTMLResponse(openapi_html(api.openapi(), str(request.base_url)))

    return api


# ---------------------------------------------------------------------------------- deploying


def build_app(args: dict[str, Any]) -> "Application":
    """Serve application builder (``import_path: ptame.serve:build_app`` in a Serve config).

    ``args``: ``model`` (required), ``tracking_uri``, the :class:`ServeSettings` fields,
    ``max_batch_size``, ``batch_wait_timeout_s``, ``replicas``, ``num_cpus``, ``use_gpu``,
    ``max_ongoing_requests``, ``max_queued_requests``; ``revision`` is ignored, but changing it in a
    config file makes ``serve deploy`` restart the replicas, which then resolve the alias anew.
    """
    from ray import serve

    if not isinstance(args, dict):
        raise TypeError(f"args must be a dict, got {type(args).__name__}")
    options = dict(args)
    model = options.pop("model", None)
    if not model or not isinstance(model, str):
        raise ValueError("args must name the model: models:/<name>@<alias>, models:/<name>/<version> or a directory")
    tracking_uri = options.pop("tracking_uri", None)
    settings = ServeSettings(**{f.name: options.pop(f.name) for f in fields(ServeSettings) if f.name in options})
    batch = BatchConfig(**{f.name: options.pop(f.name) for f in fields(BatchConfig) if f.name in options})
    replicas = int(options.pop("replicas", 1))
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    num_cpus = float(options.pop("num_cpus", 1))
    use_gpu = bool(options.pop("use_gpu", False))
    max_ongoing = int(options.pop("max_ongoing_requests", None) or 2 * batch.max_batch_size)
    max_queued = int(options.pop("max_queued_requests", 64))
    options.pop("revision", None)  # only there to change a config file: Serve then rolls the replicas
    if options:
        raise ValueError(f"unknown serve options {sorted(options)}")
    if model.startswith("models:/"):
        tracking_uri = _absolute_tracking_uri(tracking_uri)
    else:
        model = str(Path(model).resolve())
    shipped = _ship(model, tracking_uri)
    deployment = serve.deployment(
        serve.ingress()(ExplainerServer),
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing,
        max_queued_requests=max_queued,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0},
        user_config=asdict(batch),
        max_surge_percent=100,
        max_constructor_retry_count=3,
    )
    return deployment.bind(model, tracking_uri, asdict(settings), "cuda" if use_gpu else "cpu", shipped)


def _ship(model: str, tracking_uri: str | None) -> dict[str, Any] | None:
    """The explainer as bytes for replicas on other nodes when its files are on this machine only (one
    node, or a registry server every node reaches: ``None``, each replica loads it)."""
    from ptame.cluster import multi_node, ship_explainer

    if not multi_node():
        return None
    if model.startswith("models:/"):
        _connect_registry(tracking_uri)
    return ship_explainer(model, tracking_uri)


def deploy(args: dict[str, Any], name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    """Check the model exists, then run (or roll to) the application; returns its ``/model``.

    Blocks until every replica of the new version answers. Redeploying a running ``name``
    replaces its replicas without dropping requests (new ones start before old ones drain).
    """
    from ray import serve

    check_model(args)
    handle = serve.run(build_app(args), name=name, route_prefix=route_prefix)
    return handle.model_info.remote().result()


def check_model(args: dict[str, Any]) -> None:
    """Fail early, before Serve starts anything, when ``args["model"]`` names nothing."""
    model = args.get("model")
    if isinstance(model, str) and model.startswith("models:/"):
        from ptame.registry import resolve_version

        _connect_registry(_absolute_tracking_uri(args.get("tracking_uri")))
        registered, version = resolve_version(model)
        logger.info("%s is models:/%s/%s", model, registered, version)
    elif isinstance(model, str) and not Path(model).is_dir():
        raise FileNotFoundError(f"{model} is neither a saved explainer directory nor a models:/ URI")


def _absolute_tracking_uri(uri: str | None) -> str:
    """The tracking URI with a relative SQLite path made absolute (replicas run elsewhere)."""
    from ptame.registry import DEFAULT_TRACKING_URI, absolute_sqlite

    return absolute_sqlite(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def _connect_registry(uri: str | None) -> None:
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)


# ---------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``ptame serve`` options."""
    parser.epilog = (
        "Switch versions: move the registry alias, then run the same `ptame serve` again against the same "
        "Ray cluster (--address / RAY_ADDRESS / `ray start --head`), or send SIGHUP to the running "
        "`ptame serve`. Clusters without this command: deploy/serve.yaml (`serve run` / `serve deploy`)."
    )
    add = parser.add_argument
    add("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a saved explainer dir")
    add("--host", default="127.0.0.1", help="HTTP host; 0.0.0.0 listens on every interface (default: %(default)s)")
    add("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    add("--replicas", type=int, default=1, help="model replicas (default: %(default)s)")
    add("--num-cpus", type=float, default=1.0, help="CPUs per replica, also its torch threads (default: %(default)s)")
    add("--use-gpu", action="store_true", help="one GPU per replica")
    add(
        "--max-batch-size",
        type=int,
        default=BatchConfig.max_batch_size,
        help="most images per forward pass; 1 turns batching off (default: %(default)s)",
    )
    add(
        "--batch-wait-s",
        type=float,
        default=BatchConfig.batch_wait_timeout_s,
        help="longest wait in seconds to fill a batch (default: %(default)s)",
    )
    add(
        "--max-queued",
        type=int,
        default=64,
        help="requests waiting at the proxy before it answers 503; -1: no limit (default: %(default)s)",
    )
    add(
        "--max-body-mb",
        type=float,
        default=ServeSettings.max_body_bytes / 2**20,
        help="request bodies over this many MiB get 413 (default: %(default)s)",
    )
    add(
        "--max-pixels",
        type=int,
        default=ServeSettings.max_pixels,
        help="decoded images with more pixels get 400 (default: %(default)s)",
    )
    add(
        "--topk",
        type=int,
        default=ServeSettings.default_topk,
        help="top-k classes answered when a request has no ?topk= (default: %(default)s)",
    )
    add("--name", default=APP_NAME, help="Serve application name (default: %(default)s)")
    add("--route-prefix", default="/", help="URL prefix of the application (default: %(default)s)")
    add(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster (default: $RAY_ADDRESS, else a `ray start` cluster on this machine, else a local Ray)",
    )
    add(
        "--tracking-uri",
        default=None,
        help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )


def _app_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "tracking_uri": args.tracking_uri,
        "replicas": args.replicas,
        "num_cpus": args.num_cpus,
        "use_gpu": args.use_gpu,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_s,
        "max_queued_requests": args.max_queued,
        "max_body_bytes": int(args.max_body_mb * 2**20),
        "max_pixels": args.max_pixels,
        "default_topk": args.topk,
    }


def main(args: argparse.Namespace) -> int:
    """Deploy and block until Ctrl-C / SIGTERM; a second run against the same cluster only updates."""
    import ray
    from ray import serve

    app_args = _app_args(args)
    build_app(app_args)  # checks every option, and
    check_model(app_args)  # the model, before anything slow starts
    from ptame.process import init_ray

    reload = _install_signal_handlers()  # before anything slow: an early SIGHUP must not kill us
    context = init_ray(args.address)  # keeps the SIGTERM handler
    owner, serve_was_running = False, True
    try:
        status = serve.status()
        serve_was_running = bool(status.proxies or status.applications)
        if args.name in status.applications:
            info = deploy(app_args, name=args.name, route_prefix=args.route_prefix)
            logger.info(
                "application %r now serves %s; the process that started it keeps serving", args.name, info["model_uri"]
            )
            return 0
        if not serve_was_running:
            _check_port_free(args.host, args.port)
        serve.start(http_options={"host": args.host, "port": args.port})
        owner = True
        info = deploy(app_args, name=args.name, route_prefix=args.route_prefix)
        url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
        logger.info("serving %s at %s/explain (API docs: %s/docs); Ctrl-C stops", info["model_uri"], url, url)
        logger.info(
            "after moving the alias, switch versions with `kill -HUP %d` or `ptame serve --address %s --model %s`",
            os.getpid(),
            context.address_info.get("gcs_address"),
            args.model,
        )
        try:
            _serve_until_stopped(reload, app_args, args.name, args.route_prefix)
        except KeyboardInterrupt as e:
            e.add_note(f"stopped serving at {url}")
            raise
        return 0
    finally:
        try:
            if owner and serve_was_running:
                serve.delete(args.name)
            elif owner:
                serve.shutdown()
        finally:
            ray.shutdown()


def _install_signal_handlers() -> threading.Event:
    """SIGTERM stops like Ctrl-C; SIGHUP sets the returned event (redeploy, re-resolving the alias)."""
    from ptame.process import stop_on_sigterm

    reload = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return reload
    stop_on_sigterm()
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
    return reload


def _serve_until_stopped(reload: threading.Event, app_args: dict[str, Any], name: str, route_prefix: str) -> None:
    """Sleep until SIGINT / SIGTERM (``KeyboardInterrupt``); redeploy whenever ``reload`` is set (SIGHUP)."""
    while True:
        if reload.wait(1.0):
            reload.clear()
            try:
                info = deploy(app_args, name=name, route_prefix=route_prefix)
                logger.info("reloaded: now serving %s", info["model_uri"])
            except Exception as e:  # noqa: BLE001 - a failed reload keeps the old version serving
                logger.error("reload failed, the previous version keeps serving: %s", e)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"cannot listen on {host}:{port} ({e.strerror}); pass --port, or if a `ptame serve` runs there, "
                "send it SIGHUP to reload, or run Ray as a cluster (`ray start --head`) so that calls share it"
            ) from None
