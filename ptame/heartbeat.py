"""A progress line every ~30 s of a long loop whose regular lines are far apart (``dvc repro > log``)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["HEARTBEAT_S", "Heartbeat", "format_duration"]

#: seconds between heartbeat lines
HEARTBEAT_S = 30.0


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"2 h 05 min"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Heartbeat:
    """Says where a loop of ``total`` steps is (step, images/s, time left) when its last line is ``every_s`` old.

    Call :meth:`tick` after every step. The speed counts from the first step done, like the regular
    progress lines (start-up excluded), until then from the start. ``first_step``: the step the loop
    starts after (a resumed run); ``clock``: seconds, injectable for tests.
    """

    def __init__(
        self,
        total: int,
        images_per_step: int,
        first_step: int = 0,
        every_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.total, self.images_per_step, self.every_s, self.clock = total, images_per_step, every_s, clock
        self._start = self._last = clock()
        self._origin = (first_step, self._start)  # (step, time) the speed counts from
        self._first: tuple[int, float] | None = None  # the first step done

    def tick(self, step: int, logged: bool = False) -> str | None:
        """After ``step``: the line to log, or ``None`` while the last line (``logged``: one was just written) is under ``every_s`` old."""
        now = self.clock()
        self._first = self._first or (step, now)
        if logged:
            self._last = now
            return None
        if now - self._last < self.every_s:
            return None
        self._last = now
        origin = self._first if step > self._first[0] else self._origin
        steps_per_s = (step - origin[0]) / max(now - origin[1], 1e-9)
        left = format_duration((self.total - step) / steps_per_s) if steps_per_s > 0 else "unknown"
        return f"step {step}/{self.total}  {steps_per_s * self.images_per_step:.1f} img/s  {left} left"
