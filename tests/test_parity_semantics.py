"""Distributed Shampoo's semantics, pinned without it: closed forms and step-by-step expectations.

Momentum from a zero buffer (damped from step 1, Nesterov with dampening), Adam grafting that
always bias-corrects, the diagonal configs' defaults, trace scaling, size-1 dims, and its QR
refresh (one QR-algorithm step from the stored basis on ``A + εI``, ascending sort, SOAP's moment
left in place). ``benchmarks/conformance_ds.py`` compares against Distributed Shampoo itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    EighEigendecompositionConfig,
    QREigendecompositionConfig,
    RMSpropPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SGDPreconditionerConfig,
    Shampoo,
)
from lightning_shampoo.blocking import processed_shape
from lightning_shampoo.linalg.orthogonal import qr_algorithm
from lightning_shampoo.preconditioners import Context
from lightning_shampoo.preconditioners.amortized import eigendecompose
from lightning_shampoo.preconditioners.soap import SOAPPreconditioner

F64 = torch.float64


def _grads(steps: int, shape: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(steps)]


def _orthogonal(d: int, seed: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# ------------------------------------------------------------------------------------ momentum


def _sgd(params: list[nn.Parameter], lr: float, mu: float, d: float, **options: bool) -> Shampoo:
    """Shampoo as plain SGD with momentum (the SGD preconditioner, no β₁ filter)."""
    return Shampoo(
        params,
        lr=lr,
        betas=(0.0, 1.0),
        momentum=mu,
        dampening=d,
        preconditioner_config=SGDPreconditionerConfig(),
        **options,
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_damped_momentum_starts_from_a_zero_buffer(nesterov: bool) -> None:
    """``M ← μM + (1−d)g`` from ``M = 0`` (step 1 damped), ``P = M`` or ``(1−d)g + μM``."""
    lr, mu, d = 0.1, 0.5, 0.1
    param = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = _sgd([param], lr, mu, d, use_nesterov=nesterov)
    expected, buffer = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    for t, g in enumerate(_grads(4, (3,))):
        param.grad = g.clone()
        opt.step()
        buffer = mu * buffer + (1 - d) * g
        direction = (1 - d) * g + mu * buffer if nesterov else buffer
        expected = expected - lr * direction
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)
        if t == 0:  # torch.optim.SGD would have stepped by the undamped gradient
            assert not torch.allclose(param.detach(), -lr * (g + (mu * g if nesterov else 0)))


def test_torch_momentum_keeps_sgds_undamped_first_step() -> None:
    lr, mu, d = 0.1, 0.5, 0.1
    ours = nn.Parameter(torch.zeros(3, dtype=F64))
    reference = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = _sgd([ours], lr, mu, d, use_torch_momentum=True)
    sgd = torch.optim.SGD([reference], lr=lr, momentum=mu, dampening=d)
    for g in _grads(4, (3,)):
        ours.grad, reference.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
        torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-12, atol=1e-14)


def test_a_late_block_keeps_its_zero_buffer_while_it_has_no_gradient() -> None:
    """Damped momentum of a parameter whose first gradient arrives at step 3 (same bucket as one
    that steps from step 1): its buffer starts at zero then, damped."""
    mu, d, lr = 0.9, 0.5, 0.1
    params = [nn.Parameter(torch.zeros(4, dtype=F64)) for _ in range(2)]
    opt = _sgd(params, lr, mu, d)
    assert len(opt.buckets) == 1
    buffers = [torch.zeros(4, dtype=F64) for _ in range(2)]
    expected = [torch.zeros(4, dtype=F64) for _ in range(2)]
    grads = _grads(8, (4,))
    for t in range(4):
        step_grads = [grads[2 * t], None if t < 2 else grads[2 * t + 1]]
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if g is None else g.clone()
            if g is not None:
                buffers[i] = mu * buffers[i] + (1 - d) * g
                expected[i] = expected[i] - lr * buffers[i]
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------- diagonal / grafting


def test_diagonal_configs_default_to_its_epsilon() -> None:
    assert AdaGradPreconditionerConfig().epsilon == 1e-10
    assert RMSpropPreconditionerConfig().epsilon == 1e-10
    assert AdamPreconditionerConfig().epsilon == 1e-10
    assert (RMSpropPreconditionerConfig().beta2, AdamPreconditionerConfig().beta2) == (0.99, 0.999)


@pytest.mark.parametrize("use_bias_correction", [True, False])
def test_adam_grafting_always_bias_corrects_its_second_moment(use_bias_correction: bool) -> None:
    """Before preconditioning starts the step is Adam grafting alone: ``m / (sqrt(v / (1−β₂ᵗ)) + ε)``
    whatever ``use_bias_correction``, which only decides ``m``'s ``1 − β₁ᵗ``."""
    lr, (b1, b2), eps = 0.01, (0.9, 0.99), 1e-8
    param = nn.Parameter(torch.zeros(2, 3, dtype=F64))
    opt = Shampoo(
        [param],
        lr=lr,
        betas=(b1, 1.0),
        use_bias_correction=use_bias_correction,
        start_preconditioning_step=math.inf,
        grafting_config=AdamPreconditionerConfig(beta2=b2, epsilon=eps),
    )
    m, v, expected = (torch.zeros(2, 3, dtype=F64) for _ in range(3))
    for t, g in enumerate(_grads(5, (2, 3)), start=1):
        param.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        first = m / (1 - b1**t) if use_bias_correction else m
        expected = expected - lr * first / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-14)


