"""Train a P-TAME head with Ray Train: data-parallel over the head, data streamed by Ray Data.

The method itself is :meth:`ptame.explainer.Explainer.training_step`; this package only scales it
out. One :class:`TrainConfig` goes in (``train_loop_config=asdict(cfg)`` and rebuilt in each
worker), one :class:`TrainResult` comes out of :func:`train`. Its parts:

- :mod:`~ptame.train.config`: the settings and the result, and what both sides derive from them;
- :mod:`~ptame.train.feed`: the prepared Parquet data (``image`` bytes) read with Ray Data, decoded,
  resized and augmented on CPU, sharded equally across workers (undecodable rows are dropped with a
  logged warning naming them, never crash the run);
- :mod:`~ptame.train.worker`: each worker's loop (DDP over the head, AdamW with a one-cycle schedule);
- :mod:`~ptame.train.checkpoints`: rank 0's checkpoints every ``checkpoint_every`` steps, which a
  restarted worker group (``FailureConfig(max_failures)``) resumes from without repeating or
  skipping a step, and the final one saved as the explainer;
- :mod:`~ptame.train.driver`: :func:`train`: the run directory (a fingerprint of the settings and
  data: a killed job resumes, a finished one is reused, anything changed starts afresh), Ray, the fit.
"""

from ptame.train.config import HEAD_INITS, LOSS_TERMS, TrainConfig, TrainResult
from ptame.train.driver import train

__all__ = ["HEAD_INITS", "LOSS_TERMS", "TrainConfig", "TrainResult", "train"]
