"""How a ptame command meets its user: Ray started quietly, and SIGTERM stopping it like Ctrl-C.

Ray prints notices meant for its own developers (deprecations raised inside Ray, Ray Data's
per-operator progress, Ray Train's set-up chatter, the token-auth default). :func:`init_ray`
silences those at their source, only where the user has not set the same switch, and keeps every
error and actionable warning visible. Ray's log files keep everything.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "RAY_DATA_LOGGING",
    "Interrupted",
    "RayNoticeFilter",
    "exit_code",
    "init_ray",
    "interrupted_message",
    "quiet_ray_data",
    "quiet_ray_env",
    "stop_on_sigterm",
]

#: Ray Data's default logging set-up with the console at WARNING (``RAY_DATA_LOGGING_CONFIG``)
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
#: a deprecation raised by Ray's own code in Ray Train's dataset actor, never by a ptame call
RAY_INTERNAL_WARNINGS = "ignore::DeprecationWarning:ray.data._internal.execution.interfaces.execution_options"
#: message prefixes of Ray notices that concern Ray's defaults, not the user's job
RAY_NOTICES = (
    "Progress bars disabled",
    "Progress bars for operators disabled",
    "A new progress UI is available",
    "Progress will be logged because",
    "Token authentication is enabled for this Ray cluster",  # the secure default; "disabled" stays loud
)


class RayNoticeFilter(logging.Filter):
    """Drops the records whose message starts with one of :data:`RAY_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(RAY_NOTICES))


_NOTICES = RayNoticeFilter()
_received: int | None = None  # the signal a handler turned into Interrupted (libraries may re-raise a plain one)


class Interrupted(KeyboardInterrupt):
    """``KeyboardInterrupt`` raised by a signal; ``signum`` sets the exit code (128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _signum(e: KeyboardInterrupt) -> int:
    return getattr(e, "signum", None) or _received or int(signal.SIGINT)


def exit_code(e: KeyboardInterrupt) -> int:
    """The shell's code for a process stopped by a signal: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + _signum(e)


def interrupted_message(e: KeyboardInterrupt) -> str:
    """``interrupted by SIGTERM: <notes added on the way up>`` in one line."""
    name = signal.Signals(_signum(e)).name
    notes = "; ".join(getattr(e, "__notes__", ()))
    return f"interrupted by {name}" + (f": {notes}" if notes else "")


def _raise_interrupted(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    global _received
    _received = int(signum)
    raise Interrupted(signum)


def stop_on_sigterm() -> Any:
    """SIGTERM raises :class:`Interrupted` in the main thread, as Ctrl-C raises ``KeyboardInterrupt``.

    Returns the previous handler (``None`` outside the main thread, where nothing changes).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupted)


def quiet_ray_env() -> None:
    """Switches read by Ray's processes at start-up (set only where the user set none)."""
    if "RAY_DATA_LOG_ENCODING" not in os.environ and "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(RAY_DATA_LOGGING)
        if "ray.data" in sys.modules:  # configured at import: apply to this process too
            from ray.data._internal.logging import configure_logging

            configure_logging()
    os.environ.setdefault("PYTHONWARNINGS", RAY_INTERNAL_WARNINGS)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_NOTICES)


def quiet_ray_data() -> None:
    """No Ray Data progress bars in this driver and the datasets it creates (ptame reports its own)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def init_ray(address: str | None = None, **kwargs: Any) -> Any:
    """``ray.init`` with Ray's notices silenced (:func:`quiet_ray_env`, ``logging_level`` WARNING).

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``); one set by :func:`stop_on_sigterm`
    is put back, so that SIGTERM still ends a command with its message.
    """
    import ray

    quiet_ray_env()
    kwargs.setdefault("logging_level", logging.WARNING)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return ray.init(address=address, **kwargs)
    finally:
        if handler is _raise_interrupted and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
