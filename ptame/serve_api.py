"""The HTTP API of one replica: FastAPI routes over an :class:`~ptame.serve_replica.ExplainerServer`.

``POST /explain`` (an image as the raw body or the multipart field ``file``), ``GET /healthz``,
``GET /model``, an offline ``/docs`` page and ``/openapi.json``. Bad input is answered with its
status and ``{"error": ...}`` (:class:`RequestError`), never a 500.

FastAPI and pydantic are imported inside functions; no ``from __future__ import annotations`` here:
FastAPI reads the routes' annotations, which name types imported inside those functions.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ptame.serve_replica import ExplainerServer

__all__ = ["RequestError", "create_api", "read_body"]


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"error": message}``, never a 500."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def create_api(server: "ExplainerServer") -> "FastAPI":
    """The FastAPI app of one replica (routes close over ``server``)."""
    api = _new_api()
    explanation, error = _response_models()
    _add_explain_route(api, server, explanation, error)
    _add_info_routes(api, server)
    return api


def _new_api() -> "FastAPI":
    """An app without routes whose errors are answered ``{"error": ...}`` (no CDN-backed docs pages)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from ptame import __version__

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

    return api


def _response_models() -> tuple[type, type]:
    """The pydantic models of a JSON answer and of an error (they name the OpenAPI schemas)."""
    from pydantic import BaseModel

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

    return Explanation, Error


def _explain_openapi(error: type) -> dict[str, Any]:
    """OpenAPI of ``POST /explain`` that FastAPI cannot infer: the image body and every answer's status."""
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
        400: {"model": error, "description": "unreadable image, malformed body, unknown class or view"},
        413: {"model": error, "description": "body over the size limit"},
        422: {"model": error, "description": "query parameter out of range"},
        503: {"description": "overloaded: the request queue is full, retry later"},
    }
    return {
        "openapi_extra": {"requestBody": image_body},
        "responses": {200: {"content": {"image/png": {}}, "description": "JSON, or an overlay PNG with format=png"}}
        | errors,
    }


def _add_explain_route(api: "FastAPI", server: "ExplainerServer", explanation: type, error: type) -> None:
    """``POST /explain``: JSON, or with ``?format=png`` the overlay PNG and headers saying what it shows."""
    from typing import Literal

    from fastapi import Query, Request
    from fastapi.responses import Response

    from ptame.data import VIEWS

    @api.post("/explain", response_model=explanation, **_explain_openapi(error))
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


def _add_info_routes(api: "FastAPI", server: "ExplainerServer") -> None:
    """``GET /healthz``, ``GET /model`` and the offline ``/docs`` page."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse

    from ptame.apidocs import openapi_html

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
