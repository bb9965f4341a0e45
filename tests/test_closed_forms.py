"""Closed-form updates: gradients chosen so that every Kronecker factor is a multiple of ``I``.

``G = c·Q`` with ``Q`` orthogonal gives ``GGᵀ = GᵀG = c²I``, so with ``betas=(0, 1)`` after one step
each factor is ``c²I`` and root-inverse Shampoo's update is ``-lr · G · (c²+ε)^(-½)`` (exponent ¼
per factor). A 3-D analogue (one ±1 entry per mode fibre) gives factors ``c²d·I`` and exponent ⅙.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    KLShampooPreconditionerConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
)

F64 = torch.float64
LR = 0.1


def _orthogonal(d: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def _cube(d: int, seed: int) -> Tensor:
    """``[d, d, d]`` with random ±1 where ``i+j+k ≡ 0 (mod d)``, else 0: in every mode unfolding
    the rows have disjoint supports of ``d`` entries, so each factor ``X₍ᵢ₎X₍ᵢ₎ᵀ = d·I``."""
    i, j, k = torch.meshgrid(*(torch.arange(d),) * 3, indexing="ij")
    signs = torch.randint(0, 2, (d, d, d), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.where((i + j + k) % d == 0, signs, 0).float()


def _steps(grads: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """Parameter deltas of successive ``Shampoo`` steps on one parameter with the given gradients."""
    param = nn.Parameter(torch.zeros_like(grads[0]))
    kwargs = {"lr": LR, "betas": (0.0, 1.0), "use_merge_dims": False, **kwargs}
    optimizer = Shampoo([param], **kwargs)
    deltas = []
    for grad in grads:
        param.grad = grad.clone()
        before = param.detach().clone()
        optimizer.step()
        deltas.append(param.detach() - before)
    return deltas


SHAMPOO_CONFIGS = {
    "root_inv_eigh": RootInvShampooPreconditionerConfig(),
    "root_inv_newton": RootInvShampooPreconditionerConfig(amortized_computation_config=CoupledNewtonConfig()),
    "eigen_eigh": EigendecomposedShampooPreconditionerConfig(),
    "eigen_qr": EigendecomposedShampooPreconditionerConfig(
        amortized_computation_config=QREigendecompositionConfig()
    ),
}


@pytest.mark.parametrize("config", list(SHAMPOO_CONFIGS))
def test_two_dim_root_inverse_is_gradient_over_c(config: str) -> None:
    c, q = 3.0, _orthogonal(6, seed=0)
    (delta,) = _steps([c * q], preconditioner_config=SHAMPOO_CONFIGS[config])
    torch.testing.assert_close(delta, -LR * q)  # -lr · G / c


@pytest.mark.parametrize("config", ["root_inv_eigh", "eigen_eigh"])
def test_epsilon_damps_the_factors(config: str) -> None:
    """``(c² + ε)^(-¼)`` per factor: c = 2, ε = 5 gives ``G/3``."""
    c, q = 2.0, _orthogonal(5, seed=1)
    (delta,) = _steps([c * q], epsilon=5.0, preconditioner_config=SHAMPOO_CONFIGS[config])
    torch.testing.assert_close(delta, -LR * c * q / 3.0)


@pytest.mark.parametrize("config", ["root_inv_eigh", "root_inv_newton", "eigen_eigh"])
def test_three_dim_block_uses_exponent_one_sixth(config: str) -> None:
    """Factors ``c²d·I``; three exponents ⅙ give ``G / (c·sqrt(d))``."""
    c, d = 0.5, 4
    grad = c * _cube(d, seed=2)
    param = nn.Parameter(torch.zeros(d, d, d))
    optimizer = Shampoo(
        [param], lr=LR, betas=(0.0, 1.0), use_merge_dims=False, preconditioner_config=SHAMPOO_CONFIGS[config]
    )
    param.grad = grad
    optimizer.step()
    (plan,) = optimizer.buckets
    assert plan.block_shape == (d, d, d)
    assert plan.kernel.exponents == pytest.approx({0: 1 / 6, 1: 1 / 6, 2: 1 / 6})  # type: ignore[attr-defined]
    torch.testing.assert_close(param.detach(), -LR * grad / (c * d**0.5))


def test_inverse_exponent_override_for_all_dims() -> None:
    """``{2: ½}``: both factors to the power -½ give ``G/c²``."""
    c, q = 3.0, _orthogonal(6, seed=3)
    config = RootInvShampooPreconditionerConfig(inverse_exponent_override={2: 0.5})
    (delta,) = _steps([c * q], preconditioner_config=config)
    torch.testing.assert_close(delta, -LR * q / c)


@pytest.mark.parametrize(
    "family", [RootInvShampooPreconditionerConfig, EigendecomposedShampooPreconditionerConfig]
)
def test_inverse_exponent_override_zero_leaves_dim_unpreconditioned(family: type) -> None:
    """``{2: {0: 0}}``: no factor on dim 0; dim 1 keeps the default ¼, so ``G/sqrt(c)``."""
    c, q = 4.0, _orthogonal(6, seed=4)
    param = nn.Parameter(torch.zeros(6, 6))
    config = family(inverse_exponent_override={2: {0: 0.0}})
    optimizer = Shampoo([param], lr=LR, betas=(0.0, 1.0), use_merge_dims=False, preconditioner_config=config)
    param.grad = c * q
    optimizer.step()
    (state,) = optimizer.state.values()
    assert "factor.0" not in state["precond"] and "factor.1" in state["precond"]
    torch.testing.assert_close(param.detach(), -LR * c * q / c**0.5)


@pytest.mark.parametrize("config", list(SHAMPOO_CONFIGS))
def test_beta2_ema_with_bias_correction(config: str) -> None:
    """With ``β₂ < 1`` the bias-corrected factors are ``c̄ₜ²I``, ``c̄ₜ²`` the bias-corrected EMA of
    ``cₜ²``: the update is ``-lr · Gₜ / c̄ₜ`` with a fresh ``Qₜ`` and ``cₜ`` every step."""
    beta2, cs = 0.9, [3.0, 1.0, 2.0]
    qs = [_orthogonal(5, seed=10 + t) for t in range(3)]
    deltas = _steps(
        [c * q for c, q in zip(cs, qs)], betas=(0.0, beta2), preconditioner_config=SHAMPOO_CONFIGS[config]
    )
    ema = 0.0
    for t, (c, q, delta) in enumerate(zip(cs, qs, deltas), start=1):
        ema = beta2 * ema + (1 - beta2) * c * c
        mean_square = ema / (1 - beta2**t)
        torch.testing.assert_close(delta, -LR * c * q / mean_square**0.5)


def test_beta2_ema_without_bias_correction() -> None:
    """Without bias correction the first factor is ``(1-β₂)c²I``: update ``-lr · G / (c·sqrt(1-β₂))``."""
    c, q = 2.0, _orthogonal(5, seed=5)
    (delta,) = _steps([c * q], betas=(0.0, 0.9), use_bias_correction=False)
    torch.testing.assert_close(delta, -LR * q / 0.1**0.5)


def test_kl_shampoo_first_step() -> None:
    """KL-Shampoo: factors ``GGᵀ/d = (c²/d)·I``, exponent ½ each: update ``-lr · (d/c) · Q``."""
    c, d = 3.0, 6
    q = _orthogonal(d, seed=6)
    (delta,) = _steps([c * q], preconditioner_config=KLShampooPreconditionerConfig())
    torch.testing.assert_close(delta, -LR * (d / c) * q)


def test_soap_is_elementwise_sign_in_the_stored_basis() -> None:
    """SOAP after one step (β₁ = 0, β₂ = 1): in its stored bases ``B_L, B_R`` the update is
    ``-lr · B_L (M / (|M| + ε)) B_Rᵀ`` with ``M = B_Lᵀ G B_R`` — Adam's first step, rotated."""
    c, d, eps = 3.0, 6, 1e-10
    q = _orthogonal(d, seed=7, dtype=F64)
    config = EigenvalueCorrectedShampooPreconditionerConfig(
        factor_matrix_dtype=F64, factor_matrix_eigenvectors_dtype=F64, corrected_eigenvalues_dtype=F64
    )
    param = nn.Parameter(torch.zeros(d, d, dtype=F64))
    optimizer = Shampoo(
        [param], lr=LR, betas=(0.0, 1.0), epsilon=eps, use_merge_dims=False, preconditioner_config=config
    )
    param.grad = c * q
    optimizer.step()
    (state,) = optimizer.state.values()
    left, right = state["precond"]["eigenvectors.0"][0], state["precond"]["eigenvectors.1"][0]
    for basis in (left, right):  # orthonormal bases of c²I (any basis is an eigenbasis)
        torch.testing.assert_close(basis.mT @ basis, torch.eye(d, dtype=F64))
    m = left.mT @ (c * q) @ right
    expected = -LR * left @ (m / (m.abs() + eps)) @ right.mT
    torch.testing.assert_close(param.detach(), expected)
    # Every rotated entry has magnitude 1: the update's squared norm is lr²·d².
    assert param.detach().norm().item() == pytest.approx(LR * d, rel=1e-8)


