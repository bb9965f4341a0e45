"""Numerical trouble never stops training: failed refreshes, non-finite and huge gradients,
per-block fallbacks and off-schedule refreshes, closures, missing and frozen gradients."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import bucket_full, is_symmetric, row_full
from torch import Tensor, nn

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    KLShampooPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SGDPreconditionerConfig,
    Shampoo,
)

_REAL_EIGH = torch.linalg.eigh

# W: 64x48 in blocks of 32 -> block 0 = W[:32, :32], 1 = W[:32, 32:], 2 = W[32:, :32], 3 = W[32:, 32:].
# V: 32x32 -> one block, bucketed with W's blocks 0 and 2.
W_BLOCKS = {
    0: (slice(0, 32), slice(0, 32)),
    1: (slice(0, 32), slice(32, 48)),
    2: (slice(32, 64), slice(0, 32)),
    3: (slice(32, 64), slice(32, 48)),
}

CONFIGS: dict[str, dict[str, Any]] = {
    "root_inv": dict(
        preconditioner_config=RootInvShampooPreconditionerConfig(),
        grafting_config=AdamPreconditionerConfig(),
        momentum=0.5,
        weight_decay=0.01,
    ),
    "eigendecomposed": dict(preconditioner_config=EigendecomposedShampooPreconditionerConfig()),
    "soap": dict(preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig()),
    "kl": dict(
        preconditioner_config=KLShampooPreconditionerConfig(eigenvalue_correction=True),
        grafting_config=AdamPreconditionerConfig(),
    ),
}
# State that a refresh writes (the "preconditioner"), and health figures that may be nan by design.
_REFRESHED = ("root.", "eigenvectors.", "eigenvalues.")
_HEALTH = ("condition_number.", "min_eigenvalue.", "max_eigenvalue.", "drift")


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(64, 48, generator=g)), nn.Parameter(torch.randn(32, 32, generator=g))]


def _grads(steps: int, seed: int = 1) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(64, 48, generator=g), torch.randn(32, 32, generator=g)] for _ in range(steps)]


def _make(params, **kwargs) -> Shampoo:
    base: dict[str, Any] = dict(lr=0.01, betas=(0.9, 0.99), epsilon=1e-6, max_preconditioner_dim=32)
    base.update(kwargs)
    return Shampoo(params, **base)


def _step(opt: Shampoo, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


def _snapshot(opt: Shampoo) -> dict[tuple[int, str], Tensor]:
    """Every block's state, symmetric matrices as full ``[d, d]`` whether stored packed or not."""
    return {
        (p, k): (row_full(v) if is_symmetric(k) else v).clone()
        for p, entry in opt.state_dict()["state"].items()
        for k, v in entry.items()
    }


def _block_state(snapshot, pidx: int, block: int) -> dict[str, Tensor]:
    prefix = f"block_{block}."
    return {k[len(prefix) :]: v for (p, k), v in snapshot.items() if p == pidx and k.startswith(prefix)}


def _equal(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality where nan equals nan (health figures are nan before a first refresh)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _is_refreshed_key(name: str) -> bool:
    key = name.split(".", 1)[1]
    return key.startswith(_REFRESHED)


def _assert_state_finite(opt: Shampoo) -> None:
    for (pidx, key), value in _snapshot(opt).items():
        if value.is_floating_point() and not key.split(".", 2)[2].startswith(_HEALTH):
            assert torch.isfinite(value).all(), (pidx, key)


# --------------------------------------------------------------------------- failed refreshes


class _BrokenEigh:
    """``torch.linalg.eigh`` that raises while ``active`` (for matrices above ``threshold`` only,
    if given), counting the calls it broke."""

    def __init__(self, threshold: float | None = None) -> None:
        self.active = True
        self.threshold = threshold
        self.broken = 0

    def __call__(self, a: Tensor, *args, **kwargs):
        if self.active and (self.threshold is None or bool(a.abs().amax() > self.threshold)):
            self.broken += 1
            raise torch.linalg.LinAlgError("injected failure")
        return _REAL_EIGH(a, *args, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eigh_always_failing_keeps_identity_and_counts(monkeypatch, name):
    broken = _BrokenEigh()
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    params = _params()
    initial = [p.detach().clone() for p in params]
    opt = _make(params, precondition_frequency=2, **CONFIGS[name])
    for grads in _grads(6):
        _step(opt, params, grads)
    assert broken.broken > 0
    for p, p0 in zip(params, initial):
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), p0)  # training went on
    for plan in opt.buckets:
        for key, value in opt.state[plan.key]["precond"].items():
            value = bucket_full(value) if is_symmetric(key) else value
            if key.startswith(("root.", "eigenvectors.")):
                eye = torch.eye(value.shape[-1], dtype=value.dtype).expand_as(value)
                assert torch.equal(value, eye), key  # identity: never refreshed successfully
    records = opt.health()
    assert len(records) == 5
    for r in records:
        assert r.failure_count == 3, r  # refreshes at steps 2, 4, 6
        assert r.last_refresh_step == -1
        assert all(math.isnan(c) for c in r.condition_numbers)
    _assert_state_finite(opt)


