"""PSGD-Kron's deterministic update schedule, bitwise resume and config validation."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from helpers import make_batches, small_model, train
from torch import Tensor, nn

from lightning_shampoo import (
    AdamPreconditionerConfig,
    PSGDKronPreconditionerConfig,
    PSGDUpdateProbabilitySchedule,
    Shampoo,
)
from lightning_shampoo.preconditioners import make_preconditioner
from lightning_shampoo.preconditioners.psgd_kron import PSGDKronPreconditioner


def _kernel(shape: tuple[int, ...], **kwargs: Any) -> PSGDKronPreconditioner:
    kernel = make_preconditioner(PSGDKronPreconditionerConfig(**kwargs), shape, "test")
    assert isinstance(kernel, PSGDKronPreconditioner)
    return kernel


# ------------------------------------------------------------------------------ update schedule


def _due_steps(kernel: PSGDKronPreconditioner, steps: range) -> list[int]:
    return [s for s in steps if kernel.update_due(s)]


def test_update_schedule_is_a_deterministic_credit_counter() -> None:
    assert _due_steps(_kernel((4,), preconditioner_update_probability=0.25), range(1, 30)) == list(
        range(1, 30, 4)
    )
    assert _due_steps(_kernel((4,), preconditioner_update_probability=1.0), range(1, 50)) == list(
        range(1, 50)
    )
    assert _due_steps(_kernel((4,), preconditioner_update_probability=0.0), range(1, 50)) == []
    assert (
        len(_due_steps(_kernel((4,), preconditioner_update_probability=0.1), range(1, 1001))) == 101
    )  # 1, 10, 20, …
    schedule = PSGDUpdateProbabilitySchedule()
    sequential = _kernel((4,))
    due = _due_steps(sequential, range(1, 4001))
    assert due[:200] == list(range(1, 201))  # flat start: every step
    expected = 1 + sum(schedule(s) for s in range(1, 4001))
    assert abs(len(due) - expected) <= 1
    assert 0.025 < len([s for s in due if s > 3500]) / 500 < 0.036  # decayed to about 0.03
    # A fresh kernel (as after a resume) asked from step 2500 on, or one asked out of order,
    # makes exactly the same decisions: they are a function of the step alone.
    fresh = _kernel((4,))
    assert _due_steps(fresh, range(2500, 4001)) == [s for s in due if s >= 2500]
    assert _due_steps(fresh, range(100, 300)) == [s for s in due if 100 <= s < 300]


def test_schedule_returning_an_invalid_probability_raises() -> None:
    kernel = _kernel((4,), preconditioner_update_probability=lambda step: 1.5)
    with pytest.raises(ValueError, match="preconditioner_update_probability"):
        kernel.update_due(1)


def test_optimizer_fits_exactly_on_scheduled_steps() -> None:
    model = nn.Linear(5, 4, bias=False)
    config = PSGDKronPreconditionerConfig(preconditioner_update_probability=0.3)
    opt = Shampoo(model.parameters(), lr=0.01, preconditioner_config=config)
    kernel = opt.buckets[0].kernel
    assert isinstance(kernel, PSGDKronPreconditioner)
    gen = torch.Generator().manual_seed(2)
    changed = []
    for step in range(1, 21):
        before = [t.clone() for t in opt.state[opt.buckets[0].key]["precond"].values()] if step > 1 else None
        model.weight.grad = torch.randn(4, 5, generator=gen)
        opt.step()
        after = list(opt.state[opt.buckets[0].key]["precond"].values())
        if before is not None and any(not torch.equal(x, y) for x, y in zip(before, after)):
            changed.append(step)
    assert changed == [s for s in range(2, 21) if kernel.update_due(s)]
    assert len(changed) == 6  # steps 4, 7, 10, 14, 17, 20 (credit 0.3 per step)


# ---------------------------------------------------------------------------------- checkpoint

RESUME_CASES: dict[str, dict[str, Any]] = {
    "default_schedule": dict(
        preconditioner_config=PSGDKronPreconditionerConfig(
            preconditioner_update_probability=PSGDUpdateProbabilitySchedule(
                flat_steps=3, decay=0.3, min_probability=0.25
            )
        ),
        betas=(0.9, 1.0),
        weight_decay=0.01,
    ),
    "eq_bf16": dict(
        preconditioner_config=PSGDKronPreconditionerConfig(
            mode="EQ", preconditioner_update_probability=0.4, preconditioner_dtype=torch.bfloat16
        ),
        betas=(0.9, 1.0),
    ),
    "quad_whiten_momentum": dict(
        preconditioner_config=PSGDKronPreconditionerConfig(
            mode="QUAD",
            whiten_grad=False,
            init_scale=1.0,
            cache_preconditioner=False,
            preconditioner_update_probability=0.5,
        ),
        betas=(0.8, 1.0),
        grafting_config=AdamPreconditionerConfig(),
        momentum=0.5,
    ),
}


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _flat_state(opt: Shampoo) -> dict[tuple[int, str], Tensor]:
    return {(p, k): v for p, entry in opt.state_dict()["state"].items() for k, v in entry.items()}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bitwise(case: str) -> None:
    k, n = 6, 9
    batches = make_batches(k + n, seed=4)
    kwargs = dict(lr=0.01, **RESUME_CASES[case])
    reference = small_model()
    ref_opt = Shampoo(reference.named_parameters(), **kwargs)
    train(reference, ref_opt, batches)

    first = small_model()
    first_opt = Shampoo(first.named_parameters(), **kwargs)
    train(first, first_opt, batches[:k])
    checkpoint = _round_trip({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    resumed = small_model(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = Shampoo(resumed.named_parameters(), **kwargs)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, batches[k:])

    for (name, a), (_, b) in zip(reference.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    ref_state, resumed_state = _flat_state(ref_opt), _flat_state(resumed_opt)
    assert ref_state.keys() == resumed_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value.nan_to_num(), resumed_state[key].nan_to_num()), key
    assert any(key[1].endswith("precond.q.0") for key in ref_state)
    # Q was fitted after the resume (the schedule is not all-or-nothing).
    kernel = ref_opt.buckets[0].kernel
    assert isinstance(kernel, PSGDKronPreconditioner)
    assert any(kernel.update_due(s) for s in range(k + 1, k + n + 1))
    assert not all(kernel.update_due(s) for s in range(k + 1, k + n + 1))


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "QEQ"),
        ("preconditioner_lr", 0.0),
        ("preconditioner_lr", 1.5),
        ("lipschitz_beta", 1.0),
        ("lipschitz_beta", -0.1),
        ("damping", 0.0),
        ("whiten_grad", 1),
        ("preconditioner_update_probability", 1.5),
        ("preconditioner_update_probability", -0.1),
        ("init_scale", 0.0),
        ("init_scale", math.inf),
        ("max_size_triangular", 0),
        ("max_skew", -1.0),
        ("min_ndim_triangular", 0),
        ("memory_save_mode", "some_diag"),
        ("preconditioner_dtype", torch.float16),
        ("max_update_rms", 0.0),
        ("cache_preconditioner", "yes"),
        ("health_interval", 0),
    ],
)
def test_invalid_config_values_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        PSGDKronPreconditionerConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_probability", -0.1), ("max_probability", 1.5), ("decay", -1.0), ("flat_steps", -1)],
)
def test_invalid_schedule_values_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        PSGDUpdateProbabilitySchedule(**{field: value})


def test_config_is_frozen_and_copyable() -> None:
    config = PSGDKronPreconditionerConfig(mode="EQ")
    with pytest.raises(AttributeError):
        config.mode = "QUAD"  # type: ignore[misc]
    assert copy.deepcopy(config) == config
