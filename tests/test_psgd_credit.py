"""PSGD-Kron's update credit in closed form: bit-identical to the step-by-step counter, and a
resumed kernel decides exactly what an uninterrupted one does, without replaying the schedule."""

from __future__ import annotations

import random

import pytest

from lightning_shampoo import PSGDKronPreconditionerConfig, PSGDUpdateProbabilitySchedule
from lightning_shampoo.preconditioners import make_preconditioner
from lightning_shampoo.preconditioners.psgd_kron import PSGDKronPreconditioner

UNIT = 1 << 32


def _prefix_sums(schedule: PSGDUpdateProbabilitySchedule, steps: int) -> list[int]:
    """``[Σ_{t=1..s} round(p(t)·2³²) for s in 0..steps]``, as the kernel's counter adds them."""
    sums = [0]
    for t in range(1, steps + 1):
        sums.append(sums[-1] + round(schedule(t) * UNIT))
    return sums


def _schedules() -> list[PSGDUpdateProbabilitySchedule]:
    rng = random.Random(0)
    fixed = [
        PSGDUpdateProbabilitySchedule(),
        PSGDUpdateProbabilitySchedule(decay=0.0),
        PSGDUpdateProbabilitySchedule(max_probability=0.5, min_probability=0.5),
        PSGDUpdateProbabilitySchedule(min_probability=0.0, decay=0.05, flat_steps=3),
        PSGDUpdateProbabilitySchedule(max_probability=0.0, min_probability=0.0),
        PSGDUpdateProbabilitySchedule(decay=1e-4, flat_steps=0),
    ]
    drawn = []
    for _ in range(12):
        high = rng.random()
        drawn.append(
            PSGDUpdateProbabilitySchedule(
                max_probability=high,
                min_probability=high * rng.random(),
                decay=10 ** rng.uniform(-4, 0),
                flat_steps=rng.randint(0, 50),
            )
        )
    return fixed + drawn


@pytest.mark.parametrize(
    "schedule",
    _schedules(),
    ids=lambda s: f"p{s.max_probability:.2g}-{s.min_probability:.2g}-decay{s.decay:.2g}-flat{s.flat_steps}",
)
def test_closed_form_credit_equals_the_step_by_step_sum(schedule: PSGDUpdateProbabilitySchedule) -> None:
    sums = _prefix_sums(schedule, 12_345)
    for steps in (0, 1, 2, 3, 4, 50, 51, 199, 200, 201, 3707, 3708, 12_345):
        assert schedule.credit(steps, UNIT) == sums[steps], steps


def _kernel(schedule: object) -> PSGDKronPreconditioner:
    config = PSGDKronPreconditionerConfig(preconditioner_update_probability=schedule)  # type: ignore[arg-type]
    kernel = make_preconditioner(config, (4, 3), "test")
    assert isinstance(kernel, PSGDKronPreconditioner)
    return kernel


def test_resumed_kernel_decides_like_an_uninterrupted_one() -> None:
    schedule = PSGDUpdateProbabilitySchedule(decay=0.002, flat_steps=20)
    sequential = _kernel(schedule)
    decisions = [sequential.update_due(s) for s in range(1, 6001)]
    for resume in (1, 21, 700, 2500, 5000):
        resumed = _kernel(schedule)
        assert [resumed.update_due(s) for s in range(resume, 6001)] == decisions[resume - 1 :]
    # An arbitrary callable (here the same schedule, unrecognised) replays and agrees too.
    replayed = _kernel(lambda step: schedule(step))
    assert [replayed.update_due(s) for s in range(2500, 6001)] == decisions[2499:]


def test_resume_far_out_does_not_replay_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = PSGDUpdateProbabilitySchedule()
    calls = 0

    def counting(self: PSGDUpdateProbabilitySchedule, step: int) -> float:
        nonlocal calls
        calls += 1
        return float(self.min_probability)

    kernel = _kernel(schedule)
    monkeypatch.setattr(PSGDUpdateProbabilitySchedule, "__call__", counting)
    kernel.update_due(10**9)
    kernel.update_due(10**9 + 1)
    assert calls == 2  # one per step: the jump itself is the closed form
