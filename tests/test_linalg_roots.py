"""Unit tests for the inverse-root kernels and :func:`spectrum_stats` in ``lightning_shampoo.linalg``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_shampoo.linalg import (
    coupled_newton_inverse_root,
    inverse_root_from_eigh,
    matrix_inverse_root,
    safe_eigh,
    spectrum_stats,
)

F64 = torch.float64


def _orthogonal(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _spd(spectrum: Tensor, seed: int) -> Tensor:
    q = _orthogonal(spectrum.shape[-1], seed)
    a = (q * spectrum) @ q.mT
    return (a + a.mT) / 2


def _root_reference(a: Tensor, exponent: float, epsilon: float | Tensor = 0.0) -> Tensor:
    """``(A + εI)^(-exponent)`` from a plain ``torch.linalg.eigh``, as an independent reference."""
    values, vectors = torch.linalg.eigh(a)
    eps = torch.as_tensor(epsilon, dtype=a.dtype)
    eps = eps.unsqueeze(-1) if eps.ndim > 0 else eps
    return (vectors * (values + eps).pow(-exponent).unsqueeze(-2)) @ vectors.mT


def _spd_batch(n: int, d: int, seed: int) -> Tensor:
    """Well-conditioned SPD matrices (spectra in [0.5, 4]) in float64."""
    spectra = [torch.logspace(-0.301, 0.602, d, dtype=F64) * (1 + 0.05 * i) for i in range(n)]
    return torch.stack([_spd(s, seed + i) for i, s in enumerate(spectra)])


# ------------------------------------------------------------------------- eigh-based inverse roots


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("epsilon", [0.0, 1e-3, 0.5])
def test_inverse_root_power_times_matrix_is_identity(p: int, epsilon: float) -> None:
    d = 10
    a = _spd_batch(3, d, seed=1)
    eye = torch.eye(d, dtype=F64).expand(3, d, d)
    damped = a + epsilon * eye
    values, vectors, failed = safe_eigh(a)
    assert not bool(failed.any())
    root = inverse_root_from_eigh(values, vectors, 1.0 / p, epsilon)
    torch.testing.assert_close(torch.linalg.matrix_power(root, p) @ damped, eye, rtol=0.0, atol=1e-11)
    # The root is symmetric positive definite.
    torch.testing.assert_close(root, root.mT, rtol=0.0, atol=1e-13)
    assert bool((torch.linalg.eigvalsh(root) > 0).all())

    result = matrix_inverse_root(a, 1.0 / p, epsilon)
    assert not bool(result.failed.any())
    torch.testing.assert_close(result.root, root, rtol=0.0, atol=1e-13)
    torch.testing.assert_close(result.eigenvalues, values, rtol=0.0, atol=0.0)


def test_inverse_root_float32_matches_float64() -> None:
    a = _spd_batch(2, 8, seed=2)
    result = matrix_inverse_root(a.float(), 0.25, 1e-3)
    assert result.root.dtype == torch.float32 and not bool(result.failed.any())
    torch.testing.assert_close(result.root, _root_reference(a, 0.25, 1e-3).float(), rtol=1e-5, atol=1e-5)


def test_diagonal_closed_form_with_epsilon() -> None:
    diagonal = torch.tensor([0.25, 1.0, 4.0, 16.0, 81.0], dtype=F64)
    epsilon = 0.1
    result = matrix_inverse_root(torch.diag(diagonal), 0.25, epsilon)
    assert not bool(result.failed)
    torch.testing.assert_close(result.root, torch.diag((diagonal + epsilon) ** -0.25), rtol=0.0, atol=1e-14)
    # Exact values for epsilon = 0: diag(1/4, 1, 4, 16, 81)^(-1/4) = diag(√2, 1, 1/√2, 1/2, 1/3).
    exact = matrix_inverse_root(torch.diag(diagonal), 0.25, 0.0).root
    expected = torch.tensor([2**0.5, 1.0, 2**-0.5, 0.5, 1.0 / 3.0], dtype=F64)
    torch.testing.assert_close(exact, torch.diag(expected), rtol=0.0, atol=1e-14)


def test_negative_roundoff_eigenvalues_are_clamped_to_zero() -> None:
    values = torch.tensor([-1e-9, 1.0, 4.0], dtype=F64)
    root = inverse_root_from_eigh(values, torch.eye(3, dtype=F64), 0.5, 1e-2)
    expected = torch.tensor([1e-2**-0.5, 1.01**-0.5, 4.01**-0.5], dtype=F64)
    torch.testing.assert_close(root, torch.diag(expected), rtol=1e-14, atol=0.0)


def test_epsilon_as_per_matrix_tensor() -> None:
    diagonals = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0], [0.5, 8.0, 9.0]], dtype=F64)
    a = torch.diag_embed(diagonals)
    epsilon = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    result = matrix_inverse_root(a, 0.5, epsilon)
    assert result.failed.shape == (3,) and not bool(result.failed.any())
    expected = torch.diag_embed((diagonals + epsilon[:, None]) ** -0.5)
    torch.testing.assert_close(result.root, expected, rtol=0.0, atol=1e-14)
    # Each entry equals the scalar-epsilon call on that matrix alone.
    for i in range(3):
        single = matrix_inverse_root(a[i], 0.5, float(epsilon[i])).root
        torch.testing.assert_close(result.root[i], single, rtol=0.0, atol=1e-14)
    # A zero-dimensional tensor behaves like a float.
    as_tensor = matrix_inverse_root(a, 0.5, torch.tensor(0.5, dtype=F64)).root
    torch.testing.assert_close(as_tensor, matrix_inverse_root(a, 0.5, 0.5).root, rtol=0.0, atol=0.0)


def _rank_deficient(d: int, rank: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``A = V_r diag(λ) V_rᵀ``; returns A, V_r, λ and a basis of the null space."""
    q = _orthogonal(d, seed)
    v_range, v_null = q[:, :rank], q[:, rank:]
    lam = torch.linspace(1.0, 4.0, rank, dtype=F64)
    a = (v_range * lam) @ v_range.mT
    return (a + a.mT) / 2, v_range, lam, v_null


