"""Quiet Ray start-up and clean interruption: notices filtered, user switches kept, SIGTERM on ``ptame explain``."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AUXILIARY, TINY_BACKBONE, TINY_PREP
from PIL import Image

from ptame import process
from ptame.explainer import Explainer

#: what Ray printed in a plain run before ptame silenced it (none of it concerns the user)
SILENCED = re.compile(
    r"Progress bars disabled|A new progress UI|Progress will be logged|Token authentication is enabled"
    r"|execution finished in|Starting execution of Dataset|Execution plan of|logging_progress|Started a local Ray"
    r"|DeprecationWarning"
)


def _record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("ray.data", level, __file__, 1, msg, (), None)


def test_notice_filter_drops_only_ray_notices() -> None:
    f = process.RayNoticeFilter()
    assert not f.filter(_record("Progress bars disabled. To enable, set ..."))
    assert not f.filter(_record("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ..."))
    assert f.filter(_record("Token authentication is disabled for this Ray cluster. Anyone with network access ..."))
    assert f.filter(_record("Task failed: ValueError", logging.ERROR))


def test_quiet_env_keeps_what_the_user_set(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONWARNINGS", "error")
    monkeypatch.setenv("RAY_DATA_LOG_ENCODING", "JSON")
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    process.quiet_ray_env()
    assert os.environ["PYTHONWARNINGS"] == "error"
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ  # would clash with the user's JSON encoding
    monkeypatch.delenv("RAY_DATA_LOG_ENCODING")
    monkeypatch.delenv("PYTHONWARNINGS")
    process.quiet_ray_env()
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == str(process.RAY_DATA_LOGGING) and process.RAY_DATA_LOGGING.is_file()
    assert os.environ["PYTHONWARNINGS"] == process.RAY_INTERNAL_WARNINGS


def test_interrupted_message_and_exit_codes() -> None:
    e = process.Interrupted(signal.SIGTERM)
    e.add_note("3 of 10 chunks written; rerun the same command to resume")
    assert isinstance(e, KeyboardInterrupt) and process.exit_code(e) == 143
    assert process.interrupted_message(e) == "interrupted by SIGTERM: 3 of 10 chunks written; rerun the same command to resume"
    assert process.exit_code(KeyboardInterrupt()) == 130 and process.interrupted_message(KeyboardInterrupt()) == "interrupted by SIGINT"


# ------------------------------------------------------------------- a real `ptame explain`


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONWARNINGS", "RAY_DATA_LOGGING_CONFIG")}
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return env


@pytest.mark.timeout(1500)
def test_sigterm_says_how_far_explain_got_and_a_rerun_is_quiet(tmp_path) -> None:
    """SIGTERM mid-job: one line with the chunks written, exit 143, no traceback; the rerun finishes
    with ptame's summary and none of Ray's notices."""
    torch.manual_seed(0)
    model = Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP).save(tmp_path / "model")
    y, x = np.mgrid[0:1000, 0:1000]
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):  # large smooth JPEGs: slow enough to stop half-way
        pixels = np.stack([(x * (i + 1)) % 256, (2 * y) % 256, ((x + y) // 4) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{i:02d}.jpg", quality=90)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ptame.cli", "explain", "--model", str(model), "--input", str(images),
               "--output", str(out), "--chunk-size", "2", "--concurrency", "1", "--no-progress"]  # fmt: skip

    job = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while not any(out.glob("part-*.parquet")):
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the job wrote no chunk in 15 minutes"
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    done = len(list(out.glob("part-*.parquet")))
    assert job.returncode == 143, stderr[-3000:]
    line = re.search(r"interrupted by SIGTERM: (\d+) of 10 chunks written; rerun the same command to resume", stderr)
    assert line and int(line[1]) == done, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert done < 10, "SIGTERM came after the job ended"

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {done} of 10 chunks already done" in rerun.stderr
    assert re.search(r"explained \d+ images \(0 errors\)", rerun.stderr), rerun.stderr[-3000:]
    noisy = [line for line in (stderr + rerun.stderr).splitlines() if SILENCED.search(line)]
    assert not noisy, "\n".join(noisy)


STAGE = '''
import sys
sys.path[:0] = [{pipelines!r}, {tests!r}]
from _stage import main
from conftest import AUXILIARY, TINY_BACKBONE
from ptame.train import TrainConfig, train


def run(params):
    cfg = TrainConfig(backbone=TINY_BACKBONE, auxiliary=AUXILIARY, data={data!r}, output_dir="explainer",
                      preprocessing={{"input_size": 64, "resize": 64, "mean": [0.5] * 3, "std": [0.5] * 3}},
                      batch_size=8, storage_path="ray_results", checkpoint_every=1000, max_steps=200, epochs=100000,
                      log_every=1)  # a progress line every 10 steps
    try:
        train(cfg)
    except KeyboardInterrupt as e:  # as pipelines/train.py does
        e.add_note("rerun `dvc repro` to resume: training continues from its last checkpoint")
        raise


main(run)
'''


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sigterm_stops_a_training_stage_with_one_line(tmp_path) -> None:
    """A DVC stage running Ray Train gets SIGTERM: exit 143, the stage's line, no traceback of ours."""
    import shutil

    from test_train import write_scenes

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    data = write_scenes(tmp_path / "scenes", 32)
    script = tmp_path / "stage.py"
    script.write_text(STAGE.format(pipelines=str(root / "pipelines"), tests=str(root / "tests"), data=str(data)))
    log = tmp_path / "stage.log"
    with log.open("w") as f:
        job = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while not re.search(r"step \d+/", log.read_text()):
                assert job.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no training step in 15 minutes"
                time.sleep(0.2)
            job.send_signal(signal.SIGTERM)
            assert job.wait(timeout=300) == 143, log.read_text()[-3000:]
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    text = log.read_text()
    assert "interrupted by SIGTERM: rerun `dvc repro` to resume: training continues from its last checkpoint" in text
    ours = [line for line in text.splitlines() if "PlacementGroupCleaner" not in line]  # Ray's, when several Rays run here
    assert not any("Traceback" in line for line in ours), text[-3000:]


def test_cli_gives_the_callers_sigterm_handler_back() -> None:
    from ptame.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["show", "--explanations", "/nonexistent/explanations", "--out", "/nonexistent/out"]) != 0
    assert signal.getsignal(signal.SIGTERM) is before
