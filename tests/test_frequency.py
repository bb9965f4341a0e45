"""Precondition-frequency schedules, LR multipliers and ``PreconditionFrequencyScheduler``."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo import Shampoo, configure_shampoo
from lightning_shampoo.callbacks import PreconditionFrequencyScheduler
from lightning_shampoo.callbacks.frequency import refresh_counts
from lightning_shampoo.schedules import (
    AdaptiveFrequency,
    ConstantFrequency,
    LogFrequency,
    MilestoneFrequency,
    WarmupConstant,
    WarmupCosine,
    WarmupLinear,
    make_frequency_schedule,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*log_every_n_steps")


# ------------------------------------------------------------------------------- pure schedules


def refresh_steps(schedule, start: int, steps: int) -> list[int]:
    """The optimizer's refresh rule applied to a schedule."""
    out = []
    for s in range(1, steps + 1):
        f = schedule(s)
        if (s % f == 0 and s > start) or s == start:
            out.append(s)
    return out


def test_constant_and_milestones() -> None:
    assert [ConstantFrequency(7)(s) for s in (1, 100)] == [7, 7]
    m = MilestoneFrequency([(3, 2), (10, 5)])
    assert [m(s) for s in (1, 2, 3, 9, 10, 50)] == [None, None, 2, 2, 5, 5]
    for bad in ([], [(3, 2), (3, 4)], [(5, 2), (3, 4)], [(1, 0)], [(-1, 2)], [(1, 2, 3)]):
        with pytest.raises(ValueError, match="milestones"):
            MilestoneFrequency(bad)
    with pytest.raises(ValueError, match="frequency"):
        ConstantFrequency(0)


def test_log_frequency_values_and_even_spacing() -> None:
    log = LogFrequency(min_frequency=1, max_frequency=64, refreshes_per_phase=8)
    expected = {1: 1, 15: 1, 16: 2, 31: 2, 32: 4, 64: 8, 128: 16, 256: 32, 511: 32, 512: 64, 5000: 64}
    assert {s: log(s) for s in expected} == expected
    steps = refresh_steps(log, start=1, steps=1024)
    # phase 0 refreshes every step up to 15, then 8 refreshes per doubling, then the cap
    assert len(steps) == 15 + 8 * 6 + 1
    phases: dict[int, list[int]] = {}
    for s in steps:
        phases.setdefault(log(s), []).append(s)
    for f, at in phases.items():
        assert all(b - a == f for a, b in itertools.pairwise(at)), (f, at)
    assert LogFrequency(min_frequency=10, max_frequency=100, refreshes_per_phase=4)(79) == 10
    assert LogFrequency(min_frequency=10, max_frequency=100, refreshes_per_phase=4)(80) == 20
    with pytest.raises(ValueError, match="max_frequency"):
        LogFrequency(min_frequency=4, max_frequency=2)


def test_make_frequency_schedule_specs() -> None:
    assert make_frequency_schedule(5) == ConstantFrequency(5)
    assert make_frequency_schedule([(0, 2)]) == MilestoneFrequency([(0, 2)])
    assert make_frequency_schedule("log") == LogFrequency()
    assert make_frequency_schedule("adaptive") == AdaptiveFrequency()

    def fn(step: int) -> int:
        return 3

    assert make_frequency_schedule(fn) is fn
    for bad in ("often", 2.5, None):
        with pytest.raises(ValueError, match="schedule"):
            make_frequency_schedule(bad)
    with pytest.raises(ValueError, match="tolerance"):
        AdaptiveFrequency(tolerance=-1.0)


