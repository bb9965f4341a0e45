"""Checkpoints: keyed by (parameter, block), loadable with ``weights_only=True``, and a resumed
run continues bitwise like an uninterrupted one."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from lightning_shampoo import (
    AdamPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    KLShampooPreconditionerConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "root_inv": dict(
        preconditioner_config=RootInvShampooPreconditionerConfig(),
        grafting_config=AdamPreconditionerConfig(),
        betas=(0.9, 0.99),
        beta3=0.8,
        momentum=0.5,
        use_nesterov=True,
        weight_decay=0.01,
    ),
    "soap": dict(preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig(), betas=(0.9, 0.95)),
    "soap_qr": dict(
        preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig(
            amortized_computation_config=QREigendecompositionConfig()
        ),
        betas=(0.9, 0.95),
    ),
    "kl": dict(
        preconditioner_config=KLShampooPreconditionerConfig(eigenvalue_correction=True),
        grafting_config=AdamPreconditionerConfig(),
        betas=(0.9, 0.99),
    ),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3))


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)) for _ in range(steps)]


def _train(model: nn.Module, opt: Shampoo, batches) -> None:
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _make(model: nn.Module, **kwargs) -> Shampoo:
    base = dict(lr=0.02, epsilon=1e-8, max_preconditioner_dim=16, precondition_frequency=3)
    base.update(kwargs)
    return Shampoo(model.named_parameters(), **base)


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _flat_state(opt: Shampoo) -> dict[tuple[int, str], torch.Tensor]:
    return {(p, k): v.clone() for p, entry in opt.state_dict()["state"].items() for k, v in entry.items()}


def _assert_states_equal(a: Shampoo, b: Shampoo, *, exact: bool = True) -> None:
    sa, sb = _flat_state(a), _flat_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if exact:
            same_nan = torch.equal(sa[key].isnan(), sb[key].isnan())
            assert same_nan and torch.equal(sa[key].nan_to_num(), sb[key].nan_to_num()), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-7, equal_nan=True, msg=str(key))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_is_bitwise(name):
    k, n = 5, 6
    batches = _data(k + n)
    kwargs = CONFIGS[name]

    reference = _model()
    ref_opt = _make(reference, **kwargs)
    _train(reference, ref_opt, batches)

    first = _model()
    first_opt = _make(first, **kwargs)
    _train(first, first_opt, batches[:k])
    checkpoint = _round_trip({"model": first.state_dict(), "optimizer": first_opt.state_dict()})

    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = _make(resumed, **kwargs)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.param_groups[0]["step"] == k
    _train(resumed, resumed_opt, batches[k:])

    for (name_a, a), (name_b, b) in zip(reference.named_parameters(), resumed.named_parameters()):
        assert name_a == name_b
        assert torch.equal(a, b), name_a
    _assert_states_equal(ref_opt, resumed_opt)
    assert ref_opt.param_groups[0]["step"] == resumed_opt.param_groups[0]["step"] == k + n
    # The run actually preconditioned: refreshes happened after the resume.
    assert all(r.last_refresh_step == 9 for r in resumed_opt.health())


def test_state_dict_is_keyed_by_param_and_block():
    model = _model()
    opt = _make(model, **CONFIGS["root_inv"])
    _train(model, opt, _data(2))
    sd = opt.state_dict()
    # Six params (40x12, 40, 40x40, 40, 3x40, 3) in blocks of at most 16: 3, 3, 9, 3, 3, 1 blocks.
    assert sorted(sd["state"]) == list(range(6))
    for pidx, entry in sd["state"].items():
        assert all(key.startswith("block_") for key in entry)
        blocks = {int(key.split(".")[0][len("block_") :]) for key in entry}
        assert blocks == set(range([3, 3, 9, 3, 3, 1][pidx])), pidx
        for b in blocks:
            sections = {key.split(".")[1] for key in entry if key.startswith(f"block_{b}.")}
            assert sections == {"precond", "graft", "moments", "status"}
    # The weight 40x40 in blocks of 16: 3x3 = 9 blocks; factor.0 of a 16x16 block is 16x16, stored
    # as its upper triangle (use_symmetric_packing, Distributed Shampoo's default): 136 numbers.
    assert {int(k.split(".")[0][6:]) for k in sd["state"][2]} == set(range(9))
    assert sd["state"][2]["block_0.precond.factor.0"].shape == (16 * 17 // 2,)
    assert sd["state"][2]["block_8.precond.factor.0"].shape == (8 * 9 // 2,)
    # No bucket names anywhere in the checkpoint, and no config objects.
    text = repr(sd)
    assert "g0.b" not in text
    assert "preconditioner_config" not in sd["param_groups"][0]
    assert sd["param_groups"][0]["params"] == list(range(6))


def test_bucketed_checkpoint_loads_into_unbucketed_optimizer():
    # float64 throughout: batched and single-matrix float32 kernels round differently (~1e-7),
    # which a few ill-conditioned refreshes amplify; in float64 any loading mistake stands out.
    k, n = 4, 5
    batches = [(x.double(), y.double()) for x, y in _data(k + n)]
    wide = RootInvShampooPreconditionerConfig(
        factor_matrix_dtype=torch.float64, inv_factor_matrix_dtype=torch.float64
    )
    kwargs = dict(CONFIGS["root_inv"], preconditioner_config=wide)
    reference = _model().double()
    ref_opt = _make(reference, use_bucketing=True, **kwargs)
    _train(reference, ref_opt, batches)

    first = _model().double()
    first_opt = _make(first, use_bucketing=True, **kwargs)
    _train(first, first_opt, batches[:k])
    checkpoint = _round_trip({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    resumed = _model(seed=7).double()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = _make(resumed, use_bucketing=False, **kwargs)
    assert len(resumed_opt.buckets) == 22 and len(first_opt.buckets) == 11
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, batches[k:])
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert float((a - b).detach().norm() / b.detach().norm()) <= 1e-6
    _assert_states_equal(ref_opt, resumed_opt, exact=False)
    # And back: the unbucketed run's checkpoint loads into a bucketed optimizer.
    again = _make(_model().double(), use_bucketing=True, **kwargs)
    again.load_state_dict(_round_trip(resumed_opt.state_dict()))
    _assert_states_equal(again, resumed_opt)


def test_mismatched_max_preconditioner_dim_raises():
    model = _model()
    opt = _make(model, max_preconditioner_dim=16)
    _train(model, opt, _data(2))
    checkpoint = _round_trip(opt.state_dict())
    other = _make(_model(), max_preconditioner_dim=32)
    before = dict(other.param_groups[0])
    with pytest.raises(ValueError, match="max_preconditioner_dim"):
        other.load_state_dict(checkpoint)
    # The failed load left the optimizer as it was.
    assert other.param_groups[0]["max_preconditioner_dim"] == 32
    assert {k: v for k, v in other.param_groups[0].items()} == before


def test_mismatched_param_count_raises():
    model = _model()
    opt = _make(model)
    _train(model, opt, _data(1))
    checkpoint = _round_trip(opt.state_dict())
    smaller = nn.Linear(12, 40)
    other = Shampoo(smaller.parameters(), lr=0.02, max_preconditioner_dim=16)
    with pytest.raises(ValueError, match="params"):
        other.load_state_dict(checkpoint)
    two_groups = _model()
    params = list(two_groups.parameters())
    other = Shampoo([{"params": params[:2]}, {"params": params[2:]}], lr=0.02, max_preconditioner_dim=16)
    with pytest.raises(ValueError, match="param groups"):
        other.load_state_dict(checkpoint)


def test_changed_preconditioner_config_raises():
    model = _model()
    opt = _make(model, preconditioner_config=RootInvShampooPreconditionerConfig())
    _train(model, opt, _data(1))
    checkpoint = _round_trip(opt.state_dict())
    other = _make(_model(), preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig())
    with pytest.raises(ValueError, match="missing from the state_dict"):
        other.load_state_dict(checkpoint)


def test_counters_lr_fallback_and_epsilon_scale_survive():
    kwargs = dict(CONFIGS["root_inv"], precondition_frequency=4)
    model = _model()
    opt = _make(model, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    batches = _data(8)
    for batch in batches[:5]:  # scheduled refresh at step 4
        _train(model, opt, [batch])
        scheduler.step()
    opt.set_fallback([(2, 0), (2, 4)], "sgd")
    opt.set_fallback([(4, 0)], "grafting")
    opt.request_refresh([(0, 1)], epsilon_scale=10.0)
    _train(model, opt, batches[5:6])  # step 6: only block (0, 1) refreshes, off schedule
    scheduler.step()
    opt.request_refresh([(2, 3)], epsilon_scale=4.0)  # still pending at save time
    checkpoint = _round_trip({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()})

    fresh_model = _model()
    fresh_model.load_state_dict(model.state_dict())
    fresh = _make(fresh_model, **kwargs)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh, step_size=2, gamma=0.5)
    fresh.load_state_dict(checkpoint["optimizer"])
    fresh_scheduler.load_state_dict(checkpoint["scheduler"])
    group = fresh.param_groups[0]
    assert group["step"] == 6
    assert group["lr"] == pytest.approx(0.02 * 0.5**3)
    assert group["initial_lr"] == 0.02
    assert group["betas"] == (0.9, 0.99) and isinstance(group["betas"], tuple)
    records = {r.key: r for r in fresh.health()}
    assert records[(2, 0)].fallback == "sgd" and records[(2, 4)].fallback == "sgd"
    assert records[(4, 0)].fallback == "grafting"
    assert sum(r.fallback is not None for r in records.values()) == 3
    assert records[(0, 1)].epsilon_scale == 10.0
    assert records[(0, 1)].last_refresh_step == 6
    assert records[(2, 3)].epsilon_scale == 4.0
    assert all(r.epsilon_scale == 1.0 for key, r in records.items() if key not in {(0, 1), (2, 3)})
    assert all(r.last_refresh_step == 4 for key, r in records.items() if key != (0, 1))
    # Both continue identically, including the pending refresh request and the fallbacks.
    for batch in batches[6:7]:
        _train(model, opt, [batch])
        scheduler.step()
        _train(fresh_model, fresh, [batch])
        fresh_scheduler.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    refreshed = {r.key: r.last_refresh_step for r in fresh.health()}
    assert refreshed[(2, 3)] == 7 and refreshed[(0, 1)] == 6 and refreshed[(0, 0)] == 4
    _assert_states_equal(opt, fresh)


def test_layout_flags_must_match_and_empty_state_loads():
    model = _model()
    opt = _make(model)
    empty = _round_trip(opt.state_dict())  # before the first step: no state yet
    assert empty["state"] == {}
    other = _make(_model(), use_merge_dims=False)
    with pytest.raises(ValueError, match="use_merge_dims"):
        other.load_state_dict(empty)
    twin_model = _model()
    twin = _make(twin_model)
    twin.load_state_dict(empty)
    batches = _data(4)
    _train(model, opt, batches)
    _train(twin_model, twin, batches)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