def test_rmsprop_drop_weighting_factor_sums_squares_without_bias_correction() -> None:
    lr, b2, eps = 0.01, 0.9, 1e-8
    param = nn.Parameter(torch.zeros(4, dtype=F64))
    config = AdamPreconditionerConfig(beta2=b2, epsilon=eps, drop_weighting_factor_on_gsquare=True)
    opt = Shampoo([param], lr=lr, betas=(0.0, 1.0), preconditioner_config=config)
    v, expected = torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64)
    for g in _grads(4, (4,)):
        param.grad = g.clone()
        opt.step()
        v = b2 * v + g * g
        expected = expected - lr * g / (v.sqrt() + eps)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ trace scaling


def _one_step(config: object, grad: Tensor, epsilon: float) -> Tensor:
    param = nn.Parameter(torch.zeros_like(grad))
    opt = Shampoo(
        [param], lr=1.0, betas=(0.0, 1.0), epsilon=epsilon, use_merge_dims=False, preconditioner_config=config
    )
    param.grad = grad.clone()
    opt.step()
    return -param.detach()


@pytest.mark.parametrize("exponent", [0.5, 0.25, 1.0])
@pytest.mark.parametrize("kind", ["root_inv", "eigendecomposed"])
def test_trace_scaling_closed_form_on_a_rank_one_gradient(kind: str, exponent: float) -> None:
    """``G = s·u vᵀ``: factors ``s²uuᵀ`` and ``s²vvᵀ``, trace ``s²``; scaled by ``(s²)^(-e)`` each
    and rooted at ¼, the step is ``s·(s^(2−2e) + ε)^(-½)·u vᵀ`` (``ε`` on each factor's
    eigenvalue ``s^(2−2e)``); a vector ``g`` gets ``(‖g‖^(2−2e) + ε)^(-½)·g``."""
    eps, s = 1e-3, 3.0
    u, v = _orthogonal(4, 1)[:, 0], _orthogonal(3, 2)[:, 0]
    options = dict(use_trace_scaling=True, trace_scaling_exponent=exponent, factor_matrix_dtype=F64)
    if kind == "root_inv":
        config: object = RootInvShampooPreconditionerConfig(inv_factor_matrix_dtype=F64, **options)
    else:
        config = EigendecomposedShampooPreconditionerConfig(
            factor_matrix_eigenvectors_dtype=F64, factor_matrix_eigenvalues_dtype=F64, **options
        )
    matrix = s * torch.outer(u, v)
    expected = s * (s ** (2 - 2 * exponent) + eps) ** -0.5 * torch.outer(u, v)
    torch.testing.assert_close(_one_step(config, matrix, eps), expected, rtol=1e-9, atol=1e-12)
    vector = s * u
    expected = (s ** (2 - 2 * exponent) + eps) ** -0.5 * vector
    torch.testing.assert_close(_one_step(config, vector, eps), expected, rtol=1e-9, atol=1e-12)
    unscaled = (s**2 + eps) ** -0.5 * vector  # teeth: without scaling the step differs
    assert (_one_step(config, vector, eps) - unscaled).abs().max() > 1e-3


