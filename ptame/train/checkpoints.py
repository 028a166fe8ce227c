"""Checkpoints of a run: what rank 0 saves every ``checkpoint_every`` steps and a restarted worker group
resumes from (head as safetensors, optimiser, schedule, grad scaler, the step counters and history),
a finished run found again, and the final checkpoint saved as the explainer."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ptame.train.config import TrainConfig, TrainResult, build_explainer

__all__ = ["HEAD_FILE", "OPTIM_FILE", "STATE_FILE", "finished_checkpoint", "restore_state", "save_result", "save_state"]

STATE_FILE = "train_state.json"
HEAD_FILE = "head.safetensors"
OPTIM_FILE = "optimizer.pt"


def save_state(directory: str, head: torch.nn.Module, optimizer, scheduler, scaler, state: dict) -> None:
    """Write a checkpoint into ``directory``: the head as safetensors, the optimiser, schedule and scaler, the state as JSON."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, os.path.join(directory, HEAD_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
               os.path.join(directory, OPTIM_FILE))
    Path(directory, STATE_FILE).write_text(json.dumps(state))


def restore_state(directory: str, head: torch.nn.Module, optimizer, scheduler, scaler, device) -> dict:
    """Load a :func:`save_state` checkpoint into the given objects; returns the saved state (step, epoch, history...)."""
    from safetensors.torch import load_file

    head.load_state_dict(load_file(os.path.join(directory, HEAD_FILE), device=str(device)))
    saved = torch.load(os.path.join(directory, OPTIM_FILE), map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:  # empty when saved without fp16 (another GPU kind may resume the run)
        scaler.load_state_dict(saved["scaler"])
    return json.loads(Path(directory, STATE_FILE).read_text())


def finished_checkpoint(cfg: TrainConfig, name: str, total: int):  # -> ray.train.Result | None
    """The earlier run of identical settings if its latest checkpoint is its last (step or epoch)."""
    from ray.train import Result

    try:
        result = Result.from_path(f"{cfg.storage_path}/{name}")
    except RuntimeError:  # no such run (or no snapshot yet)
        return None
    metrics = result.metrics or {}
    done = int(metrics.get("step", -1)) >= total or int(metrics.get("epoch", -1)) >= cfg.epochs
    return result if result.checkpoint is not None and done else None


def save_result(cfg: TrainConfig, result, final_state: dict | None, start: float, rerun: bool = False) -> TrainResult:
    """Save the checkpoint's head as the explainer in ``output_dir`` and describe the run."""
    explainer, state = _load_checkpoint(cfg, result.checkpoint)
    if isinstance(final_state, dict):  # rank 0's state at the end: also knows a resume with nothing to do
        state = final_state
    if rerun:
        state["resumed_from"].append(state["step"])
    explainer.save(cfg.output_dir, extra={"train": {
        "steps": state["step"], "checkpoint": result.checkpoint.path, "run": result.path,
        "data": cfg.data, "lr": cfg.lr, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
        "head_init": cfg.head_init, "cam_scale": cfg.cam_scale,  # the start the evaluation's cam peer rebuilds
    }})
    return TrainResult(
        explainer_dir=cfg.output_dir,
        history=state["history"],
        checkpoint=result.checkpoint.path,
        steps=int(state["step"]),
        seconds=time.perf_counter() - start,
        resumed_from=tuple(state["resumed_from"]),
        worker_nodes=tuple(state["nodes"]),
        run_path=result.path,
    )


def _load_checkpoint(cfg: TrainConfig, checkpoint):  # -> tuple[Explainer, dict]
    """The explainer with the checkpoint's head, and the state saved with it."""
    from safetensors.torch import load_file

    explainer = build_explainer(cfg)
    with checkpoint.as_directory() as d:
        explainer.head.load_state_dict(load_file(os.path.join(d, HEAD_FILE)))
        state = json.loads(Path(d, STATE_FILE).read_text())
    return explainer, state