def test_refresh_recovers_after_failures_stop(monkeypatch):
    broken = _BrokenEigh()
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    params = _params()
    opt = _make(params, precondition_frequency=2, **CONFIGS["root_inv"])
    grads = _grads(8)
    for t in range(4):  # refreshes at 2 and 4 fail
        _step(opt, params, grads[t])
    broken.active = False
    for t in range(4, 6):  # the refresh at 6 succeeds
        _step(opt, params, grads[t])
    for r in opt.health():
        assert r.failure_count == 2
        assert r.last_refresh_step == 6
        assert all(math.isfinite(c) and c >= 1.0 for c in r.condition_numbers)
    for plan in opt.buckets:
        root = bucket_full(opt.state[plan.key]["precond"]["root.0"])
        assert not torch.equal(root, torch.eye(root.shape[-1]).expand_as(root))
    # Failure at the next refresh keeps the preconditioner of step 6, bit for bit.
    kept = {k: v for k, v in _snapshot(opt).items() if _is_refreshed_key(k[1])}
    broken.active = True
    for t in range(6, 8):
        _step(opt, params, grads[t])
    after = _snapshot(opt)
    for key, value in kept.items():
        assert _equal(after[key], value), key
    assert all(r.failure_count == 3 and r.last_refresh_step == 6 for r in opt.health())
    assert all(torch.isfinite(p).all() for p in params)


def test_one_failing_block_does_not_poison_its_bucket(monkeypatch):
    params = _params()
    opt = _make(params, precondition_frequency=2, betas=(0.0, 1.0))
    # W's block 2 sees gradients 1000x larger: its factors exceed the threshold, the others do not.
    broken = _BrokenEigh(threshold=1e5)
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    for grads in _grads(2):
        grads[0][W_BLOCKS[2]] *= 1000.0
        _step(opt, params, grads)
    records = {r.key: r for r in opt.health()}
    assert records[(0, 2)].failure_count == 1 and records[(0, 2)].last_refresh_step == -1
    for key, r in records.items():
        if key != (0, 2):
            assert r.failure_count == 0 and r.last_refresh_step == 2, key
    plan = next(p for p in opt.buckets if (0, 2) in p.rows())
    root = bucket_full(opt.state[plan.key]["precond"]["root.0"])
    row = plan.rows().index((0, 2))
    assert torch.equal(root[row], torch.eye(32))
    assert all(not torch.equal(root[i], torch.eye(32)) for i in range(root.shape[0]) if i != row)