def test_trace_scaling_of_a_zero_factor_clamps_the_trace_at_epsilon() -> None:
    config = RootInvShampooPreconditionerConfig(use_trace_scaling=True, factor_matrix_dtype=F64)
    step = _one_step(config, torch.zeros(3, dtype=F64), 1e-6)
    assert torch.equal(step, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("exponent", [0.0, -0.5, 1.5])
def test_trace_scaling_exponent_outside_zero_one_is_refused(exponent: float) -> None:
    with pytest.raises(ValueError, match="trace_scaling_exponent"):
        RootInvShampooPreconditionerConfig(use_trace_scaling=True, trace_scaling_exponent=exponent)
    RootInvShampooPreconditionerConfig(trace_scaling_exponent=exponent)  # ignored while off


# --------------------------------------------------------------------------------- size-1 dims


@pytest.mark.parametrize(
    ("shape", "max_dim", "merge", "squeeze", "expected"),
    [
        ((1, 16), 32, True, True, (16,)),  # merged or not, size-1 dims go (its default target 1)
        ((1, 16), 32, False, True, (16,)),  # its deprecated use_merge_dims=False did the same
        ((1, 16), 32, False, False, (1, 16)),  # its target_parameter_dimensionality=math.inf
        ((1, 2, 5, 1), 10, True, True, (10,)),
        ((1, 2, 5, 1), 1, True, True, (2, 5)),
        ((32, 3, 64, 64), 8192, True, True, (96, 4096)),
        ((4, 1, 3, 3), 1024, False, False, (4, 1, 3, 3)),
        ((), 1024, False, False, (1,)),
    ],
)
def test_size_one_dims(shape, max_dim, merge, squeeze, expected) -> None:
    assert processed_shape(shape, max_dim, merge=merge, squeeze=squeeze) == expected


@pytest.mark.parametrize(("target", "block"), [(1, (16,)), (2, (16,)), (math.inf, (1, 16))])
def test_the_optimizer_keeps_size_one_dims_only_at_target_inf(target, block) -> None:
    """Wired through ``Shampoo``: at ``target_parameter_dimensionality=math.inf`` a [1, 16] weight
    is one [1, 16] block with a factor per dim (exponent 1/4 each, Distributed Shampoo's), not a
    squeezed 16-vector with exponent 1/2 (the conformance script's "1x16 weight" row)."""
    weight = torch.nn.Parameter(torch.randn(1, 16, dtype=F64))
    opt = Shampoo([weight], target_parameter_dimensionality=target)
    (bucket,) = opt.buckets
    assert bucket.block_shape == block
    assert bucket.kernel.exponents == ({0: 0.25, 1: 0.25} if len(block) == 2 else {0: 0.5})


# ----------------------------------------------------------------------------------------- QR


def _spd(d: int, seed: int, values: Tensor | None = None) -> Tensor:
    q = _orthogonal(d, seed)
    lam = torch.arange(1.0, d + 1, dtype=F64) ** 2 if values is None else values
    return (q * lam) @ q.mT


def test_qr_algorithm_first_step_from_the_identity_is_one_qr_of_the_matrix() -> None:
    """From ``Q = I``: ``(P, R) = qr(A)``, ``Q = P``, estimates ``diag(RP)``, sorted ascending."""
    a = _spd(5, 0)
    result = qr_algorithm(a[None], torch.eye(5, dtype=F64)[None])
    p, r = torch.linalg.qr(a)
    values, order = torch.diagonal(r @ p).sort(stable=True)
    torch.testing.assert_close(result.eigenvalues[0], values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.eigenvectors[0], p[:, order], rtol=1e-12, atol=1e-12)
    assert result.permutation is None
    assert bool((result.eigenvalues.diff(dim=-1) >= 0).all())


def test_qr_algorithm_iterated_converges_to_the_eigenbasis() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=F64)
    a = _spd(4, 3, values)
    result = qr_algorithm(a[None], torch.eye(4, dtype=F64)[None], max_iterations=200)
    torch.testing.assert_close(result.eigenvalues[0], values, rtol=1e-10, atol=1e-10)
    overlap = (result.eigenvectors[0].mT @ _orthogonal(4, 3)).abs()
    torch.testing.assert_close(overlap, torch.eye(4, dtype=F64), rtol=0, atol=1e-8)


