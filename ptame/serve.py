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

Here: building and (re)deploying the application from a :class:`~ptame.serve_config.ServeConfig`.
The replica is :mod:`ptame.serve_replica`, its HTTP API :mod:`ptame.serve_api`, the command line
:mod:`ptame.commands.serve`. Ray, Serve and FastAPI are imported inside functions, so ``ptame --help``
stays fast.
"""


from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptame.serve_config import ServeConfig

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "build_app", "check_model", "deploy"]

logger = logging.getLogger(__name__)

APP_NAME = "ptame"
DEPLOYMENT_NAME = "Explainer"


def build_app(args: ServeConfig | Mapping[str, Any]) -> Application:
    """Serve application builder (``import_path: ptame.serve:build_app`` in a Serve config).

    ``args``: a :class:`ServeConfig`, or a Serve config file's ``args`` dict
    (:meth:`ServeConfig.from_args`: ``model`` required, unknown keys refused).
    """
    from ray import serve

    from ptame.serve_replica import ExplainerServer

    config = ServeConfig.of(args).located()
    shipped = _ship(config)
    deployment = serve.deployment(
        serve.ingress()(ExplainerServer),
        name=DEPLOYMENT_NAME,
        num_replicas=config.replicas,
        max_ongoing_requests=config.ongoing_limit,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": 1 if config.use_gpu else 0},
        user_config=asdict(config.batch),
        max_surge_percent=100,
        max_constructor_retry_count=3,
    )
    return deployment.bind(config, shipped)


def _ship(config: ServeConfig) -> dict[str, Any] | None:
    """The explainer as bytes for replicas on other nodes when its files are on this machine only (one
    node, or a registry server every node reaches: ``None``, each replica loads it)."""
    from ptame.cluster import multi_node, ship_explainer

    if not multi_node():
        return None
    config.connect_registry()
    return ship_explainer(config.model, config.tracking_uri)


def deploy(args: ServeConfig | Mapping[str, Any], name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    """Check the model exists, then run (or roll to) the application; returns its ``/model``.

    ``args`` as :func:`build_app`'s. Blocks until every replica of the new version answers.
    Redeploying a running ``name`` replaces its replicas without dropping requests (new ones start
    before old ones drain).
    """
    from ray import serve

    config = ServeConfig.of(args)
    check_model(config)
    handle = serve.run(build_app(config), name=name, route_prefix=route_prefix)
    return handle.model_info.remote().result()


def check_model(config: ServeConfig) -> None:
    """Fail early, before Serve starts anything, when ``config.model`` names nothing."""
    if config.from_registry:
        from ptame.registry import resolve_version

        config.located().connect_registry()
        registered, version = resolve_version(config.model)
        logger.info("%s is models:/%s/%s", config.model, registered, version)
    elif not Path(config.model).is_dir():
        raise FileNotFoundError(f"{config.model} is neither a saved explainer directory nor a models:/ URI")