# ------------------------------------------------------------------------ non-finite gradients


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_freezes_only_its_block(bad):
    params = _params()
    opt = _make(params, precondition_frequency=4, **CONFIGS["root_inv"])
    grads = _grads(6)
    for t in range(2):
        _step(opt, params, grads[t])
    # Step 3 (no refresh): one bad entry in W's block 3.
    before, w_before = _snapshot(opt), params[0].detach().clone()
    grads[2][0][40, 40] = bad
    _step(opt, params, grads[2])
    after, w_after = _snapshot(opt), params[0].detach()
    assert torch.equal(w_after[W_BLOCKS[3]], w_before[W_BLOCKS[3]])
    for b in (0, 1, 2):
        assert not torch.equal(w_after[W_BLOCKS[b]], w_before[W_BLOCKS[b]])
    frozen, moved = _block_state(before, 0, 3), _block_state(after, 0, 3)
    for key, value in frozen.items():
        if key == "status.nonfinite":
            assert int(moved[key]) == int(value) + 1
        else:
            assert _equal(moved[key], value), key
    for key in (
        "precond.factor.0",
        "graft.second_moment",
        "moments.filtered_grad",
        "moments.momentum_buffer",
    ):
        assert not torch.equal(_block_state(after, 0, 0)[key], _block_state(before, 0, 0)[key]), key

    # Step 4 (a refresh step): the whole of V is bad. Statistics and V stay; roots may refresh.
    before, v_before, w_before = _snapshot(opt), params[1].detach().clone(), params[0].detach().clone()
    grads[3][1][:] = bad
    _step(opt, params, grads[3])
    after = _snapshot(opt)
    assert torch.equal(params[1].detach(), v_before)
    assert not torch.equal(params[0].detach(), w_before)
    statistics = (
        "precond.factor.",
        "graft.",
        "moments.filtered_grad",
        "moments.momentum_buffer",
        "status.failures",
    )
    checked = 0
    for key, value in _block_state(before, 1, 0).items():
        if key.startswith(statistics):
            assert _equal(_block_state(after, 1, 0)[key], value), key
            checked += 1
    assert checked == 6  # two factors, the graft's second moment, filtered grad, momentum, failures
    for _ in range(2):
        _step(opt, params, grads[4])
    records = {r.key: r for r in opt.health()}
    assert records[(0, 3)].nonfinite_count == 1
    assert records[(1, 0)].nonfinite_count == 1
    assert all(r.nonfinite_count == 0 for k, r in records.items() if k not in {(0, 3), (1, 0)})
    assert all(torch.isfinite(p).all() for p in params)
    _assert_state_finite(opt)


@pytest.mark.parametrize("scale", [1e30, 3e17])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_huge_finite_gradient_leaves_state_finite(name, scale):
    params = _params()
    opt = _make(params, precondition_frequency=2, **CONFIGS[name])
    grads = _grads(6)
    grads[2][0][W_BLOCKS[1]] = scale
    grads[3][1].mul_(scale)
    for step_grads in grads:
        before = [p.detach().clone() for p in params]
        _step(opt, params, step_grads)
        _assert_state_finite(opt)
        assert all(torch.isfinite(p).all() for p in params)
        assert not torch.equal(params[0].detach()[W_BLOCKS[0]], before[0][W_BLOCKS[0]])  # training goes on


# --------------------------------------------------------------------------------- fallbacks


