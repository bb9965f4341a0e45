"""Unit tests for the PSGD-Kron kernels in ``lightning_shampoo.linalg.psgd``.

The geometry updates are checked against closed forms: with the *expected* gram matrices of a
known gradient covariance ``C`` (``E[Ph hᵀP] = PCP``; for EQ ``E[Qh hᵀQᵀ] = QCQᵀ`` and
``E[Q⁻ᵀv vᵀQ⁻¹] = Q⁻ᵀQ⁻¹``) the iteration is deterministic and must converge to the whitening
preconditioner ``P = C^(-1/2)``; structural invariants (triangular / symmetric / SPD) are exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_shampoo.linalg import (
    balance_factors,
    lipschitz_update,
    procrustes_step,
    smallest_singular_value_estimate,
    spectral_norm_lower_bound,
    update_eq,
    update_q0p5eq1p5,
    update_quad,
)
from lightning_shampoo.linalg.psgd import rademacher_probes

F64 = torch.float64


def _orthogonal(d: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _spd(d: int, cond: float, seed: int, n: int | None = None) -> Tensor:
    """SPD matrix (or ``n`` of them) with eigenvalues log-spaced in ``[1, cond]``."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0.0, math.log10(cond), d, dtype=F64)
    mats = [(q * spectrum) @ q.T for q in (_orthogonal(d, gen) for _ in range(n or 1))]
    out = torch.stack([(m + m.T) / 2 for m in mats])
    return out if n is not None else out[0]


