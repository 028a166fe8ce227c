"""One line for a refusal ptame makes on purpose, a traceback for everything else (a bug)."""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch

from ptame.classes import resolve_class
from ptame.errors import is_refusal
from ptame.records import dequantize

ROOT = Path(__file__).resolve().parents[1]


def _raised(call, *args) -> BaseException:  # noqa: ANN001 - any callable
    with pytest.raises(Exception) as info:
        call(*args)
    return info.value


def _torch_value_error() -> None:
    """A ValueError from inside torch, as a bug in ptame would cause: no refusal of ours."""
    torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_only_ptames_own_raise_statements_are_refusals(tmp_path) -> None:
    assert is_refusal(_raised(resolve_class, 9, ["a"]))  # `raise ValueError(...)` in ptame
    assert is_refusal(_raised(open, tmp_path / "missing"))  # the operating system names the file
    assert not is_refusal(_raised(_torch_value_error))  # inside torch
    assert not is_refusal(_raised(dequantize, b"", ("h", 1)))  # int("h") inside ptame: a ValueError, not a raise
    assert not is_refusal(_raised(dict().__getitem__, "key"))  # a LookupError outside ptame
    assert not is_refusal(_raised(lambda: 1 / 0))  # not a refusal type at all


def _cli_error(caplog, monkeypatch, *argv: str, broken: bool = False) -> logging.LogRecord:
    """Run ``ptame explain`` with a batch size of 0 (refused) or a bug inside; the one error it logs."""
    from ptame.cli import main

    if broken:
        monkeypatch.setattr("ptame.batch.explain_to_parquet", lambda *a, **k: _torch_value_error())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ptame"):
        assert main([*argv, "explain", "--model", "m", "--input", "i", "--output", "o", "--batch-size", "0"]) == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    return record


def test_cli_prints_a_refusal_in_one_line_and_a_bug_with_its_traceback(caplog, monkeypatch) -> None:
    refusal = _cli_error(caplog, monkeypatch)
    assert refusal.getMessage() == "batch_size must be >= 1, got 0" and refusal.exc_info is None
    assert "Traceback" not in caplog.text
    assert _cli_error(caplog, monkeypatch, "-v").exc_info is not None  # -v: always the traceback
    bug = _cli_error(caplog, monkeypatch, broken=True)
    assert bug.exc_info is not None and "Traceback" in caplog.text and "torch/nn/functional.py" in caplog.text
    assert bug.getMessage().startswith("ValueError: Expected input batch_size (2) to match target batch_size (3)")


@pytest.mark.parametrize("broken", [False, True])
def test_stage_prints_a_refusal_in_one_line_and_a_bug_with_its_traceback(broken, tmp_path, monkeypatch, caplog) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))
    from _stage import main

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exited, caplog.at_level(logging.INFO, logger="pipelines"):
            main(lambda params: _torch_value_error() if broken else resolve_class(9, ["a"]))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exited.value.code == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert (record.exc_info is not None) == broken and ("Traceback" in caplog.text) == broken
    if not broken:
        assert record.getMessage().startswith("class 9 is out of range")
