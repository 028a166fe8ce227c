"""What each Ray Train worker runs: build the explainer, wrap the head in DDP, step through its shard.

Every worker builds the same :class:`~ptame.explainer.Explainer`; only the head is wrapped in DDP
(``ray.train.torch.prepare_model``), the frozen backbone and auxiliary stay plain modules. AdamW
(AMSGrad) with a one-cycle schedule stepped per batch, as in the paper. Rank 0 checkpoints every
``checkpoint_every`` steps (:mod:`ptame.train.checkpoints`); a restarted worker group resumes from
the latest checkpoint and never repeats or skips a step. Ray Train pickles
:func:`train_loop_per_worker` by reference: it stays a module-level function of this module.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch

from ptame.heartbeat import Heartbeat
from ptame.precision import choose_precision, precision_for
from ptame.train.checkpoints import restore_state, save_state
from ptame.train.config import LOSS_TERMS, TrainConfig, build_explainer
from ptame.train.feed import ShardImages

__all__ = ["train_loop_per_worker"]

logger = logging.getLogger(__package__)


def _inject_fault(marker: str, step: int) -> None:
    """Testing only: die once (the marker file prevents a second death after the restart)."""
    import pyarrow.fs as pafs

    import ray.train
    from ray.train import CheckpointConsistencyMode

    fs, path = pafs.FileSystem.from_uri(marker)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return
    with fs.open_output_stream(path) as f:
        f.write(str(step).encode())
    # The controller collects reports every few seconds; wait for it so that the checkpoint just
    # reported is the one the restart resumes from (a real crash may lose the latest report).
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    logger.warning("fail_at_step=%d: this worker exits now (fault injection for tests)", step)
    os._exit(1)
def _worker_logging() -> None:
    """Progress lines of rank 0 reach the driver through the worker's stderr."""
    log = logging.getLogger("ptame")
    log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
