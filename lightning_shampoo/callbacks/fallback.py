"""``SGDFallback``: take failing preconditioner blocks off-line, retry them, bring them back.

The optimizer only detects and records numerical trouble per block (mechanism); this callback
decides what to do about it (policy). Every ``check_every_n_steps`` it reads every block's health
— the same table on every rank, from one summed collective, so every rank takes the same
decisions — and:

* switches a block whose refresh failed since the last check (its failure count grew), whose
  root is non-finite (infinite condition number) or whose condition number exceeds
  ``max_condition_number`` to ``target`` (``"sgd"``: the filtered gradient; ``"grafting"``: the
  group's grafting direction, or SGD where the group has no ``grafting_config``);
* ``retry_after`` steps later asks for an off-schedule refresh with the block's damping
  multiplied by ``epsilon_multiplier`` (compounding over retries);
* returns the block to preconditioning once a retry succeeded (its last refresh step advanced,
  its failure count did not, its condition number is acceptable), or, after ``max_retries``
  failed retries, leaves it in fallback for good.

Training never stops for any of it; every switch is logged (python ``logging`` on rank 0), and
the counters go to the trainer's loggers every ``log_every_n_steps`` (the trainer's by default),
written directly at the step of the batch's training metrics like the health monitor's figures.
The state lives in the checkpoint (plain values only).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl

from .._checks import (
    MAX_EPSILON_SCALE,
    clamp_epsilon_scale,
    require_choice,
    require_float,
    require_int,
    require_str,
)
from ..health import BlockHealth
from ..optim import Shampoo
from ._health_table import gather_trainer_health, local_block_keys, shampoo_optimizers
from ._logging import cadence, is_due, write_metrics

__all__ = ["FallbackRecord", "SGDFallback"]

log = logging.getLogger(__name__)

Key = tuple[int, int, int]  # (optimizer index, param index, block index)


@dataclass
class FallbackRecord:
    """One block in fallback: why, since when, and where its retries stand."""

    optimizer: int
    param_index: int
    block_index: int
    param_name: str
    mode: str
    reason: str
    since_step: int
    retries: int = 0
    next_retry_step: int = 0
    epsilon_scale: float = 1.0
    pending: bool = False  # a retry was requested and has not been judged yet
    baseline_refresh_step: int = -1  # the block's last refresh step when the retry was requested
    baseline_failures: int = 0
    gave_up: bool = False

    @property
    def key(self) -> Key:
        return (self.optimizer, self.param_index, self.block_index)


class SGDFallback(pl.Callback):
    """Per-block fallback from a failing preconditioner to SGD or the grafting direction.

    Args:
        target: ``"grafting"`` (the group's grafting direction; SGD where there is none) or ``"sgd"``.
        max_condition_number: also switch blocks whose damped factors are worse conditioned than
            this. ``None`` (default) disables the test: rank-deficient factors legitimately
            reach ``κ ≈ 1 + 1/ε_rtol`` under the presets' relative damping (``λ_max / ε``
            with an absolute ``ε`` alone) without harm.
        retry_after: steps between a switch (or failed retry) and the next retry.
        epsilon_multiplier: factor applied to the block's damping at each retry.
        max_retries: failed retries after which the block stays in fallback.
            ``epsilon_multiplier ** max_retries`` may not exceed ``MAX_EPSILON_SCALE`` (1e30, the
            cap on a block's damping multiplier, which compounding retries reach by themselves).
        check_every_n_steps: how often health is read (it synchronises with the device).
        log_every_n_steps: how often the counters go to the loggers (``None``: the trainer's
            ``log_every_n_steps``).
        prefix: metric namespace of the counters.
    """

    def __init__(
        self,
        target: Literal["sgd", "grafting"] = "grafting",
        max_condition_number: float | None = None,
        retry_after: int = 50,
        epsilon_multiplier: float = 10.0,
        max_retries: int = 3,
        check_every_n_steps: int = 10,
        log_every_n_steps: int | None = None,
        prefix: str = "shampoo",
    ) -> None:
        require_choice("target", target, ("sgd", "grafting"))
        require_float("max_condition_number", max_condition_number, low=1.0, low_open=True, allow_none=True)
        require_int("retry_after", retry_after, low=1)
        require_float("epsilon_multiplier", epsilon_multiplier, low=1.0)
        require_int("max_retries", max_retries, low=0)
        if max_retries * math.log10(epsilon_multiplier) > math.log10(MAX_EPSILON_SCALE):
            raise ValueError(
                f"epsilon_multiplier ** max_retries = {epsilon_multiplier:g}^{max_retries} exceeds the "
                f"damping cap {MAX_EPSILON_SCALE:g} (MAX_EPSILON_SCALE: the damped factor must stay within "
                "float32's range); lower epsilon_multiplier or max_retries"
            )
        require_int("check_every_n_steps", check_every_n_steps, low=1)
        require_str("prefix", prefix)
        require_int("log_every_n_steps", log_every_n_steps, low=1, allow_none=True)
        self.target = target
        self.max_condition_number = max_condition_number
        self.retry_after = retry_after
        self.epsilon_multiplier = epsilon_multiplier
        self.max_retries = max_retries
        self.check_every_n_steps = check_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.records: dict[Key, FallbackRecord] = {}
        self.counters = {"switches": 0, "retries": 0, "recoveries": 0, "gave_up": 0}
        self._seen_failures: dict[Key, int] = {}
        self._last_step = -1

    @property
    def blocks_in_fallback(self) -> list[Key]:
        return sorted(self.records)

    # ----------------------------------------------------------------------------- lightning

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step:
            return  # a gradient-accumulation batch that did not step
        self._last_step = step
        optimizers = shampoo_optimizers(trainer.optimizers)
        if not optimizers:
            return
        if step % self.check_every_n_steps == 0:
            for index, optimizer in optimizers:
                records = gather_trainer_health(trainer, optimizer).records
                self._check(trainer, index, optimizer, records, step)
        if not is_due(trainer, cadence(trainer, self.log_every_n_steps)):
            return
        p = self.prefix
        write_metrics(
            trainer,
            {
                f"{p}/fallback_switches": float(self.counters["switches"]),
                f"{p}/fallback_retries": float(self.counters["retries"]),
                f"{p}/fallback_recoveries": float(self.counters["recoveries"]),
                f"{p}/fallback_gave_up": float(self.counters["gave_up"]),
                f"{p}/blocks_in_fallback": float(len(self.records)),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": [asdict(r) for r in self.records.values()],
            "counters": dict(self.counters),
            "seen_failures": [[*key, count] for key, count in self._seen_failures.items() if count],
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        records = [FallbackRecord(**r) for r in state_dict.get("records", [])]
        self.records = {r.key: r for r in records}
        self.counters.update(state_dict.get("counters", {}))
        self._seen_failures = {(o, p, b): c for o, p, b, c in state_dict.get("seen_failures", [])}
        self._last_step = int(state_dict.get("last_step", -1))

    # ------------------------------------------------------------------------------- policy

    def _ill(self, h: BlockHealth) -> str | None:
        """Why a refreshed block's spectrum is unacceptable (``None`` if it is fine)."""
        if any(math.isinf(c) for c in h.condition_numbers):
            return "non-finite inverse root (singular factor)"
        limit = self.max_condition_number
        if limit is not None and h.max_condition_number > limit:
            return f"condition number {h.max_condition_number:.3g} > {limit:.3g}"
        return None

    def _check(
        self, trainer: pl.Trainer, index: int, optimizer: Shampoo, records: list[BlockHealth], step: int
    ) -> None:
        say = trainer.is_global_zero
        local = local_block_keys(optimizer)
        switch: dict[str, list[tuple[int, int]]] = {}
        restore: list[tuple[int, int]] = []
        retry: dict[float, list[tuple[int, int]]] = {}
        for h in records:
            key = (index, *h.key)
            seen = self._seen_failures.get(key, 0)
            self._seen_failures[key] = h.failure_count
            record = self.records.get(key)
            if record is None:
                if not h.condition_numbers:
                    continue  # diagonal blocks have no refresh to fail
                failed = f"failures {seen} -> {h.failure_count} (a refresh or its direction failed)"
                reason = failed if h.failure_count > seen else self._ill(h)
                if reason is None:
                    continue
                record = self._switch(optimizer, h, index, reason, step, say)
                switch.setdefault(record.mode, []).append(h.key)
                continue
            if record.gave_up:
                continue
            if record.pending:
                if h.failure_count > record.baseline_failures or (
                    h.last_refresh_step > record.baseline_refresh_step and self._ill(h)
                ):
                    self._retry_failed(record, h, step, say)
                elif h.last_refresh_step > record.baseline_refresh_step:
                    del self.records[key]
                    restore.append(h.key)
                    self.counters["recoveries"] += 1
                    if say:
                        log.info(
                            "Shampoo block %s of %s is preconditioned again after %d retr%s (epsilon x%g)",
                            h.block_index,
                            h.param_name,
                            record.retries,
                            "y" if record.retries == 1 else "ies",
                            record.epsilon_scale,
                        )
                continue  # no refresh since the request yet: keep waiting
            if step >= record.next_retry_step:
                record.retries += 1
                record.epsilon_scale = clamp_epsilon_scale(h.epsilon_scale * self.epsilon_multiplier)
                record.pending = True
                record.baseline_refresh_step = h.last_refresh_step
                record.baseline_failures = h.failure_count
                retry.setdefault(record.epsilon_scale, []).append(h.key)
                self.counters["retries"] += 1
        # Every rank decided the same for every block; each applies it to the blocks it holds.
        for mode, blocks in switch.items():
            if mine := [b for b in blocks if b in local]:
                optimizer.set_fallback(mine, mode)
        if mine := [b for b in restore if b in local]:
            optimizer.set_fallback(mine, None)
        for scale, blocks in retry.items():
            if mine := [b for b in blocks if b in local]:
                optimizer.request_refresh(mine, epsilon_scale=scale)

    def _switch(
        self, optimizer: Shampoo, h: BlockHealth, index: int, reason: str, step: int, say: bool
    ) -> FallbackRecord:
        mode = self.target
        note = ""
        then = f"retry in {self.retry_after} steps" if self.max_retries else "no retries: it stays there"
        if mode == "grafting" and optimizer.param_groups[h.group].get("grafting_config") is None:
            mode, note = "sgd", " (its param group has no grafting_config, so SGD)"
        record = FallbackRecord(
            optimizer=index,
            param_index=h.param_index,
            block_index=h.block_index,
            param_name=h.param_name,
            mode=mode,
            reason=reason,
            since_step=step,
            next_retry_step=step + self.retry_after,
            epsilon_scale=h.epsilon_scale,
        )
        self.records[record.key] = record
        self.counters["switches"] += 1
        if self.max_retries == 0:
            record.gave_up = True
            self.counters["gave_up"] += 1
        if say:
            log.warning(
                "Shampoo block %s of %s switched to %s fallback at step %d: %s%s; %s",
                h.block_index,
                h.param_name,
                mode,
                step,
                reason,
                note,
                then,
            )
        return record

    def _retry_failed(self, record: FallbackRecord, h: BlockHealth, step: int, say: bool) -> None:
        record.pending = False
        if record.retries >= self.max_retries:
            record.gave_up = True
            self.counters["gave_up"] += 1
            if say:
                log.warning(
                    "Shampoo block %s of %s stays in %s fallback: %d retries failed (last epsilon x%g)",
                    h.block_index,
                    h.param_name,
                    record.mode,
                    record.retries,
                    record.epsilon_scale,
                )
            return
        record.next_retry_step = step + self.retry_after
        if say:
            log.info(
                "Shampoo block %s of %s: retry %d failed; next retry at step %d",
                h.block_index,
                h.param_name,
                record.retries,
                record.next_retry_step,
            )
