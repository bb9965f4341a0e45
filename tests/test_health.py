"""``Shampoo.health()``: per-block records read from state (no recomputation) and ``summarize``."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import bucket_full
from torch import Tensor, nn

from lightning_shampoo import (
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
)
from lightning_shampoo.health import BlockHealth, summarize

_REAL_EIGH = torch.linalg.eigh


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3))


def _train(model: nn.Module, opt: Shampoo, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 10, generator=g), torch.randn(32, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _make(model: nn.Module, **kwargs) -> Shampoo:
    base = dict(lr=0.01, betas=(0.9, 0.99), epsilon=1e-3, max_preconditioner_dim=16, precondition_frequency=3)
    base.update(kwargs)
    return Shampoo(model.named_parameters(), **base)


def _state(opt: Shampoo) -> dict[tuple[str, str, str], Tensor]:
    return {
        (key, section, name): value.clone()
        for key, bucket in opt.state.items()
        for section, tensors in bucket.items()
        for name, value in tensors.items()
    }


def test_records_per_block_with_names_shapes_and_kind():
    model = _model()
    opt = _make(model, grafting_config=AdamPreconditionerConfig())
    assert opt.health() == []  # no state before the first step
    _train(model, opt, 4)
    records = opt.health()
    assert all(isinstance(r, BlockHealth) for r in records)
    # 0.weight 24x10 -> (16,10), (8,10); 0.bias 24 -> (16,), (8,); 2.weight 3x24 -> (3,16), (3,8); 2.bias (3,)
    expected = {
        ("0.weight", 0): (16, 10),
        ("0.weight", 1): (8, 10),
        ("0.bias", 0): (16,),
        ("0.bias", 1): (8,),
        ("2.weight", 0): (3, 16),
        ("2.weight", 1): (3, 8),
        ("2.bias", 0): (3,),
    }
    assert {(r.param_name, r.block_index): r.shape for r in records} == expected
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    for r in records:
        assert r.param_index == index[r.param_name]
        assert r.key == (r.param_index, r.block_index)
        assert r.group == 0
        assert r.preconditioner == "shampoo_root_inv"
        assert r.step == 4
        assert r.last_refresh_step == 3
        assert r.steps_since_refresh == 1
        assert len(r.condition_numbers) == len(r.shape)
        assert r.failure_count == 0 and r.nonfinite_count == 0
        assert r.fallback is None and r.epsilon_scale == 1.0
    soap_model = _model()
    soap = _make(soap_model, preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig())
    _train(soap_model, soap, 1)
    assert {r.preconditioner for r in soap.health()} == {"soap"}


def test_condition_numbers_match_the_factor_eigenvalues():
    model = _model()
    eps = 1e-3
    opt = _make(model, epsilon=eps)
    _train(model, opt, 6)  # refreshed at step 6, read right after: factors unchanged since
    bc2 = 1 - 0.99**6
    checked = 0
    for r in opt.health():
        assert r.last_refresh_step == 6
        for dim, (cond, lo, hi) in enumerate(zip(r.condition_numbers, r.min_eigenvalues, r.max_eigenvalues)):
            plan = next(p for p in opt.buckets if r.key in p.rows())
            row = plan.rows().index(r.key)
            factor = bucket_full(opt.state[plan.key]["precond"][f"factor.{dim}"])[row].double() / bc2
            values = torch.linalg.eigvalsh(factor)
            lam = values.clamp_min(0)
            expected = float((lam.max() + eps) / (lam.min() + eps))
            assert cond == pytest.approx(expected, rel=1e-4), (r.key, dim)
            assert lo == pytest.approx(float(values.min()), rel=1e-3, abs=1e-6)
            assert hi == pytest.approx(float(values.max()), rel=1e-4)
            assert r.max_condition_number >= cond
            checked += 1
    assert checked == 11  # two factors per 2-D block, one per 1-D block
    # The 1-D blocks have rank <= the number of steps seen: condition numbers grow with 1/eps.
    assert max(r.max_condition_number for r in opt.health()) > 10


def test_coupled_newton_reports_nan_eigenvalues():
    model = _model()
    config = RootInvShampooPreconditionerConfig(amortized_computation_config=CoupledNewtonConfig())
    opt = _make(model, preconditioner_config=config)
    _train(model, opt, 3)
    for r in opt.health():
        assert r.last_refresh_step == 3
        assert all(math.isnan(c) for c in r.condition_numbers)
        assert math.isnan(r.max_condition_number)


def test_failures_nonfinite_fallback_and_summary(monkeypatch):
    model = _model()
    opt = _make(model)
    _train(model, opt, 3)  # refreshed at 3
    first = model[0].weight
    # Non-finite gradient in block 1 of 0.weight (rows 16..23) on step 4.
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    first.grad[20, 0] = math.nan
    opt.step()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    _train(model, opt, 2, seed=5)  # steps 5, 6: the refresh at 6 fails for every block
    monkeypatch.setattr(torch.linalg, "eigh", _REAL_EIGH)
    opt.set_fallback([(0, 0)], "sgd")
    opt.request_refresh([(2, 1)], epsilon_scale=3.0)
    records = {r.key: r for r in opt.health()}
    assert records[(0, 1)].nonfinite_count == 1
    assert sum(r.nonfinite_count for r in records.values()) == 1
    assert all(r.failure_count == 1 and r.last_refresh_step == 3 for r in records.values())
    assert records[(0, 0)].fallback == "sgd"
    assert records[(2, 1)].epsilon_scale == 3.0
    assert all(r.steps_since_refresh == 3 for r in records.values())

    summary = summarize(list(records.values()))
    conds = sorted(c for r in records.values() for c in r.condition_numbers)
    assert summary["blocks"] == 7.0
    assert summary["condition_number_max"] == conds[-1]
    assert summary["condition_number_median"] == conds[len(conds) // 2]
    assert summary["min_eigenvalue"] == min(v for r in records.values() for v in r.min_eigenvalues)
    assert summary["max_eigenvalue"] == max(v for r in records.values() for v in r.max_eigenvalues)
    assert summary["failures"] == 7.0
    assert summary["nonfinite_grads"] == 1.0
    assert summary["blocks_in_fallback"] == 1.0
    empty = summarize([])
    assert empty["blocks"] == 0.0 and math.isnan(empty["condition_number_max"])


def test_health_does_not_change_optimizer_state():
    model = _model()
    opt = _make(model, grafting_config=AdamPreconditionerConfig(), momentum=0.5)
    _train(model, opt, 4)
    before = _state(opt)
    groups = [dict(g) for g in opt.param_groups]
    for _ in range(2):
        opt.health()
    after = _state(opt)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert value.dtype == after[key].dtype
        same_nan = torch.equal(value.isnan(), after[key].isnan()) if value.is_floating_point() else True
        assert same_nan and torch.equal(value.nan_to_num(), after[key].nan_to_num()), key
    assert [dict(g) for g in opt.param_groups] == groups