def test_lr_multipliers_closed_form() -> None:
    cos = WarmupCosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [cos(s) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(10) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    lin = WarmupLinear(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [lin(s) for s in (0, 4, 6, 10)] == pytest.approx([0.5, 1 - 0.9 * 0.25, 1 - 0.9 * 0.5, 0.1])
    assert [WarmupConstant(total_steps=10, warmup_steps=4)(s) for s in (0, 3, 9)] == pytest.approx(
        [0.25, 1, 1]
    )
    assert WarmupCosine(total_steps=5)(0) == 1.0  # no warmup: the first step runs at the base LR
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(total_steps=5, warmup_steps=6)


# ------------------------------------------------------------------------- without Lightning


def small_problem(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Linear(16, 8)
    x = torch.randn(128, 16)
    return model, x, x @ torch.randn(16, 8)


def test_apply_sets_groups_and_reports_due() -> None:
    model, x, y = small_problem()
    optimizer = configure_shampoo(model, "shampoo")
    assert isinstance(optimizer, Shampoo)
    scheduler = PreconditionFrequencyScheduler([(1, 2), (5, 3)], start_preconditioning_step=2)
    due = []
    for _ in range(9):
        due.append(scheduler.apply(optimizer))
        assert all(g["start_preconditioning_step"] == 2 for g in optimizer.param_groups)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert [s for s, d in enumerate(due, start=1) if d] == [2, 4, 6, 9]
    assert all(g["precondition_frequency"] == 3 for g in optimizer.param_groups)
    assert all(g.get("refresh_tolerance") is None for g in optimizer.param_groups)
    weight = next(h for h in optimizer.health() if h.param_name == "weight")
    assert (weight.refreshes, weight.last_refresh_step) == (4, 9)

    def broken(step: int) -> int:
        return 0

    with pytest.raises(ValueError, match="frequency schedule returned 0"):
        PreconditionFrequencyScheduler(broken).apply(optimizer)
    with pytest.raises(ValueError, match="start_preconditioning_step"):
        PreconditionFrequencyScheduler(5, start_preconditioning_step=0)


# ----------------------------------------------------------------------------- with Lightning


class Regression(pl.LightningModule):
    def __init__(self, preconditioner: str = "shampoo") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(16, 8)
        self.preconditioner = preconditioner

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return configure_shampoo(self, self.preconditioner, lr=1e-3)


class Probe(pl.Callback):
    """Per optimizer step: the group values the step used and the refresh counter after it."""

    def __init__(self) -> None:
        self.frequency: dict[int, int] = {}
        self.tolerance: dict[int, float | None] = {}
        self.refreshed: list[int] = []
        self._done = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        group = optimizer.param_groups[-1]  # the Shampoo (matrix) group
        step = group.get("step", 0) + 1
        self.frequency[step] = group["precondition_frequency"]
        self.tolerance[step] = group.get("refresh_tolerance")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        done = int(refresh_counts(optimizer)[0])
        if done > self._done:
            self.refreshed.append(optimizer.param_groups[-1]["step"])
        self._done = done


def fit(model: pl.LightningModule, callbacks: list, steps: int, **kwargs) -> pl.Trainer:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    data = TensorDataset(x, x @ torch.randn(16, 8, generator=g))
    kwargs.setdefault("logger", False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    return trainer


@pytest.mark.parametrize(
    ("schedule", "start", "frequencies", "refreshed"),
    [
        ([(1, 2), (6, 3)], 2, {1: 2, 5: 2, 6: 3, 12: 3}, [2, 4, 6, 9, 12]),
        (lambda s: 1 if s < 5 else 4, 1, {1: 1, 4: 1, 5: 4, 12: 4}, [1, 2, 3, 4, 8, 12]),
        (
            LogFrequency(min_frequency=1, max_frequency=4, refreshes_per_phase=2),
            1,
            {s: LogFrequency(1, 4, 2)(s) for s in range(1, 13)},
            [1, 2, 3, 4, 6, 8, 12],
        ),
    ],
    ids=["milestones", "callable", "log"],
)
def test_scheduler_sets_frequency_per_step_in_training(schedule, start, frequencies, refreshed) -> None:
    probe = Probe()
    scheduler = PreconditionFrequencyScheduler(schedule, start_preconditioning_step=start)
    trainer = fit(Regression(), [scheduler, probe], steps=12)
    assert {s: probe.frequency[s] for s in frequencies} == frequencies
    assert probe.refreshed == refreshed
    assert scheduler.refreshes == len(refreshed)  # one amortized block (the weight)
    assert scheduler.refreshes_skipped == 0
    assert trainer.optimizers[0].param_groups[-1]["start_preconditioning_step"] == start


def test_adaptive_skips_refreshes_of_a_slowly_changing_problem(tmp_path: Path) -> None:
    probe = Probe()
    scheduler = PreconditionFrequencyScheduler(
        AdaptiveFrequency(tolerance=0.05, check_every=4), start_preconditioning_step=4
    )
    trainer = fit(
        Regression("eigen"),
        [scheduler, probe],
        steps=40,
        logger=CSVLogger(tmp_path, name="adaptive"),
        log_every_n_steps=1,
    )
    assert set(probe.frequency.values()) == {4} and set(probe.tolerance.values()) == {0.05}
    # refresh checks at steps 4, 8, ..., 40: the first refreshes (the block was never refreshed),
    # later ones find the eigenbasis still diagonalising the factor
    assert scheduler.refreshes >= 1 and scheduler.refreshes_skipped > 0
    assert scheduler.refreshes + scheduler.refreshes_skipped == 10
    records = [h for h in trainer.optimizers[0].health() if h.param_name == "layer.weight"]
    assert (records[0].refreshes, records[0].skipped_refreshes) == (
        scheduler.refreshes,
        scheduler.refreshes_skipped,
    )
    assert probe.refreshed[0] == 4
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("shampoo/refreshes")]
    assert [int(r["step"]) + 1 for r in rows] == list(range(4, 41, 4))
    last = rows[-1]
    assert float(last["shampoo/refreshes"]) == scheduler.refreshes
    assert float(last["shampoo/refreshes_skipped"]) == scheduler.refreshes_skipped
    assert float(last["shampoo/precondition_frequency"]) == 4

    restored = PreconditionFrequencyScheduler("adaptive")
    restored.load_state_dict(scheduler.state_dict())
    assert (restored.refreshes, restored.refreshes_skipped) == (
        scheduler.refreshes,
        scheduler.refreshes_skipped,
    )
