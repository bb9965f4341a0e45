"""Unit tests for orthogonal iteration and the polar-factor kernels in ``lightning_shampoo.linalg``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_shampoo.linalg import (
    NEWTON_SCHULZ_COEFFICIENTS,
    newton_schulz,
    orthogonal_iteration,
    rayleigh_quotients,
    svd_orthogonalize,
)

F64 = torch.float64


def _orthogonal(d: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def _symmetric(spectrum: Tensor, basis: Tensor) -> Tensor:
    a = (basis * spectrum) @ basis.mT
    return (a + a.mT) / 2


def _align_signs(q: Tensor, reference: Tensor) -> Tensor:
    signs = torch.sign((q * reference).sum(-2))
    return q * signs.unsqueeze(-2)


def _with_singular_values(m: int, n: int, singular_values: Tensor, seed: int) -> Tensor:
    """``U diag(s) Vᵀ`` with random orthonormal ``U`` ``[m, k]`` and ``V`` ``[n, k]``."""
    k = singular_values.shape[-1]
    u = _orthogonal(m, seed, singular_values.dtype)[:, :k]
    v = _orthogonal(n, seed + 1000, singular_values.dtype)[:, :k]
    return (u * singular_values) @ v.mT


# ------------------------------------------------------------------------------ orthogonal iteration


def test_rayleigh_quotients_are_the_diagonal_of_the_projection() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, 6, generator=g, dtype=F64)
    a = a + a.mT
    q = torch.linalg.qr(torch.randn(3, 6, 6, generator=g, dtype=F64)).Q
    expected = torch.diagonal(q.mT @ a @ q, dim1=-2, dim2=-1)
    torch.testing.assert_close(rayleigh_quotients(a, q), expected, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_exact_eigenvectors_are_a_fixed_point(steps: int) -> None:
    d = 8
    spectrum = torch.linspace(0.5, 4.0, d, dtype=F64)  # ascending, as eigh returns it
    v = _orthogonal(d, seed=1)
    a = _symmetric(spectrum, v)
    result = orthogonal_iteration(a, v, power_iter_steps=steps)
    assert not bool(result.failed)
    descending = torch.arange(d - 1, -1, -1)
    assert torch.equal(result.permutation, descending)
    torch.testing.assert_close(result.eigenvalues, spectrum.flip(0), rtol=0.0, atol=1e-12)
    expected = v[:, descending]
    # Same columns up to sign: every column is ±1 times the expected one.
    torch.testing.assert_close(_align_signs(result.eigenvectors, expected), expected, rtol=0.0, atol=1e-12)
    torch.testing.assert_close(
        (result.eigenvectors * expected).sum(0).abs(), torch.ones(d, dtype=F64), rtol=0.0, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_converges_from_identity_to_well_separated_spectrum(dtype: torch.dtype) -> None:
    d = 8
    spectrum = 10.0 * 0.5 ** torch.arange(d, dtype=F64)  # gaps of a factor 2
    v = _orthogonal(d, seed=2)
    a = torch.stack([_symmetric(spectrum, v), _symmetric(3.0 * spectrum, _orthogonal(d, seed=3))])
    a = a.to(dtype)
    result = orthogonal_iteration(a, torch.eye(d, dtype=dtype).expand(2, d, d), power_iter_steps=80)
    assert result.failed.tolist() == [False, False]
    assert bool((result.eigenvalues[:, :-1] > result.eigenvalues[:, 1:]).all())  # descending
    expected = torch.stack([spectrum, 3.0 * spectrum]).to(dtype)
    tol = 1e-10 if dtype == F64 else 1e-5
    torch.testing.assert_close(result.eigenvalues, expected, rtol=tol, atol=tol)
    # Converged basis: orthonormal, and A Q = Q Λ.
    q = result.eigenvectors
    eye = torch.eye(d, dtype=dtype).expand(2, d, d)
    torch.testing.assert_close(q.mT @ q, eye, rtol=0.0, atol=tol)
    torch.testing.assert_close(a @ q, q * result.eigenvalues.unsqueeze(-2), rtol=0.0, atol=30 * tol)


def test_single_step_from_identity_is_one_qr_of_a() -> None:
    d = 6
    a = _symmetric(torch.linspace(1.0, 6.0, d, dtype=F64), _orthogonal(d, seed=4))
    result = orthogonal_iteration(a, torch.eye(d, dtype=F64), sort=False)
    assert result.permutation is None
    q = torch.linalg.qr(a).Q
    torch.testing.assert_close(result.eigenvectors, q, rtol=0.0, atol=1e-12)
    torch.testing.assert_close(result.eigenvalues, rayleigh_quotients(a, q), rtol=0.0, atol=1e-12)


def test_permutation_sorts_a_scrambled_basis_by_descending_eigenvalue() -> None:
    d = 7
    spectrum = torch.tensor([0.3, 1.0, 2.0, 3.5, 5.0, 8.0, 13.0], dtype=F64)
    scrambles = [torch.tensor([3, 0, 6, 1, 5, 2, 4]), torch.tensor([6, 2, 0, 4, 1, 3, 5])]
    bases, matrices = [], []
    for i, scramble in enumerate(scrambles):
        v = _orthogonal(d, seed=10 + i)
        matrices.append(_symmetric(spectrum, v))
        bases.append(v[:, scramble])  # eigenvectors in scrambled order, eigenvalue spectrum[scramble]
    a, basis = torch.stack(matrices), torch.stack(bases)
    result = orthogonal_iteration(a, basis)
    assert result.permutation is not None and result.permutation.shape == (2, d)
    for i, scramble in enumerate(scrambles):
        permutation = result.permutation[i]
        expected = spectrum[scramble].argsort(descending=True)
        assert torch.equal(permutation, expected)
        # Applying it to the previous columns orders them by descending eigenvalue …
        torch.testing.assert_close(spectrum[scramble][permutation], spectrum.flip(0), rtol=0.0, atol=0.0)
        reordered = basis[i][:, permutation]
        torch.testing.assert_close(reordered, basis[i].gather(-1, permutation.expand(d, d)))
        # … which is what the iteration then refined (a fixed point up to signs).
        torch.testing.assert_close(
            _align_signs(result.eigenvectors[i], reordered), reordered, rtol=0.0, atol=1e-12
        )
    torch.testing.assert_close(result.eigenvalues, spectrum.flip(0).expand(2, d), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("steps", [0, -1])
def test_orthogonal_iteration_rejects_non_positive_steps(steps: int) -> None:
    with pytest.raises(ValueError, match="power_iter_steps"):
        orthogonal_iteration(torch.eye(3), torch.eye(3), power_iter_steps=steps)


def test_orthogonal_iteration_flags_nonfinite_matrix() -> None:
    a = torch.eye(4, dtype=F64).repeat(2, 1, 1) * 2.0
    a[0, 1, 1] = float("nan")
    result = orthogonal_iteration(a, torch.eye(4, dtype=F64).expand(2, 4, 4))
    assert result.failed.tolist() == [True, False]
    torch.testing.assert_close(result.eigenvalues[1], torch.full((4,), 2.0, dtype=F64))


# ------------------------------------------------------------------------------------ Newton–Schulz


def test_default_newton_schulz_coefficients() -> None:
    assert NEWTON_SCHULZ_COEFFICIENTS == (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize(("m", "n"), [(16, 16), (32, 32), (8, 24), (24, 8), (1, 12)])
def test_newton_schulz_singular_values_in_band(m: int, n: int) -> None:
    """Five quintic steps send a full-rank matrix's singular values into roughly [0.6, 1.3].

    A square Gaussian matrix is not used: its smallest singular value can be arbitrarily close to
    zero, and five steps only amplify it by about 3.4445⁵ ≈ 485. Here the condition number is 20.
    """
    k = min(m, n)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        s = torch.logspace(-1.3, 0, k, dtype=F64)[torch.randperm(k, generator=g)]
        x = _with_singular_values(m, n, s, seed=100 + seed).float() * 37.0
        y = newton_schulz(x)
        assert y.shape == (m, n) and y.dtype == torch.float32
        sv = torch.linalg.svdvals(y)
        assert float(sv.min()) > 0.6 and float(sv.max()) < 1.3, sv


@pytest.mark.parametrize(("m", "n"), [(12, 20), (20, 12)])
def test_newton_schulz_on_rectangular_gaussian(m: int, n: int) -> None:
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(5))
    sv = torch.linalg.svdvals(newton_schulz(x))
    assert float(sv.min()) > 0.6 and float(sv.max()) < 1.3, sv


def test_newton_schulz_keeps_singular_vectors() -> None:
    """The iteration is an odd polynomial in G: ``NS(U S Vᵀ) = U f(S) Vᵀ``."""
    x = torch.randn(10, 14, generator=torch.Generator().manual_seed(6), dtype=F64)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    core = u.mT @ newton_schulz(x) @ vh.mT
    off_diagonal = core - torch.diag_embed(torch.diagonal(core))
    assert float(off_diagonal.abs().max()) < 1e-10
    assert float(torch.diagonal(core).min()) > 0.6 and float(torch.diagonal(core).max()) < 1.3


def test_newton_schulz_tall_is_transpose_of_wide() -> None:
    x = torch.randn(6, 15, generator=torch.Generator().manual_seed(7), dtype=F64)
    torch.testing.assert_close(newton_schulz(x.mT), newton_schulz(x).mT, rtol=0.0, atol=1e-12)


def test_newton_schulz_batched_equals_per_matrix() -> None:
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(8))
    y = newton_schulz(x)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(y[i, j], newton_schulz(x[i, j]), rtol=1e-5, atol=1e-5)


def test_newton_schulz_is_scale_invariant() -> None:
    x = torch.randn(9, 9, generator=torch.Generator().manual_seed(9), dtype=F64)
    exact = newton_schulz(x, epsilon=0.0)
    torch.testing.assert_close(newton_schulz(1e3 * x, epsilon=0.0), exact, rtol=0.0, atol=1e-12)
    # The default epsilon (1e-7 added to ‖X‖_F ≈ 9) only perturbs the result slightly.
    torch.testing.assert_close(newton_schulz(x), exact, rtol=0.0, atol=1e-5)


def test_newton_schulz_zero_input_gives_zero() -> None:
    y = newton_schulz(torch.zeros(3, 5, 7))
    assert torch.equal(y, torch.zeros(3, 5, 7))


def test_cubic_newton_schulz_converges_to_the_polar_factor() -> None:
    """With the classical cubic coefficients (1.5, -0.5, 0) the map converges to ``U Vᵀ`` exactly."""
    x = _with_singular_values(12, 9, torch.logspace(-1, 0, 9, dtype=F64), seed=11)
    y = newton_schulz(x, steps=60, coefficients=(1.5, -0.5, 0.0))
    torch.testing.assert_close(y, svd_orthogonalize(x), rtol=0.0, atol=1e-10)


# ------------------------------------------------------------------------------- SVD orthogonalize


@pytest.mark.parametrize(("m", "n"), [(8, 8), (12, 5), (5, 12)])
def test_svd_orthogonalize_full_rank_is_u_vt(m: int, n: int) -> None:
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(12), dtype=F64)
    y = svd_orthogonalize(x)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(y, u @ vh, rtol=0.0, atol=1e-12)
    k = min(m, n)
    gram = y.mT @ y if m >= n else y @ y.mT  # orthonormal columns (tall) or rows (wide)
    torch.testing.assert_close(gram, torch.eye(k, dtype=F64), rtol=0.0, atol=1e-12)
    # Polar decomposition: X = Y (XᵀX)^{1/2} with the second factor symmetric PSD.
    h = y.mT @ x
    torch.testing.assert_close(h, h.mT, rtol=0.0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(h).min()) > -1e-12


def test_svd_orthogonalize_float32_and_batched() -> None:
    x = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(13))
    y = svd_orthogonalize(x)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(y[i, j], svd_orthogonalize(x[i, j]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y @ y.mT, torch.eye(6).expand(2, 3, 6, 6), rtol=0.0, atol=1e-5)


def test_svd_orthogonalize_zero_input_gives_zero() -> None:
    y = svd_orthogonalize(torch.zeros(2, 4, 6))
    assert torch.equal(y, torch.zeros(2, 4, 6))


@pytest.mark.parametrize(("m", "n", "rank"), [(8, 8, 3), (10, 6, 2), (5, 9, 4)])
def test_svd_orthogonalize_rank_deficient_is_partial_isometry(m: int, n: int, rank: int) -> None:
    g = torch.Generator().manual_seed(14)
    x = torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64)
    y = svd_orthogonalize(x)
    assert bool(torch.isfinite(y).all())
    sv = torch.linalg.svdvals(y)
    expected = torch.cat([torch.ones(rank, dtype=F64), torch.zeros(min(m, n) - rank, dtype=F64)])
    torch.testing.assert_close(sv, expected, rtol=0.0, atol=1e-10)
    torch.testing.assert_close(y @ y.mT @ y, y, rtol=0.0, atol=1e-10)
    # Same column and row spaces as X, and X = Y (XᵀX)^{1/2}.
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(y, u[:, :rank] @ vh[:rank], rtol=0.0, atol=1e-10)
    torch.testing.assert_close(y @ (y.mT @ x), x, rtol=0.0, atol=1e-10)


def test_svd_orthogonalize_rank_rtol_drops_small_singular_values() -> None:
    s = torch.tensor([1.0, 0.5, 1e-3, 1e-4], dtype=F64)
    x = _with_singular_values(6, 4, s, seed=15)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(svd_orthogonalize(x), u @ vh, rtol=0.0, atol=1e-10)
    truncated = svd_orthogonalize(x, rank_rtol=1e-2)
    torch.testing.assert_close(truncated, u[:, :2] @ vh[:2], rtol=0.0, atol=1e-10)