def test_qr_algorithm_tolerance_skips_a_basis_that_already_diagonalises() -> None:
    """Per matrix: an exact (scrambled) basis is only re-sorted; its neighbour still iterates."""
    exact = _orthogonal(4, 5)[:, [2, 0, 3, 1]]
    a = _spd(4, 5)
    batch = torch.stack([a, _spd(4, 6)])
    start = torch.stack([exact, torch.eye(4, dtype=F64)])
    result = qr_algorithm(batch, start, max_iterations=1, tolerance=1e-6)
    lam = torch.diagonal(exact.mT @ a @ exact)
    torch.testing.assert_close(result.eigenvectors[0], exact[:, lam.argsort()], rtol=0, atol=0)
    assert (result.eigenvectors[1] - torch.eye(4, dtype=F64)).abs().max() > 0.1


def test_eigendecompose_qr_damps_the_matrix_and_reports_undamped_eigenvalues() -> None:
    a, eps = _spd(4, 7), 0.5
    previous = _orthogonal(4, 8)[None]
    result = eigendecompose(a[None], QREigendecompositionConfig(), previous, warm=False, epsilon=eps)
    direct = qr_algorithm(a[None] + eps * torch.eye(4, dtype=F64), previous)
    torch.testing.assert_close(result.eigenvectors, direct.eigenvectors, rtol=0, atol=0)
    torch.testing.assert_close(result.eigenvalues, direct.eigenvalues - eps, rtol=0, atol=1e-12)
    undamped = qr_algorithm(a[None], previous)  # teeth: the damping changes the basis
    assert (undamped.eigenvectors - direct.eigenvectors).abs().max() > 1e-3


def test_qr_config_names() -> None:
    assert QREigendecompositionConfig(power_iter_steps=3) == QREigendecompositionConfig(max_iterations=3)
    with pytest.raises(ValueError, match="power_iter_steps"):
        QREigendecompositionConfig(power_iter_steps=3, max_iterations=2)
    with pytest.raises(ValueError, match="tolerance"):
        QREigendecompositionConfig(tolerance=1.5)
    default = QREigendecompositionConfig()
    assert (default.max_iterations, default.tolerance, default.reference_soap) == (1, 0.0, False)


def test_soap_qr_refresh_leaves_the_second_moment_in_place() -> None:
    """An exact basis in scrambled column order, already within tolerance: the refresh only sorts
    the columns ascending; the corrected eigenvalues stay where they were (not permuted)."""
    config = EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=QREigendecompositionConfig(tolerance=1e-8),
        factor_matrix_dtype=F64,
        factor_matrix_eigenvectors_dtype=F64,
        corrected_eigenvalues_dtype=F64,
    )
    assert config.rotate_corrected_eigenvalues is False
    kernel = SOAPPreconditioner(config, (4, 3), "test")
    state = kernel.init_state(1, torch.device("cpu"), F64)
    for i, (d, perm) in enumerate(((4, [3, 1, 0, 2]), (3, [2, 0, 1]))):
        state[f"factor.{i}"] = _spd(d, 10 + i)[None]
        state[f"eigenvectors.{i}"] = _orthogonal(d, 10 + i)[:, perm][None].clone()
    moment = torch.rand(1, 4, 3, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.1
    state["corrected_eigenvalues"] = moment.clone()
    ctx = Context.uniform(
        step=3, beta2=1.0, epsilon=1e-12, use_bias_correction=True, live=torch.ones(1, dtype=F64)
    )
    kernel.refresh(state, ctx, torch.ones(1, dtype=torch.bool))
    for i, d in enumerate((4, 3)):
        torch.testing.assert_close(state[f"eigenvectors.{i}"][0], _orthogonal(d, 10 + i), rtol=0, atol=1e-12)
    assert torch.equal(state["corrected_eigenvalues"], moment)


def test_eigh_tolerance_keeps_a_basis_that_still_diagonalises() -> None:
    a = _spd(4, 12)
    stale = _orthogonal(4, 12)[:, [1, 0, 3, 2]][None]
    config = EighEigendecompositionConfig(tolerance=1e-6)
    result = eigendecompose(a[None], config, stale, warm=True)
    assert torch.equal(result.eigenvectors, stale)
    torch.testing.assert_close(result.eigenvalues[0], torch.diagonal(stale[0].mT @ a @ stale[0]))
    fresh = eigendecompose(a[None], EighEigendecompositionConfig(), stale, warm=True)
    assert not torch.equal(fresh.eigenvectors, stale)
