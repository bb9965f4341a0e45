"""Writing a callback's figures to the trainer's loggers at a cadence of its own.

``pl_module.log`` from a callback hands the figures to Lightning's result collection, which writes
them only on the trainer's own logging steps and repeats the last value on later ones: a monitor
with another cadence loses figures or shows stale ones. Like Lightning's ``LearningRateMonitor``,
the callbacks here write straight to ``trainer.loggers`` with an explicit step — the step
Lightning's training metrics of the same batch carry, so the curves line up — and put the latest
figures in ``trainer.callback_metrics`` (for ``EarlyStopping``/``ModelCheckpoint(monitor=...)``)
and, if asked, the progress bar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["batches_that_stepped", "cadence", "is_due", "write_metrics"]


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """Training batches that stepped before this one: the step Lightning writes this batch's
    training metrics at (called from ``on_train_batch_end``, before the loop counts the batch).
    It is the unit of ``Trainer(log_every_n_steps)`` and survives a resume."""
    loop = trainer.fit_loop.epoch_loop
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def cadence(trainer: pl.Trainer, every: int | None) -> int:
    """``every``, or the trainer's ``log_every_n_steps`` for ``None`` (0: never)."""
    return every if every is not None else int(getattr(trainer, "log_every_n_steps", 0) or 0)


def is_due(trainer: pl.Trainer, every: int) -> bool:
    """Whether this batch is a logging step of a cadence of ``every`` stepping batches (call it
    from ``on_train_batch_end`` of a batch whose optimizer stepped). Same rule as Lightning's
    ``log_every_n_steps``, so equal cadences log on the same batches."""
    return every > 0 and (batches_that_stepped(trainer) + 1) % every == 0


def write_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], *, prog_bar: bool = False) -> None:
    """Write ``metrics`` to every logger at this batch's step (loggers write on rank 0 only), and
    make them the latest ``trainer.callback_metrics`` (and progress-bar figures with ``prog_bar``)."""
    if not metrics:
        return
    step = batches_that_stepped(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
    if prog_bar:
        trainer.progress_bar_metrics.update({k: float(v) for k, v in metrics.items()})
