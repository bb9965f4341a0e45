"""``PreconditionFrequencyScheduler``: when Shampoo refreshes its preconditioners, step by step.

Before each training batch it writes ``precondition_frequency`` (and optionally
``start_preconditioning_step``, and ``refresh_tolerance`` for the adaptive schedule) into every
param group of every ``Shampoo``, evaluated at the optimizer step about to run (the group's
``step + 1``, so gradient accumulation and several optimizers are handled). After a step on which
a refresh was due it reads the optimizer's per-block counters and reports block refreshes done
and skipped (cumulative): attributes ``refreshes`` / ``refreshes_skipped`` and, written to the
trainer's loggers at each such step (at the step of the batch's training metrics, whatever the
trainer's ``log_every_n_steps``), ``shampoo/refreshes``, ``shampoo/refreshes_skipped`` and
``shampoo/precondition_frequency``. Reading counters synchronises with the device, so it happens
only on refresh steps, which synchronise anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from .._checks import describe, require_bool, require_int, require_str
from .._refresh import is_refresh_step
from ..optim import Shampoo
from ..schedules import AdaptiveFrequency, FrequencySchedule, FrequencyScheduleSpec, make_frequency_schedule
from ._logging import write_metrics

__all__ = ["PreconditionFrequencyScheduler", "refresh_counts"]


def refresh_counts(optimizer: Shampoo) -> torch.Tensor:
    """``[done, skipped]`` block refreshes of the blocks this process holds (one device sync)."""
    return torch.tensor(optimizer.refresh_counts(), dtype=torch.int64)


class PreconditionFrequencyScheduler(pl.Callback):
    """Set Shampoo's ``precondition_frequency`` per step from a schedule.

    Args:
        schedule: an int (constant), ``[(step, frequency), ...]`` milestones, ``"log"`` (frequent
            early, sparse later; ``LogFrequency``), ``"adaptive"`` (check every few steps, refresh
            only blocks whose factors drifted; ``AdaptiveFrequency``), any of the schedule objects
            of ``lightning_shampoo.schedules``, or a callable ``step -> int`` (``None`` keeps the
            group's value).
        start_preconditioning_step: also set this in every group (``None``: leave it).
        log_metrics: write the refresh counters to the trainer's loggers on refresh steps.
        prefix: metric namespace.
        only: manage only these optimizers (a live sequence, read at every step; ``None``: every
            ``Shampoo`` of the trainer).
    """

    def __init__(
        self,
        schedule: FrequencyScheduleSpec = "log",
        start_preconditioning_step: int | float | None = None,
        *,
        log_metrics: bool = True,
        prefix: str = "shampoo",
        only: Sequence[Shampoo] | None = None,
    ) -> None:
        self.schedule: FrequencySchedule = make_frequency_schedule(schedule)
        start = start_preconditioning_step
        require_int("start_preconditioning_step", start, low=1, allow_inf=True, allow_none=True)
        require_bool("log_metrics", log_metrics)
        require_str("prefix", prefix)
        if only is not None and not (
            isinstance(only, Sequence) and all(isinstance(o, Shampoo) for o in only)
        ):
            raise ValueError(f"only must be None or a sequence of Shampoo optimizers, got {describe(only)}")
        self.start_preconditioning_step = start
        self.log_metrics = log_metrics
        self.prefix = prefix
        self.only = only
        #: Cumulative block refreshes done / skipped (by the drift test) over all Shampoo optimizers.
        self.refreshes = 0
        self.refreshes_skipped = 0
        self._counts: dict[int, tuple[int, int]] = {}  # optimizer index -> (done, skipped)
        self._pending: dict[int, int] = {}  # optimizer index -> its step count before a due step

    @property
    def tolerance(self) -> float | None:
        """The adaptive schedule's ``refresh_tolerance`` (``None`` for the others)."""
        return self.schedule.tolerance if isinstance(self.schedule, AdaptiveFrequency) else None

    def apply(self, optimizer: Shampoo) -> bool:
        """Write the values for ``optimizer``'s next step into its groups; return whether a
        refresh is due on it (usable without Lightning: call it before each ``step``)."""
        due = False
        tolerance = self.tolerance
        for group in optimizer.param_groups:
            step = int(group.get("step", 0)) + 1
            frequency = self.schedule(step)
            if frequency is not None:
                if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
                    raise ValueError(
                        f"the frequency schedule returned {frequency!r} at step {step}; need an int >= 1"
                    )
                group["precondition_frequency"] = frequency
            if self.start_preconditioning_step is not None:
                group["start_preconditioning_step"] = self.start_preconditioning_step
            if tolerance is not None:
                group["refresh_tolerance"] = tolerance
            frequency, start = group["precondition_frequency"], group["start_preconditioning_step"]
            # The unstaggered grid: staggered blocks refresh between its steps, and the counters
            # read after a grid step are cumulative, so they include those refreshes.
            due = due or is_refresh_step(step, frequency, start)
        return due

    # ----------------------------------------------------------------------------- lightning

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for index, optimizer in self._shampoos(trainer):
            if self.apply(optimizer):
                self._pending.setdefault(index, _step(optimizer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        optimizers = dict(self._shampoos(trainer))
        stepped = [
            i for i, before in self._pending.items() if i in optimizers and _step(optimizers[i]) > before
        ]
        if not stepped:
            return  # gradient accumulation: the optimizer has not stepped yet
        for index in stepped:
            del self._pending[index]
            optimizer = optimizers[index]
            counts = refresh_counts(optimizer)
            if optimizer.sharded:  # each rank counted its own blocks
                counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum")
            done, skipped = (int(v) for v in counts.tolist())
            self._counts[index] = (done, skipped)
        self.refreshes = sum(d for d, _ in self._counts.values())
        self.refreshes_skipped = sum(s for _, s in self._counts.values())
        if self.log_metrics:
            first = optimizers[min(optimizers)]
            write_metrics(
                trainer,
                {
                    f"{self.prefix}/refreshes": float(self.refreshes),
                    f"{self.prefix}/refreshes_skipped": float(self.refreshes_skipped),
                    f"{self.prefix}/precondition_frequency": float(
                        first.param_groups[0]["precondition_frequency"]
                    ),
                },
            )

    def _shampoos(self, trainer: pl.Trainer) -> list[tuple[int, Shampoo]]:
        """``(index in trainer.optimizers, optimizer)`` of the optimizers this callback manages."""
        managed = [
            (i, opt)
            for i, opt in enumerate(trainer.optimizers)
            if isinstance(opt, Shampoo) and (self.only is None or any(opt is o for o in self.only))
        ]
        return managed

    def state_dict(self) -> dict[str, Any]:
        return {
            "refreshes": self.refreshes,
            "refreshes_skipped": self.refreshes_skipped,
            "counts": {str(i): list(c) for i, c in self._counts.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refreshes = int(state_dict.get("refreshes", 0))
        self.refreshes_skipped = int(state_dict.get("refreshes_skipped", 0))
        self._counts = {int(i): (int(c[0]), int(c[1])) for i, c in state_dict.get("counts", {}).items()}


def _step(optimizer: Shampoo) -> int:
    return max((int(group.get("step", 0)) for group in optimizer.param_groups), default=0)
