"""KL-Shampoo against hand-computed factor recursions.

``L ← β₂L + (1-β₂)·G R̂⁻¹ Gᵀ / d_R`` and ``R ← β₂R + (1-β₂)·Gᵀ L̂⁻¹ G / d_L``, where ``L̂ = L/(1-β₂ᵗ) + εI``
is the factor as of the last refresh, and the preconditioner is ``L̂^(-½) G R̂^(-½)`` (exponent ½
per factor whatever the order). Everything runs in float64 and is recomputed here from scratch.
"""

from __future__ import annotations

import pytest
import torch
from helpers import bucket_full
from torch import Tensor, nn

from lightning_shampoo import EighEigendecompositionConfig, KLShampooPreconditionerConfig, Shampoo

F64 = torch.float64
KL64 = dict(
    factor_matrix_dtype=F64,
    factor_matrix_eigenvectors_dtype=F64,
    factor_matrix_eigenvalues_dtype=F64,
)


def _orthogonal(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _power(a: Tensor, exponent: float, eps: float) -> Tensor:
    """``(A + εI)^exponent`` of a symmetric PSD matrix (independent reference)."""
    values, vectors = torch.linalg.eigh(a)
    return (vectors * (values.clamp_min(0) + eps).pow(exponent)) @ vectors.mT


def _optimizer(param: nn.Parameter, **kwargs: object) -> Shampoo:
    defaults: dict = dict(
        lr=0.1,
        betas=(0.0, 0.9),
        epsilon=1e-2,
        use_merge_dims=False,
        precondition_frequency=1,
        preconditioner_config=KLShampooPreconditionerConfig(**KL64),
    )
    return Shampoo([param], **{**defaults, **kwargs})


def test_default_exponent_is_one_half_for_every_order() -> None:
    for shape in [(5, 3), (3, 4, 2)]:
        optimizer = _optimizer(nn.Parameter(torch.zeros(shape, dtype=F64)))
        (plan,) = optimizer.buckets
        assert plan.kernel.exponents == {i: 0.5 for i in range(len(shape))}  # type: ignore[attr-defined]


def test_factor_updates_and_direction_match_hand_computation() -> None:
    d0, d1, beta2, eps, lr = 5, 3, 0.9, 1e-2, 0.1
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(d0, d1, generator=g, dtype=F64) for _ in range(3)]
    param = nn.Parameter(torch.zeros(d0, d1, dtype=F64))
    optimizer = _optimizer(param, betas=(0.0, beta2), epsilon=eps, lr=lr)
    left = torch.zeros(d0, d0, dtype=F64)
    right = torch.zeros(d1, d1, dtype=F64)
    left_inv = torch.eye(d0, dtype=F64)  # no refresh yet: identity "roots"
    right_inv = torch.eye(d1, dtype=F64)
    for t, grad in enumerate(grads, start=1):
        param.grad = grad.clone()
        before = param.detach().clone()
        optimizer.step()
        (state,) = optimizer.state.values()
        precond = state["precond"]
        # Simultaneous update from the inverses of the last refresh.
        left, right = (
            beta2 * left + (1 - beta2) * grad @ right_inv @ grad.mT / d1,
            beta2 * right + (1 - beta2) * grad.mT @ left_inv @ grad / d0,
        )
        torch.testing.assert_close(bucket_full(precond["factor.0"])[0], left, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bucket_full(precond["factor.1"])[0], right, rtol=1e-10, atol=1e-12)
        # Refresh at every step: roots (L/(1-β₂ᵗ) + εI)^(-½), committed and used right away.
        bc2 = 1 - beta2**t
        left_root, right_root = _power(left / bc2, -0.5, eps), _power(right / bc2, -0.5, eps)
        torch.testing.assert_close(bucket_full(precond["root.0"])[0], left_root, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(bucket_full(precond["root.1"])[0], right_root, rtol=1e-9, atol=1e-12)
        delta = param.detach() - before
        torch.testing.assert_close(delta, -lr * left_root @ grad @ right_root, rtol=1e-9, atol=1e-12)
        left_inv, right_inv = left_root @ left_root, right_root @ right_root
    # The roots mattered: the same recursion with identity roots (GGᵀ/d_R) ends elsewhere.
    plain = sum(beta2 ** (3 - t) * (1 - beta2) * g @ g.mT / d1 for t, g in enumerate(grads, start=1))
    assert (left - plain).norm() > 0.05 * left.norm()


def test_three_dim_factor_update_scales_by_the_other_dims() -> None:
    """First step (identity roots): ``Lᵢ = (1-β₂)·G₍ᵢ₎G₍ᵢ₎ᵀ / Πⱼ≠ᵢ dⱼ``."""
    shape, beta2 = (3, 4, 2), 0.9
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    param = nn.Parameter(torch.zeros(shape, dtype=F64))
    optimizer = _optimizer(param, betas=(0.0, beta2))
    param.grad = grad
    optimizer.step()
    (state,) = optimizer.state.values()
    for i, d in enumerate(shape):
        unfolded = grad.movedim(i, 0).reshape(d, -1)
        expected = (1 - beta2) * unfolded @ unfolded.mT / (grad.numel() / d)
        torch.testing.assert_close(
            bucket_full(state["precond"][f"factor.{i}"])[0], expected, rtol=1e-12, atol=1e-14
        )


# ------------------------------------------------------------------------ eigenvalue correction


@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_eigenvalue_correction_tracks_the_kl_factor_in_an_exact_basis(beta2: float) -> None:
    """``G_t = U diag(s_t) Vᵀ`` with fixed ``U, V``: the factors stay diagonal in ``U``/``V``, so the
    corrected eigenvalues kept between refreshes must equal the eigenvalues of the hand-computed
    KL factor (whose update uses the previous *corrected* factor through the roots)."""
    d, eps, frequency = 4, 1e-2, 3
    u, v = _orthogonal(d, 1), _orthogonal(d, 2)
    g = torch.Generator().manual_seed(3)
    config = KLShampooPreconditionerConfig(eigenvalue_correction=True, **KL64)
    param = nn.Parameter(torch.zeros(d, d, dtype=F64))
    optimizer = _optimizer(
        param,
        betas=(0.0, beta2),
        epsilon=eps,
        precondition_frequency=frequency,
        start_preconditioning_step=frequency,
        preconditioner_config=config,
    )
    left = torch.zeros(d, d, dtype=F64)
    right = torch.zeros(d, d, dtype=F64)
    left_inv = torch.eye(d, dtype=F64)
    right_inv = torch.eye(d, dtype=F64)
    for t in range(1, 3 * frequency + 2):
        s = (torch.arange(1.0, d + 1, dtype=F64) + 0.5 * torch.rand(d, generator=g, dtype=F64)) * (1 + t % 2)
        grad = (u * s) @ v.mT
        param.grad = grad
        before = param.detach().clone()
        optimizer.step()
        weight = 1.0 if beta2 == 1.0 else 1 - beta2  # β₂ = 1: a plain sum
        left, right = (
            beta2 * left + weight * grad @ right_inv @ grad.mT / d,
            beta2 * right + weight * grad.mT @ left_inv @ grad / d,
        )
        bc2 = 1 - beta2**t if beta2 < 1 else 1.0
        if t >= frequency:  # refreshed once: roots follow the (corrected) factors every step
            left_inv, right_inv = _power(left / bc2, -1.0, eps), _power(right / bc2, -1.0, eps)
            delta = param.detach() - before
            expected = -0.1 * _power(left / bc2, -0.5, eps) @ grad @ _power(right / bc2, -0.5, eps)
            torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-12)
        (state,) = optimizer.state.values()
        precond = state["precond"]
        torch.testing.assert_close(bucket_full(precond["factor.0"])[0], left, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(bucket_full(precond["factor.1"])[0], right, rtol=1e-9, atol=1e-12)
        if t >= frequency:
            for i, factor in enumerate((left, right)):
                basis, values = precond[f"eigenvectors.{i}"][0], precond[f"eigenvalues.{i}"][0]
                torch.testing.assert_close(
                    values, (basis.mT @ factor @ basis).diagonal(), rtol=1e-9, atol=1e-12
                )
    assert t % frequency != 0  # the last steps were corrections, not refreshes


@pytest.mark.parametrize(("epsilon", "pseudo_inverse"), [(1e-12, False), (0.0, True)])
def test_eigenvalue_correction_stays_finite_on_degenerate_gradients(
    epsilon: float, pseudo_inverse: bool
) -> None:
    """Zero blocks, rank-one and vanishing gradients (also undamped, with a pseudo-inverse):
    eigenvalues, roots, factors and parameters stay finite and no failure is recorded."""
    config = KLShampooPreconditionerConfig(
        eigenvalue_correction=True,
        amortized_computation_config=EighEigendecompositionConfig(pseudo_inverse=pseudo_inverse),
    )
    param = nn.Parameter(torch.zeros(8, 6))
    optimizer = Shampoo(
        [param],
        lr=0.01,
        betas=(0.9, 0.99),
        epsilon=epsilon,
        max_preconditioner_dim=4,
        use_merge_dims=False,
        precondition_frequency=4,
        preconditioner_config=config,
    )
    g = torch.Generator().manual_seed(4)
    for t in range(1, 25):
        grad = torch.outer(torch.randn(8, generator=g), torch.randn(6, generator=g))  # rank one
        grad[:4, :4] = 0.0  # one block never sees a gradient
        if t % 5 == 0:
            grad = grad * 1e-30  # (nearly) vanishing
        param.grad = grad
        optimizer.step()
    for state in optimizer.state.values():
        for name, value in state["precond"].items():
            assert bool(torch.isfinite(value).all()), name
            if name.startswith("eigenvalues"):
                assert bool((value >= 0).all()), name
    assert bool(torch.isfinite(param).all())
    assert all(record.failure_count == 0 for record in optimizer.health())
    assert param.detach()[4:].abs().sum() > 0
    assert param.detach()[:4, :4].abs().sum() == 0