def test_fallback_sgd_grafting_and_back():
    kwargs = dict(
        lr=0.1, betas=(0.0, 1.0), precondition_frequency=1, grafting_config=AdaGradPreconditionerConfig()
    )
    params, twin = _params(), _params()
    opt, reference = _make(params, **kwargs), _make(twin, **kwargs)
    grads = _grads(5)
    squares = [torch.zeros(64, 48), torch.zeros(32, 32)]  # AdaGrad's sum of squares, as torch's Adagrad
    for t in range(2):
        _step(opt, params, grads[t])
        _step(reference, twin, grads[t])
        for s, g in zip(squares, grads[t]):
            s.addcmul_(g, g)
    opt.set_fallback([(0, 0), (0, 3)], "sgd")
    opt.set_fallback([(1, 0)], "grafting")
    assert {r.key: r.fallback for r in opt.health() if r.fallback} == {
        (0, 0): "sgd",
        (0, 3): "sgd",
        (1, 0): "grafting",
    }
    for t in range(2, 4):
        w_old, v_old = params[0].detach().clone(), params[1].detach().clone()
        _step(opt, params, grads[t])
        _step(reference, twin, grads[t])
        for s, g in zip(squares, grads[t]):
            s.addcmul_(g, g)
        g_w, g_v = grads[t]
        w, v = params[0].detach(), params[1].detach()
        for b in (0, 3):  # SGD: the update is -lr · (filtered) gradient, exactly
            assert torch.equal(w[W_BLOCKS[b]], w_old[W_BLOCKS[b]] + g_w[W_BLOCKS[b]] * -0.1)
        graft_direction = g_v / squares[1].sqrt().add_(1e-10)
        assert torch.equal(v, v_old + graft_direction * -0.1)
        for b in (1, 2):  # the other blocks keep Shampoo: as in a run without fallbacks
            assert torch.equal(w[W_BLOCKS[b]], twin[0].detach()[W_BLOCKS[b]])
    # Statistics kept updating during the fallback: the state equals the reference run's.
    state, ref_state = _snapshot(opt), _snapshot(reference)
    for key, value in ref_state.items():
        if key[1].endswith("status.fallback"):
            continue
        assert _equal(state[key], value), key
    opt.set_fallback([(0, 0), (0, 3), (1, 0)], None)
    assert all(r.fallback is None for r in opt.health())
    w_old, v_old = params[0].detach().clone(), params[1].detach().clone()
    tw_old, tv_old = twin[0].detach().clone(), twin[1].detach().clone()
    _step(opt, params, grads[4])
    _step(reference, twin, grads[4])
    torch.testing.assert_close(params[0].detach() - w_old, twin[0].detach() - tw_old, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(params[1].detach() - v_old, twin[1].detach() - tv_old, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="mode"):
        opt.set_fallback([(0, 0)], "adam")
    with pytest.raises(KeyError):
        opt.set_fallback([(0, 9)], "sgd")


def test_fallback_sgd_uses_the_filtered_gradient():
    params = _params()
    opt = _make(params, lr=0.1, betas=(0.9, 1.0), precondition_frequency=1)
    opt.set_fallback([(0, b) for b in range(4)] + [(1, 0)], "sgd")
    buffers = [torch.zeros(64, 48), torch.zeros(32, 32)]
    for t, grads in enumerate(_grads(4), start=1):
        old = [p.detach().clone() for p in params]
        _step(opt, params, grads)
        for p, p0, buf, g in zip(params, old, buffers, grads):
            buf.mul_(0.9).add_(g, alpha=0.1)
            torch.testing.assert_close(p.detach(), p0 - 0.1 * buf / (1 - 0.9**t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_grafting_never_rescales_the_filtered_gradient_in_place(beta1):
    """A kernel that returns its input (here SGD) must not let grafting scale optimizer state."""
    p = nn.Parameter(torch.zeros(8))
    opt = Shampoo(
        [p],
        lr=0.1,
        betas=(beta1, 1.0),
        use_bias_correction=False,
        preconditioner_config=SGDPreconditionerConfig(),
        grafting_config=AdaGradPreconditionerConfig(),
    )
    g = torch.arange(1.0, 9.0)
    buffer, squares, expected = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
        buffer = buffer * beta1 + (1 - beta1) * g
        squares += g * g
        graft = buffer / (squares.sqrt() + 1e-10)
        expected -= 0.1 * buffer * graft.norm() / buffer.norm()
        if beta1:
            torch.testing.assert_close(opt.state[opt.buckets[0].key]["moments"]["filtered_grad"][0], buffer)
        torch.testing.assert_close(p.detach(), expected)


# ------------------------------------------------------------------------ off-schedule refresh


def test_request_refresh_refreshes_only_those_blocks_with_scaled_epsilon():
    eps = 1.0
    params = _params()
    opt = _make(params, betas=(0.0, 1.0), epsilon=eps, precondition_frequency=4)
    grads = _grads(8)
    for t in range(4):  # scheduled refresh at step 4
        _step(opt, params, grads[t])
    roots = {k: v for k, v in _snapshot(opt).items() if ".root." in k[1]}
    opt.request_refresh([(0, 1)], epsilon_scale=10.0)
    _step(opt, params, grads[4])  # step 5: off schedule
    after = _snapshot(opt)
    for (pidx, key), value in roots.items():
        if pidx == 0 and key.startswith("block_1."):
            assert not torch.equal(after[(pidx, key)], value), key
        else:
            assert torch.equal(after[(pidx, key)], value), key
    records = {r.key: r for r in opt.health()}
    assert records[(0, 1)].last_refresh_step == 5 and records[(0, 1)].epsilon_scale == 10.0
    assert all(r.last_refresh_step == 4 and r.epsilon_scale == 1.0 for k, r in records.items() if k != (0, 1))

    def expected_root(pidx: int, block: int, dim: int, epsilon: float) -> Tensor:
        factor = after[(pidx, f"block_{block}.precond.factor.{dim}")].double()
        values, vectors = _REAL_EIGH(factor)
        return (vectors * (values.clamp_min(0) + epsilon).pow(-0.25)) @ vectors.mT

    for dim in (0, 1):
        got = after[(0, f"block_1.precond.root.{dim}")].double()
        torch.testing.assert_close(got, expected_root(0, 1, dim, 10 * eps), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got, expected_root(0, 1, dim, eps), rtol=1e-3)
    _step(opt, params, grads[5])  # the request was consumed
    assert {r.key: r.last_refresh_step for r in opt.health()}[(0, 1)] == 5
    _step(opt, params, grads[6])
    _step(opt, params, grads[7])  # step 8: scheduled, block (0, 1) keeps its scaled epsilon
    after = _snapshot(opt)
    torch.testing.assert_close(
        after[(0, "block_1.precond.root.0")].double(), expected_root(0, 1, 0, 10 * eps), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        after[(0, "block_0.precond.root.0")].double(), expected_root(0, 0, 0, eps), rtol=1e-4, atol=1e-6
    )
    assert all(r.last_refresh_step == 8 for r in opt.health())


def test_refresh_request_waits_for_a_step_with_gradients():
    lone = nn.Parameter(torch.randn(5, 7))  # alone in its bucket
    other = nn.Parameter(torch.randn(4))
    opt = Shampoo([lone, other], lr=0.01, precondition_frequency=100)
    lone.grad, other.grad = torch.randn(5, 7), torch.randn(4)
    opt.step()
    opt.request_refresh([(0, 0)])
    lone.grad = None  # this step has no gradient for the requested block's bucket
    opt.step()
    assert {r.key: r.last_refresh_step for r in opt.health()}[(0, 0)] == -1
    lone.grad = torch.randn(5, 7)
    opt.step()
    assert {r.key: r.last_refresh_step for r in opt.health()} == {(0, 0): 3, (1, 0): -1}


# ------------------------------------------------------------------------ closures and grads


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned():
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    opt = Shampoo(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before, bias = model.weight.detach().clone(), model.bias.detach().clone()
    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True]
    assert isinstance(loss, Tensor) and loss.requires_grad  # built under enable_grad
    torch.testing.assert_close(loss.detach(), nn.functional.mse_loss(x @ before.T + bias, y))
    assert not torch.equal(model.weight.detach(), before)
    assert opt.step() is None


def test_params_without_grad_are_skipped():
    params = _params()
    opt = _make(params, precondition_frequency=1, weight_decay=0.1, momentum=0.9)
    v0 = params[1].detach().clone()
    w0 = params[0].detach().clone()
    for grads in _grads(3):
        _step(opt, params, [grads[0], None])  # V shares a bucket with W's blocks 0 and 2
    assert torch.equal(params[1].detach(), v0)
    assert not torch.equal(params[0].detach(), w0)
    v_state = _block_state(_snapshot(opt), 1, 0)
    assert torch.equal(v_state["precond.factor.0"], torch.zeros(32, 32))
    assert int(v_state["status.nonfinite"]) == 0
    records = {r.key: r for r in opt.health()}
    assert records[(1, 0)].nonfinite_count == 0 and records[(1, 0)].failure_count == 0


@pytest.mark.parametrize("use_bucketing", [True, False])
def test_momentum_of_a_late_starting_block_matches_torch_sgd(use_bucketing):
    """A block whose first gradient arrives after step 1 starts its buffer like torch.optim.SGD
    (with ``use_torch_momentum``; Distributed Shampoo's momentum: tests/test_parity_semantics.py)."""
    params = [nn.Parameter(torch.zeros(4)) for _ in range(2)]  # one bucket of two blocks
    reference = [nn.Parameter(torch.zeros(4)) for _ in range(2)]
    opt = Shampoo(
        params,
        lr=0.1,
        betas=(0.0, 1.0),
        momentum=0.9,
        dampening=0.5,
        use_torch_momentum=True,
        preconditioner_config=SGDPreconditionerConfig(),
        use_bucketing=use_bucketing,
    )
    assert len(opt.buckets) == (1 if use_bucketing else 2)
    sgd = torch.optim.SGD(reference, lr=0.1, momentum=0.9, dampening=0.5)
    g = torch.Generator().manual_seed(0)
    for t in range(4):
        grads = [torch.randn(4, generator=g), None if t == 0 else torch.randn(4, generator=g)]
        for group in (params, reference):
            for p, grad in zip(group, grads):
                p.grad = None if grad is None else grad.clone()
        opt.step()
        sgd.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.detach(), r.detach())


def test_frozen_parameter_never_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    trained = model[0].weight.detach().clone()
    opt = Shampoo(model.parameters(), lr=0.05, weight_decay=0.1, momentum=0.9)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert model[2].weight.grad is None
    assert torch.equal(model[2].weight.detach(), frozen)
    assert not torch.equal(model[0].weight.detach(), trained)
