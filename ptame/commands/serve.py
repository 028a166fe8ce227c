"""``ptame serve``: deploy a registered explainer with Ray Serve and keep serving until stopped.

The engine is :mod:`ptame.serve`; here are the flags, the :class:`~ptame.serve_config.ServeConfig`
they make, and the process's life: SIGHUP redeploys (re-resolving the alias), Ctrl-C / SIGTERM stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from typing import Any

from ptame.serve import APP_NAME, build_app, check_model, deploy
from ptame.serve_config import BatchConfig, ServeConfig, ServeSettings

__all__ = ["add_arguments", "main"]

logger = logging.getLogger("ptame.serve")  # the name the server's log lines have always had

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
    _add_capacity_arguments(parser)
    _add_limit_arguments(parser)
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


def _add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    """Replicas, their resources, batching and the proxy's queue."""
    add = parser.add_argument
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
        default=ServeConfig.max_queued_requests,
        help="requests waiting at the proxy before it answers 503; -1: no limit (default: %(default)s)",
    )


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Per-request limits and defaults (:class:`ServeSettings`)."""
    add = parser.add_argument
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


def _config(args: argparse.Namespace) -> ServeConfig:
    """The application's settings from the parsed flags."""
    settings = ServeSettings(
        max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels, default_topk=args.topk
    )
    return ServeConfig(
        args.model,
        tracking_uri=args.tracking_uri,
        settings=settings,
        batch=BatchConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s),
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        use_gpu=args.use_gpu,
        max_queued_requests=args.max_queued,
    )


def main(args: argparse.Namespace) -> int:
    """Deploy and block until Ctrl-C / SIGTERM; a second run against the same cluster only updates."""
    import ray
    from ray import serve

    from ptame.process import init_ray

    config = _config(args)
    build_app(config)  # checks every option, and
    check_model(config)  # the model, before anything slow starts
    reload = _install_signal_handlers()  # before anything slow: an early SIGHUP must not kill us
    context = init_ray(args.address)  # keeps the SIGTERM handler
    owner, serve_was_running = False, True
    try:
        status = serve.status()
        serve_was_running = bool(status.proxies or status.applications)
        if args.name in status.applications:
            _update(config, args)
            return 0
        if not serve_was_running:
            _check_port_free(args.host, args.port)
        serve.start(http_options={"host": args.host, "port": args.port})
        owner = True
        _serve(config, args, context.address_info.get("gcs_address"), reload)
        return 0
    finally:
        try:
            if owner and serve_was_running:
                serve.delete(args.name)
            elif owner:
                serve.shutdown()
        finally:
            ray.shutdown()


def _update(config: ServeConfig, args: argparse.Namespace) -> None:
    """Roll the application another ``ptame serve`` runs to ``config`` (that process keeps serving)."""
    info = deploy(config, name=args.name, route_prefix=args.route_prefix)
    logger.info("application %r now serves %s; the process that started it keeps serving", args.name, info["model_uri"])


def _serve(config: ServeConfig, args: argparse.Namespace, address: Any, reload: threading.Event) -> None:
    """Deploy on the Serve this process started, say where, and serve until stopped."""
    info = deploy(config, name=args.name, route_prefix=args.route_prefix)
    url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
    logger.info("serving %s at %s/explain (API docs: %s/docs); Ctrl-C stops", info["model_uri"], url, url)
    logger.info(
        "after moving the alias, switch versions with `kill -HUP %d` or `ptame serve --address %s --model %s`",
        os.getpid(),
        address,
        args.model,
    )
    try:
        _serve_until_stopped(reload, config, args.name, args.route_prefix)
    except KeyboardInterrupt as e:
        e.add_note(f"stopped serving at {url}")
        raise


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


def _serve_until_stopped(reload: threading.Event, config: ServeConfig, name: str, route_prefix: str) -> None:
    """Sleep until SIGINT / SIGTERM (``KeyboardInterrupt``); redeploy whenever ``reload`` is set (SIGHUP)."""
    while True:
        if reload.wait(1.0):
            reload.clear()
            try:
                info = deploy(config, name=name, route_prefix=route_prefix)
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
