"""How ``ptame`` commands and DVC stages report a failure: one line for a refusal, a traceback for a bug.

A *refusal* is a ``ValueError`` / ``LookupError`` / ``FileNotFoundError`` that ptame raises on purpose
(a ``raise`` statement in its own code, whose message says what to change), or a file the operating
system did not find (its message names the path). The same types raised anywhere else (inside
torch, pyarrow, a failed unpacking or dict look-up in ptame itself) are bugs until shown otherwise,
so they keep their traceback.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REFUSALS", "is_refusal", "report_failure"]

#: the exception types a command reports in one line when they are refusals
REFUSALS: tuple[type[BaseException], ...] = (ValueError, LookupError, FileNotFoundError)

_PACKAGE = Path(__file__).resolve().parent


def is_refusal(error: BaseException, roots: Sequence[str | Path] = ()) -> bool:
    """Whether ``error`` is a refusal: raised by a ``raise`` statement in ptame (or under ``roots``), or a missing file."""
    if not isinstance(error, REFUSALS):
        return False
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return True  # from the operating system: the message names the path
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    where = Path(frames[-1].filename).resolve()
    ours = any(where.is_relative_to(Path(root).resolve()) for root in (_PACKAGE, *roots))
    return ours and (frames[-1].line or "").lstrip().startswith("raise ")


def report_failure(
    logger: logging.Logger, error: BaseException, verbose: bool = False, roots: Sequence[str | Path] = ()
) -> None:
    """Log ``error``: its message alone for a refusal, with the traceback for anything else or with ``verbose``."""
    if is_refusal(error, roots) and not verbose:
        logger.error("%s", error)
    else:
        logger.error("%s: %s", type(error).__name__, error, exc_info=error)