def _inv_sqrt(c: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(c)
    return (vectors * values.rsqrt().unsqueeze(-2)) @ vectors.mT


# ------------------------------------------------------------------------------- norm bounds


@pytest.mark.parametrize("d", [1, 3, 16, 40])
def test_spectral_norm_lower_bound_is_a_tight_lower_bound(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(20, d, d, generator=gen, dtype=F64)
    cases = {
        "spd": (x @ x.mT, 0.85),
        "skew": (x - x.mT, 0.7),
        "general": (x, 0.0),  # still a lower bound; tight only for normal matrices
        "rank1": ((v := torch.randn(20, d, 1, generator=gen, dtype=F64)) @ v.mT, 0.999),
    }
    for name, (a, tightness) in cases.items():
        bound = spectral_norm_lower_bound(a)
        exact = torch.linalg.matrix_norm(a, ord=2)
        assert bound.shape == (20,)
        assert bool((bound <= exact * (1 + 1e-12)).all()), name
        if name != "skew" or d > 1:  # a 1x1 skew matrix is zero
            assert float((bound / exact).min()) >= tightness, name


def test_spectral_norm_lower_bound_edge_cases() -> None:
    assert torch.equal(spectral_norm_lower_bound(torch.zeros(3, 5, 5)), torch.zeros(3))
    a = _spd(12, 1e3, seed=1, n=4)
    batched = spectral_norm_lower_bound(a)
    single = torch.stack([spectral_norm_lower_bound(m) for m in a])
    torch.testing.assert_close(batched, single)
    # Homogeneous of degree 1, and tiny / huge scales neither underflow nor overflow in float32.
    small = a.float() * 1e-30
    torch.testing.assert_close(spectral_norm_lower_bound(small) * 1e30, batched.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        spectral_norm_lower_bound(a.float() * 1e30) / 1e30, batched.float(), rtol=1e-5, atol=0
    )


def test_rademacher_probes_are_fixed_signs() -> None:
    p = rademacher_probes(8, 50, torch.device("cpu"), torch.float32)
    assert torch.equal(p.abs(), torch.ones(8, 50))
    assert torch.equal(p, rademacher_probes(8, 50, torch.device("cpu"), torch.float32))
    assert 0.3 < float((p > 0).float().mean()) < 0.7  # balanced, not all one sign
    assert torch.linalg.matrix_rank(p.double()) == 8


@pytest.mark.parametrize("triangular", [False, True])
def test_smallest_singular_value_estimate(triangular: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    d, n = 10, 8
    singular = torch.logspace(0.0, -3.0, d, dtype=F64)
    q = torch.stack([(_orthogonal(d, gen) * singular) @ _orthogonal(d, gen).T for _ in range(n)])
    if triangular:
        q = torch.linalg.qr(q).R  # same singular values, upper triangular
    est = smallest_singular_value_estimate(q, triangular=triangular)
    exact = torch.linalg.svdvals(q)[:, -1]
    assert bool((est >= exact * (1 - 1e-9)).all())  # an estimate from above
    assert float((est / exact).max()) < 1.1  # and close for a separated smallest value
    singular_q = q.clone()
    singular_q[:, :, 0] = 0.0  # rank-deficient
    if triangular:
        singular_q = torch.triu(singular_q)
    assert torch.equal(
        smallest_singular_value_estimate(singular_q, triangular=triangular), torch.zeros(n, dtype=F64)
    )


def test_lipschitz_update_follows_increases_at_once_and_decreases_slowly() -> None:
    lips = torch.tensor([1.0, 1.0, 0.0])
    ell = torch.tensor([3.0, 0.5, 2.0])
    torch.testing.assert_close(lipschitz_update(lips, ell, 0.9), torch.tensor([3.0, 0.95, 2.0]))


# ------------------------------------------------------------------------- geometry updates


def _whiten_expected(mode: str, c: Tensor, steps: int, lr: float) -> Tensor:
    """Iterate one dense factor (``N = d``, so the identity weight is 1) on the *expected* grams of
    gradients with covariance ``c``; returns the final ``Q``."""
    d = c.shape[-1]
    q = torch.eye(d, dtype=F64).expand_as(c).clone()
    lips = torch.zeros(c.shape[:-2], dtype=F64)
    for _ in range(steps):
        if mode == "EQ":
            inv = torch.linalg.solve_triangular(q, torch.eye(d, dtype=F64).expand_as(q), upper=True)
            q, lips = update_eq(q, q @ c @ q.mT, inv.mT @ inv, lips, lr=lr, beta=0.9)
        else:
            p = q.mT @ q
            fn = update_q0p5eq1p5 if mode == "Q0.5EQ1.5" else update_quad
            q, lips = fn(q, p @ c @ p, 1.0, lips, lr=lr, beta=0.9)
    return q


@pytest.mark.parametrize(
    ("mode", "steps", "atol"),
    # EQ converges slowest: its step is normalised by ‖QCQᵀ + Q⁻ᵀQ⁻¹‖, whose spread is cond(P).
    [("Q0.5EQ1.5", 300, 1e-10), ("QUAD", 300, 1e-10), ("EQ", 1500, 1e-3)],
)
def test_expected_gram_iteration_converges_to_whitening_preconditioner(
    mode: str, steps: int, atol: float
) -> None:
    c = _spd(6, 1e3, seed=4, n=3)
    q = _whiten_expected(mode, c, steps=steps, lr=0.15 if mode == "EQ" else 0.1)
    p = q.mT @ q
    torch.testing.assert_close(p @ c @ p, torch.eye(6, dtype=F64).expand_as(c), rtol=0, atol=atol)
    torch.testing.assert_close(p, _inv_sqrt(c), rtol=0, atol=atol * float(_inv_sqrt(c).abs().max()))


@pytest.mark.parametrize("mode", ["Q0.5EQ1.5", "EQ", "QUAD"])
def test_geometry_updates_fix_a_whitened_factor(mode: str) -> None:
    """``E = 0`` (gram equal to its target) leaves ``Q`` where it is, dense and diagonal."""
    gen = torch.Generator().manual_seed(5)
    d, c = 5, 3.0
    sym = _spd(d, 10.0, seed=6, n=2)
    tri = torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=F64)).R
    diag = torch.rand(2, d, generator=gen, dtype=F64) + 0.5
    lips = torch.ones(2, dtype=F64)
    eye = c * torch.eye(d, dtype=F64).expand(2, d, d)
    if mode == "EQ":
        new, _ = update_eq(tri, eye, eye, lips, lr=0.1, beta=0.9)
        torch.testing.assert_close(new, tri, rtol=0, atol=0)
        new_diag, _ = update_eq(diag, diag * 0 + c, diag * 0 + c, lips, lr=0.1, beta=0.9, diagonal=True)
    else:
        fn = update_q0p5eq1p5 if mode == "Q0.5EQ1.5" else update_quad
        new, _ = fn(sym, eye, c, lips, lr=0.1, beta=0.9)
        torch.testing.assert_close(new, sym, rtol=1e-14, atol=1e-14)
        new_diag, _ = fn(diag, diag * 0 + c, c, lips, lr=0.1, beta=0.9, diagonal=True)
    torch.testing.assert_close(new_diag, diag, rtol=0, atol=0)


def _noisy_gram_iteration(mode: str, steps: int = 300) -> list[Tensor]:
    """Dense 2-factor-free iteration on *sampled* grams (one gradient per step) from an SPD start;
    returns the iterates."""
    gen = torch.Generator().manual_seed(7)
    d = 7
    c = _spd(d, 1e3, seed=8, n=4)
    chol = torch.linalg.cholesky(c)
    q = _spd(d, 5.0, seed=9, n=4)
    if mode == "EQ":
        q = torch.linalg.cholesky(q).mT  # upper triangular start
    lips = torch.zeros(4, dtype=F64)
    out = []
    for _ in range(steps):
        h = chol @ torch.randn(4, d, 1, generator=gen, dtype=F64)
        if mode == "EQ":
            v = torch.randn(4, d, 1, generator=gen, dtype=F64)
            a = q @ h
            b = torch.linalg.solve_triangular(q.mT, v, upper=False)
            q, lips = update_eq(q, a @ a.mT, b @ b.mT, lips, lr=0.1, beta=0.9)
        else:
            ph = q.mT @ (q @ h)
            fn = update_q0p5eq1p5 if mode == "Q0.5EQ1.5" else update_quad
            q, lips = fn(q, ph @ ph.mT, 1.0, lips, lr=0.1, beta=0.9)
        out.append(q)
    return out


def test_eq_keeps_q_upper_triangular() -> None:
    for q in _noisy_gram_iteration("EQ"):
        assert torch.equal(torch.tril(q, diagonal=-1), torch.zeros_like(q))
        assert bool((torch.diagonal(q, dim1=-2, dim2=-1).abs() > 0).all())


def test_quad_keeps_q_symmetric_positive_definite() -> None:
    for q in _noisy_gram_iteration("QUAD"):
        assert torch.equal(q, q.mT)
        assert float(torch.linalg.eigvalsh(q).min()) > 0.0


def test_q0p5eq1p5_keeps_q_close_to_symmetric() -> None:
    worst = max(
        float((torch.linalg.matrix_norm(q - q.mT) / torch.linalg.matrix_norm(q)).max())
        for q in _noisy_gram_iteration("Q0.5EQ1.5")
    )
    assert worst < 1e-2
    final = _noisy_gram_iteration("Q0.5EQ1.5")[-1]
    assert float(torch.linalg.eigvalsh((final + final.mT) / 2).min()) > 0.0


def test_procrustes_step_rotates_towards_the_spd_root_keeping_qtq() -> None:
    """From ``Q = U·S`` (``U`` a rotation, ``S`` SPD), each step keeps ``QᵀQ = S²`` to second order
    and shrinks the asymmetry; repeated steps recover ``S``."""
    gen = torch.Generator().manual_seed(10)
    d = 6
    s = _spd(d, 20.0, seed=11, n=3)
    skew = torch.randn(3, d, d, generator=gen, dtype=F64)
    u = torch.linalg.matrix_exp(
        0.3 * (skew - skew.mT) / torch.linalg.matrix_norm(skew - skew.mT)[:, None, None]
    )
    q = u @ s
    for _ in range(60):
        new = procrustes_step(q)
        drift = torch.linalg.matrix_norm(new.mT @ new - q.mT @ q) / torch.linalg.matrix_norm(q.mT @ q)
        assert float(drift.max()) < 2e-3
        # The rotation ascends tr(UQ), which the SPD root maximises over all rotations.
        trace = torch.diagonal(q, dim1=-2, dim2=-1).sum(-1)
        assert bool((torch.diagonal(new, dim1=-2, dim2=-1).sum(-1) >= trace - 1e-12).all())
        q = new
    torch.testing.assert_close(q, s, rtol=0, atol=1e-3 * float(s.abs().max()))
    symmetric = _spd(d, 20.0, seed=12, n=2)
    torch.testing.assert_close(procrustes_step(symmetric), symmetric, rtol=0, atol=0)


def test_balance_factors_keeps_the_kronecker_product() -> None:
    gen = torch.Generator().manual_seed(13)
    dense = 100.0 * torch.randn(2, 3, 3, generator=gen, dtype=F64)
    diag = 1e-3 * torch.rand(2, 4, generator=gen, dtype=F64)
    other = torch.randn(2, 2, 2, generator=gen, dtype=F64)
    factors = balance_factors([dense, diag, other])
    for b in range(2):
        before = torch.kron(torch.kron(dense[b], torch.diag(diag[b])), other[b])
        after = torch.kron(torch.kron(factors[0][b], torch.diag(factors[1][b])), factors[2][b])
        torch.testing.assert_close(after, before)
    peaks = torch.stack([f.abs().flatten(1).amax(1) for f in factors])
    torch.testing.assert_close(peaks, peaks[:1].expand_as(peaks))
    assert balance_factors([dense]) == [dense]
