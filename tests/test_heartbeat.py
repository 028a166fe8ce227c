"""The training heartbeat: a line every ~30 s between the regular progress lines, timed by a fake clock."""

from __future__ import annotations

import pytest

from ptame.heartbeat import Heartbeat, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_30_s_with_step_rate_and_time_left() -> None:
    clock = FakeClock()
    beat = Heartbeat(total=100, images_per_step=16, first_step=20, clock=clock)  # resumed after step 20
    clock.now += 40  # a slow first step (start-up): only it is done
    assert beat.tick(21) == "step 21/100  0.4 img/s  52 min 40 s left"  # 1 step in 40 s, from the start
    clock.now += 29.9
    assert beat.tick(23) is None  # under 30 s since the last line
    clock.now += 0.1
    assert beat.tick(24) == "step 24/100  1.6 img/s  12 min 40 s left"  # from the first step on: 3 steps in 30 s
    clock.now += 10
    assert beat.tick(30, logged=True) is None  # a regular progress line at 40 s after step 21
    clock.now += 29
    assert beat.tick(39) is None
    clock.now += 1
    assert beat.tick(40) == "step 40/100  4.3 img/s  3 min 41 s left"  # 19 steps in 70 s


def test_no_steps_yet_says_time_left_is_unknown_and_bad_period_is_refused() -> None:
    clock = FakeClock()
    beat = Heartbeat(total=10, images_per_step=8, clock=clock)
    clock.now += 31
    assert beat.tick(0) == "step 0/10  0.0 img/s  unknown left"
    with pytest.raises(ValueError, match="every_s must be > 0"):
        Heartbeat(total=10, images_per_step=8, every_s=0)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 44.6, 200, 3599, 7500)] == ["0 s", "45 s", "3 min 20 s", "59 min 59 s", "2 h 05 min"]