@pytest.mark.parametrize("p", [1, 2, 4])
def test_pseudo_inverse_root_on_rank_deficient_matrix(p: int) -> None:
    d, rank = 10, 4
    a, v_range, lam, v_null = _rank_deficient(d, rank, seed=3)
    projector = v_range @ v_range.mT
    result = matrix_inverse_root(a, 1.0 / p, 0.0, pseudo_inverse=True)
    root = result.root
    assert not bool(result.failed) and bool(torch.isfinite(root).all())
    # Moore–Penrose-style: the inverse root on the range, zero on the null space.
    expected = (v_range * lam.pow(-1.0 / p)) @ v_range.mT
    torch.testing.assert_close(root, expected, rtol=0.0, atol=1e-12)
    torch.testing.assert_close(root @ v_null, torch.zeros(d, d - rank, dtype=F64), rtol=0.0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.matrix_power(root, p) @ a, projector, rtol=0.0, atol=1e-12)
    if p == 1:
        torch.testing.assert_close(a @ root, projector, rtol=0.0, atol=1e-12)
        torch.testing.assert_close(root, torch.linalg.pinv(a, hermitian=True), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_pseudo_inverse_rank_threshold_is_relative(scale: float) -> None:
    """Scaling A by c scales its pseudo-inverse root by c^(-exponent): the rank cut is relative to λ_max."""
    d, rank = 8, 3
    a, v_range, lam, _ = _rank_deficient(d, rank, seed=6)
    root = matrix_inverse_root(scale * a, 0.5, 0.0, pseudo_inverse=True).root
    expected = (v_range * (scale * lam).pow(-0.5)) @ v_range.mT
    torch.testing.assert_close(root, expected, rtol=0.0, atol=1e-12 * scale**-0.5)


def test_pseudo_inverse_respects_rank_rtol_in_float32() -> None:
    d, rank = 8, 3
    a, v_range, lam, _ = _rank_deficient(d, rank, seed=4)
    # A tiny but genuine eigenvalue (1e-5 of λ_max) is dropped with rank_rtol=1e-3.
    extra = _orthogonal(d, seed=4)[:, rank : rank + 1]
    a_small = (a + 4e-5 * extra @ extra.mT).float()
    result = matrix_inverse_root(a_small, 1.0, 0.0, pseudo_inverse=True, rank_rtol=1e-3)
    assert not bool(result.failed)
    expected = ((v_range * lam.reciprocal()) @ v_range.mT).float()
    torch.testing.assert_close(result.root, expected, rtol=0.0, atol=1e-4)


def test_pseudo_inverse_of_zero_matrix_is_zero() -> None:
    values, vectors, _ = safe_eigh(torch.zeros(2, 4, 4, dtype=F64))
    root = inverse_root_from_eigh(values, vectors, 0.5, 0.0, pseudo_inverse=True)
    assert torch.equal(root, torch.zeros(2, 4, 4, dtype=F64))


def test_singular_matrix_without_damping_is_flagged() -> None:
    a = torch.diag(torch.tensor([0.0, 1.0, 4.0], dtype=F64))
    assert bool(matrix_inverse_root(a, 0.5, 0.0).failed)
    assert not bool(matrix_inverse_root(a, 0.5, 1e-6).failed)


def test_matrix_inverse_root_flags_nonfinite_input_per_matrix() -> None:
    a = _spd_batch(3, 5, seed=5)
    a[1, 0, 2] = float("nan")
    result = matrix_inverse_root(a, 0.5, 1e-2)
    assert result.failed.tolist() == [False, True, False]
    assert bool(torch.isfinite(result.root).all())
    for i in (0, 2):
        torch.testing.assert_close(result.root[i], _root_reference(a[i], 0.5, 1e-2), rtol=0.0, atol=1e-12)


# ---------------------------------------------------------------------------- coupled Newton roots


@pytest.mark.parametrize("p", [1, 2, 4])
def test_coupled_newton_matches_eigh_root(p: int) -> None:
    for seed in range(3):
        a = _spd(torch.logspace(-1, 1, 12, dtype=F64), seed=10 + seed)  # condition number 100
        result = coupled_newton_inverse_root(a, p, tolerance=1e-10)
        assert result.failed.shape == () and not bool(result.failed)
        assert float(result.residual) < 1e-10
        torch.testing.assert_close(result.root, _root_reference(a, 1.0 / p), rtol=0.0, atol=1e-8)
        eye = torch.eye(12, dtype=F64)
        torch.testing.assert_close(torch.linalg.matrix_power(result.root, p) @ a, eye, rtol=0.0, atol=1e-8)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_coupled_newton_batched_with_per_matrix_epsilon(p: int) -> None:
    a = _spd_batch(4, 8, seed=20)
    epsilon = torch.tensor([0.0, 1e-3, 0.1, 1.0], dtype=F64)
    result = coupled_newton_inverse_root(a, p, epsilon, tolerance=1e-10)
    assert result.residual.shape == (4,) and result.failed.shape == (4,)
    assert not bool(result.failed.any())
    assert bool((result.residual < 1e-10).all())
    torch.testing.assert_close(result.root, _root_reference(a, 1.0 / p, epsilon), rtol=0.0, atol=1e-8)
    scalar = coupled_newton_inverse_root(a, p, 0.1, tolerance=1e-10)
    torch.testing.assert_close(scalar.root, _root_reference(a, 1.0 / p, 0.1), rtol=0.0, atol=1e-8)


def test_coupled_newton_float32() -> None:
    a = _spd_batch(2, 8, seed=25)
    result = coupled_newton_inverse_root(a.float(), 4, 1e-3, tolerance=1e-5)
    assert result.root.dtype == torch.float32 and not bool(result.failed.any())
    torch.testing.assert_close(result.root, _root_reference(a, 0.25, 1e-3).float(), rtol=1e-4, atol=1e-4)


def test_coupled_newton_nan_input_fails_only_that_matrix() -> None:
    a = _spd_batch(3, 6, seed=30)
    a[1, 3, 3] = float("nan")
    result = coupled_newton_inverse_root(a, 2, tolerance=1e-10)  # must not raise
    assert result.failed.tolist() == [False, True, False]
    for i in (0, 2):
        assert float(result.residual[i]) < 1e-10
        torch.testing.assert_close(result.root[i], _root_reference(a[i], 0.5), rtol=0.0, atol=1e-8)


def test_coupled_newton_unconverged_is_failed() -> None:
    a = _spd(torch.logspace(-4, 0, 8, dtype=F64), seed=40)  # condition number 1e4
    result = coupled_newton_inverse_root(a, 2, max_iterations=3, check_every=5)
    assert bool(result.failed) and float(result.residual) > 1e-3


@pytest.mark.parametrize("root", [0, -2, 1.5, 2.0])
def test_coupled_newton_rejects_invalid_root(root: float) -> None:
    with pytest.raises(ValueError, match="root"):
        coupled_newton_inverse_root(torch.eye(3), root)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- spectrum stats


def test_spectrum_stats_known_diagonals() -> None:
    eigenvalues = torch.tensor([[1.0, 2.0, 10.0], [0.5, 0.5, 0.5], [0.25, 3.0, 4.0]], dtype=F64)
    stats = spectrum_stats(eigenvalues)
    torch.testing.assert_close(stats.min_eigenvalue, torch.tensor([1.0, 0.5, 0.25], dtype=F64))
    torch.testing.assert_close(stats.max_eigenvalue, torch.tensor([10.0, 0.5, 4.0], dtype=F64))
    torch.testing.assert_close(stats.condition_number, torch.tensor([10.0, 1.0, 16.0], dtype=F64))
    # Consistent with a decomposition of the matrices themselves (order does not matter).
    from_eigh = spectrum_stats(safe_eigh(torch.diag_embed(eigenvalues.flip(-1))).eigenvalues)
    torch.testing.assert_close(from_eigh.condition_number, stats.condition_number, rtol=1e-12, atol=0.0)


def test_spectrum_stats_epsilon_damping() -> None:
    eigenvalues = torch.tensor([1.0, 100.0], dtype=F64)
    stats = spectrum_stats(eigenvalues, epsilon=1.0)
    assert float(stats.condition_number) == pytest.approx(101.0 / 2.0, rel=1e-14)
    # The range is that of the raw eigenvalues; damping enters the condition number only.
    assert float(stats.min_eigenvalue) == 1.0 and float(stats.max_eigenvalue) == 100.0
    per_matrix = spectrum_stats(eigenvalues.expand(3, 2), epsilon=torch.tensor([0.0, 1.0, 100.0], dtype=F64))
    expected = torch.tensor([100.0, 50.5, 200.0 / 101.0], dtype=F64)
    torch.testing.assert_close(per_matrix.condition_number, expected, rtol=1e-14, atol=0.0)


def test_spectrum_stats_rank_deficient() -> None:
    eigenvalues = torch.tensor([[-1e-9, 0.0, 4.0], [0.0, 0.0, 0.0]], dtype=F64)
    undamped = spectrum_stats(eigenvalues)
    assert float(undamped.condition_number[0]) == float("inf")
    assert float(undamped.condition_number[1]) == 1.0  # the zero matrix: defined as 1, not NaN
    assert float(undamped.min_eigenvalue[0]) == -1e-9
    damped = spectrum_stats(eigenvalues, epsilon=1e-2)
    assert bool(torch.isfinite(damped.condition_number).all())
    # Negative round-off is clamped to zero before damping.
    expected = torch.tensor([401.0, 1.0], dtype=F64)
    torch.testing.assert_close(damped.condition_number, expected, rtol=1e-12, atol=0.0)


def test_spectrum_stats_of_rank_deficient_gram_matrix() -> None:
    g = torch.randn(16, 2, generator=torch.Generator().manual_seed(50))
    values = safe_eigh(g @ g.mT).eigenvalues
    top = float(values[-1])
    stats = spectrum_stats(values, epsilon=1e-3)
    cond = float(stats.condition_number)
    assert cond == pytest.approx((top + 1e-3) / 1e-3, rel=1e-2)
    assert bool(torch.isfinite(stats.min_eigenvalue)) and abs(float(stats.min_eigenvalue)) < 1e-4 * top