def _mean_terms(values: torch.Tensor) -> list[list[float]]:
    """Rows of loss terms averaged over the workers, reduced where they live, then read once.

    A collective when a process group is up (every rank calls it): NCCL refuses CPU tensors, so the
    reduction runs on the worker's device and only the result is copied to the host.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values.cpu().tolist()
class _LossLog:
    """Loss terms of the logged steps, kept on the device until :meth:`flush` reduces them all in one
    collective: a per-step history without a host sync or a collective in every step."""

    def __init__(self) -> None:
        self._terms: list[torch.Tensor] = []
        self._rows: list[dict[str, float]] = []
        self._keep: list[bool] = []

    def add(self, out: dict[str, torch.Tensor], row: dict[str, float], keep: bool = True) -> None:
        """Queue this step's terms; ``row`` (step, lr, ...) gets them at the flush; ``keep=False``:
        reported with a checkpoint but not part of the history."""
        self._terms.append(torch.stack([out[k].detach().float() for k in LOSS_TERMS]))
        self._rows.append(row)
        self._keep.append(keep)

    def flush(self) -> tuple[list[dict[str, float]], dict[str, float]]:
        """``(history rows, terms of the latest step)``; a collective: every rank calls it at the same step."""
        if not self._terms:
            return [], {}
        values = _mean_terms(torch.stack(self._terms))
        rows = [{"step": row["step"], **dict(zip(LOSS_TERMS, v)), **row} for row, v in zip(self._rows, values)]
        kept = [r for r, keep in zip(rows, self._keep) if keep]
        self._terms, self._rows, self._keep = [], [], []
        return kept, {k: rows[-1][k] for k in (*LOSS_TERMS, "lr")}
def _prepare_worker(cfg: TrainConfig, total: int, device: torch.device, precision):
    """The explainer with its head wrapped for DDP, and the optimiser, schedule and grad scaler."""
    import ray.train.torch

    torch.manual_seed(cfg.seed)  # the same initial head on every worker
    explainer = build_explainer(cfg).to(device)
    head = explainer.head
    if cfg.num_workers > 1 and device.type == "cuda":
        head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(head)
    # Only the head trains, so only the head is wrapped in DDP and the explainer calls the
    # wrapper; backbone and auxiliary stay plain frozen modules. On CPU, BatchNorm statistics are
    # per worker (SyncBatchNorm needs GPUs) and DDP broadcasts rank 0's running statistics.
    explainer.head = ray.train.torch.prepare_model(head)
    explainer.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    return explainer, head, optimizer, scheduler, scaler


class _Progress:
    """Rank 0's progress lines: on logged steps, about 20 per run, with the throughput since the first
    step (start-up excluded), and a heartbeat line every ~30 s between them."""

    def __init__(self, cfg: TrainConfig, total: int, world: int, first_step: int) -> None:
        self.every = cfg.log_every * max(1, total // 20 // cfg.log_every)  # progress lines on logged steps
        self.total, self.first_step, self.images_per_step = total, first_step, cfg.batch_size * world
        self.started = self.first_done = time.perf_counter()
        self.heartbeat = Heartbeat(total, self.images_per_step, first_step)

    def elapsed(self) -> float:
        """Seconds since this worker group started training."""
        return time.perf_counter() - self.started

    def due(self, step: int) -> bool:
        """Whether ``step`` gets a progress line (its loss terms are read then)."""
        return step % self.every == 0 or step == self.total

    def tick(self, step: int, terms: dict[str, float], lr: float, show: bool) -> None:
        """After each step: progress and heartbeat lines where due, when ``show`` (rank 0)."""
        if step == self.first_step + 1:
            self.first_done = time.perf_counter()
        if not show:
            return
        due = self.due(step)
        if due:
            rate = (step - self.first_step - 1) * self.images_per_step / max(time.perf_counter() - self.first_done, 1e-9)
            logger.info("step %d/%d  loss %.4f (ce %.4f area %.4f tv %.4f deletion %.4f)  lr %.3g  %.1f img/s",
                        step, self.total, *(terms.get(k, float("nan")) for k in LOSS_TERMS), lr, rate)
        if line := self.heartbeat.tick(step, logged=due):
            logger.info("%s", line)


class _Worker:
    """One worker's run: the explainer, its optimiser, schedule and grad scaler, and the state a checkpoint keeps."""

    def __init__(self, cfg: TrainConfig, per_epoch: int, total: int, marker: str) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg, self.per_epoch, self.total, self.marker = cfg, per_epoch, total, marker
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if cfg.cpus_per_worker:
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.device = device = ray.train.torch.get_device()
        self.precision = (
            precision_for(cfg.amp, device, f"training worker {self.rank}:") if self.rank == 0 else choose_precision(cfg.amp, device)
        )
        self.explainer, self.head, self.optimizer, self.scheduler, self.scaler = _prepare_worker(cfg, total, device, self.precision)
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "epoch_step": 0, "history": [], "resumed_from": []}
        self.losses = _LossLog()
        self.terms: dict[str, float] = {}  # of the latest step read
        self.last_reported = 0

    def resume(self) -> None:
        """Continue from the latest checkpoint when Ray Train restarted the worker group."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                self.state = restore_state(d, self.head, self.optimizer, self.scheduler, self.scaler, self.device)
            self.state["resumed_from"].append(self.state["step"])
            if self.rank == 0:
                logger.warning("resuming from the checkpoint at step %d of %d", self.state["step"], self.total)
        self.last_reported = self.state["step"]

    def locate(self) -> None:
        """Record the node of every worker (a collective) and log the layout on rank 0."""
        import ray
        import torch.distributed as dist

        nodes = [ray.get_runtime_context().get_node_id()] * self.world
        if self.world > 1:
            dist.all_gather_object(nodes, nodes[0])
        self.state["nodes"] = nodes
        if self.rank == 0:
            logger.info("%d worker(s) on %d node(s), device %s, %d torch thread(s) each, steps %d..%d", self.world,
                        len(set(nodes)), self.device, torch.get_num_threads(), self.state["step"] + 1, self.total)

    def run(self, shard: ShardImages) -> None:
        """Step through the shard until ``epochs`` or the planned steps are done."""
        state = self.state
        self.progress = _Progress(self.cfg, self.total, self.world, state["step"])
        while state["epoch"] < self.cfg.epochs and state["step"] < self.total:
            # A resumed epoch continues with the batches it still owes (cached: the same ones; streamed:
            # a fresh pass, as Ray Data streams in no fixed order): no step is ever done twice.
            for images in shard.epoch(state["epoch"], state["epoch_step"], self.per_epoch):
                self._after_step(*self._step(images))
                if state["epoch_step"] >= self.per_epoch or state["step"] >= self.total:
                    break
            state["epoch"] += 1
            state["epoch_step"] = 0

    def _step(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """One optimiser step on a batch: its loss terms and the learning rate it used."""
        images = images.to(self.device, non_blocking=True)
        with self.precision.autocast(self.device):
            out = self.explainer.training_step(images)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.state["step"] += 1
        self.state["epoch_step"] += 1
        return out, lr

    def _after_step(self, out: dict[str, torch.Tensor], lr: float) -> None:
        """Queue the step's terms where logged or checkpointed, log progress, checkpoint, inject the test fault."""
        cfg, step, total = self.cfg, self.state["step"], self.total
        log, save = step % cfg.log_every == 0 or step == total, step % cfg.checkpoint_every == 0 or step == total
        if log or save:
            self.losses.add(out, {"step": step, "lr": lr, "elapsed": self.progress.elapsed()}, keep=log)
        if save or self.progress.due(step):  # the only steps that read the terms: one collective for all queued
            rows, self.terms = self.losses.flush()
            self.state["history"].extend(rows)
        self.progress.tick(step, self.terms, lr, show=self.rank == 0)
        if save:
            self._report(self.terms)
        if cfg.fail_at_step == step and self.rank == self.world - 1:
            _inject_fault(self.marker, step)

    def _report(self, terms: dict[str, float]) -> None:
        """All ranks report the metrics (a barrier); rank 0 attaches the checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                save_state(d, self.head, self.optimizer, self.scheduler, self.scaler, self.state)
                ckpt = ray.train.Checkpoint.from_directory(d)
            metrics = {"step": self.state["step"], "epoch": self.state["epoch"], **terms}
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{self.state['step']:07d}")
        self.last_reported = self.state["step"]

    def finish(self) -> dict[str, Any]:
        """Read the steps still queued and report the last one if not yet checkpointed; the final state."""
        rows, last = self.losses.flush()  # queued steps after the last flush (the data ran short)
        self.state["history"].extend(rows)
        if self.state["step"] != self.last_reported:  # the data ran short of the planned steps (dropped rows)
            self._report(last or self.terms)
        return self.state


def train_loop_per_worker(raw: dict[str, Any]) -> dict[str, Any]:
    """The per-worker loop: Ray Data shard in, DDP steps, checkpoints out; resumes a restarted run."""
    import ray.train

    per_epoch, total, marker, cache = (raw.pop(k) for k in ("_steps_per_epoch", "_total_steps", "_marker", "_cache"))
    cfg = TrainConfig(**raw)
    _worker_logging()
    worker = _Worker(cfg, per_epoch, total, marker)
    worker.resume()
    worker.locate()
    worker.run(ShardImages(ray.train.get_dataset_shard("train"), cfg, worker.rank, cache))
    return worker.finish()