# -------------------------------------------------------------------------------------- grafting


def test_grafting_norm_ratio_closed_form() -> None:
    """Blocks ``cᵢQᵢ`` with AdaGrad grafting: Shampoo gives ``Qᵢ`` (norm √d), AdaGrad ``sign(Qᵢ)``
    (norm d), so each block's update is ``-lr·sqrt(d)·Qᵢ`` whatever ``cᵢ``."""
    d = 4
    qs = [_orthogonal(d, seed=20 + b) for b in range(3)]
    grad = torch.cat([0.5 * qs[0], 4.0 * qs[1], 2.0 * qs[2]])
    (delta,) = _steps(
        [grad],
        max_preconditioner_dim=d,
        grafting_config=AdaGradPreconditionerConfig(epsilon=1e-10),
    )
    torch.testing.assert_close(delta, -LR * d**0.5 * torch.cat(qs))


def test_grafted_block_norms_equal_adam_step_norms() -> None:
    """With Adam grafting, every block's update has the Frobenius norm of ``torch.optim.Adam``'s
    update of that block, step after step (random gradients, β₁ > 0, uneven blocks)."""
    rows, cols, block = 11, 7, 4
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(rows, cols, generator=g) * (1.0 + t) for t in range(4)]
    deltas = _steps(
        grads,
        lr=LR,
        betas=(0.9, 0.99),
        max_preconditioner_dim=block,
        epsilon=1e-6,
        grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
    )
    reference = nn.Parameter(torch.zeros(rows, cols))
    adam = torch.optim.Adam([reference], lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for grad, delta in zip(grads, deltas):
        reference.grad = grad.clone()
        before = reference.detach().clone()
        adam.step()
        adam_delta = reference.detach() - before
        for r in range(0, rows, block):
            for k in range(0, cols, block):
                ours, theirs = delta[r : r + block, k : k + block], adam_delta[r : r + block, k : k + block]
                torch.testing.assert_close(ours.norm(), theirs.norm())
                # ... and the direction is Shampoo's, not Adam's.
                cosine = (ours * theirs).sum() / (ours.norm() * theirs.norm())
                assert cosine < 0.999
