"""Unit tests for :func:`lightning_shampoo.linalg.safe_eigh` and its fallback ladder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_shampoo.linalg import DEFAULT_JITTERS, finite_matrices, safe_eigh

# Checks that depend on precision: (atol on eigenpairs relative to the spectral norm).
PAIR_ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}

_REAL_EIGH = torch.linalg.eigh


def _orthogonal(d: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def _spd(spectrum: Tensor, seed: int) -> Tensor:
    q = _orthogonal(spectrum.shape[-1], seed, spectrum.dtype)
    a = (q * spectrum) @ q.mT
    return (a + a.mT) / 2


def _random_spd_batch(batch: tuple[int, ...], d: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Well separated spectra in [1, 10] so that eigenvectors are unique up to sign."""
    out = torch.empty(*batch, d, d, dtype=dtype)
    flat = out.view(-1, d, d)
    for i in range(flat.shape[0]):
        spectrum = torch.linspace(1.0, 10.0, d, dtype=torch.float64) * (1.0 + 0.1 * i)
        flat[i] = _spd(spectrum, seed + i).to(dtype)
    return out


def _assert_eigenpairs(a: Tensor, values: Tensor, vectors: Tensor, atol: float) -> None:
    """``A Q = Q Λ``, ``Qᵀ Q = I`` and ascending ``Λ`` (tolerance scaled by ``‖A‖₂``)."""
    scale = max(float(torch.linalg.matrix_norm(a, 2).amax()), 1.0)
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    torch.testing.assert_close(a @ vectors, vectors * values.unsqueeze(-2), rtol=0.0, atol=atol * scale)
    torch.testing.assert_close(vectors.mT @ vectors, eye, rtol=0.0, atol=atol * 10)
    assert bool((values[..., 1:] >= values[..., :-1]).all())


def _align_signs(q: Tensor, reference: Tensor) -> Tensor:
    signs = torch.sign((q * reference).sum(-2))
    return q * signs.unsqueeze(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity(dtype: torch.dtype) -> None:
    a = torch.eye(6, dtype=dtype)
    values, vectors, failed = safe_eigh(a)
    assert failed.shape == () and not bool(failed)
    assert values.dtype == dtype and vectors.dtype == dtype
    torch.testing.assert_close(values, torch.ones(6, dtype=dtype), rtol=0.0, atol=PAIR_ATOL[dtype])
    _assert_eigenpairs(a, values, vectors, PAIR_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_eigenvalues_are_the_sorted_diagonal(dtype: torch.dtype) -> None:
    diagonal = torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0, 0.0], dtype=dtype)
    a = torch.diag(diagonal)
    values, vectors, failed = safe_eigh(a)
    assert not bool(failed)
    torch.testing.assert_close(values, diagonal.sort().values, rtol=0.0, atol=PAIR_ATOL[dtype])
    # Distinct diagonal entries: the eigenvectors are the (signed) coordinate axes in sorted order.
    order = diagonal.argsort()
    expected = torch.eye(6, dtype=dtype)[:, order]
    torch.testing.assert_close(vectors.abs(), expected, rtol=0.0, atol=PAIR_ATOL[dtype])


@pytest.mark.parametrize("n", [2, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tridiagonal_closed_form(n: int, dtype: torch.dtype) -> None:
    a = 2.0 * torch.eye(n, dtype=dtype) - torch.diag(torch.ones(n - 1, dtype=dtype), 1)
    a = a - torch.diag(torch.ones(n - 1, dtype=dtype), -1)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    expected = (2.0 - 2.0 * torch.cos(k * math.pi / (n + 1))).to(dtype)
    values, vectors, failed = safe_eigh(a)
    assert not bool(failed)
    torch.testing.assert_close(values, expected, rtol=0.0, atol=PAIR_ATOL[dtype] * 4)
    _assert_eigenpairs(a, values, vectors, PAIR_ATOL[dtype])


@pytest.mark.parametrize(("dtype", "rel_tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rank_deficient_gram_matrix(dtype: torch.dtype, rel_tol: float) -> None:
    d, rank = 12, 3
    g = torch.randn(d, rank, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = (g @ g.mT).to(dtype)
    values, vectors, failed = safe_eigh(a)
    assert not bool(failed)
    top = float(values[-1])
    # d - rank eigenvalues vanish to tolerance, the others are the squared singular values of G.
    assert float(values[: d - rank].abs().max()) < rel_tol * top
    expected_top = torch.linalg.svdvals(g).pow(2).flip(0).to(dtype)
    torch.testing.assert_close(values[d - rank :], expected_top, rtol=rel_tol * 10, atol=0.0)
    assert int((values > 1e3 * rel_tol * top).sum()) == rank
    # The leading eigenvectors span the column space of G.
    range_basis = vectors[:, d - rank :]
    gd = g.to(dtype)
    torch.testing.assert_close(range_basis @ (range_basis.mT @ gd), gd, rtol=0.0, atol=rel_tol * 100 * top)
    _assert_eigenpairs(a, values, vectors, PAIR_ATOL[dtype])


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_matrices_are_flagged_per_matrix(bad_value: float, dtype: torch.dtype) -> None:
    d = 5
    good = _random_spd_batch((4,), d, seed=10, dtype=dtype)
    batch = good.clone()
    batch[1, 2, 3] = bad_value
    batch[3, 0, 0] = bad_value
    values, vectors, failed = safe_eigh(batch)  # must not raise
    assert failed.tolist() == [False, True, False, True]
    assert bool(torch.isfinite(values).all()) and bool(torch.isfinite(vectors).all())
    # Failed matrices carry the documented placeholders.
    torch.testing.assert_close(values[failed], torch.ones(2, d, dtype=dtype), rtol=0.0, atol=0.0)
    torch.testing.assert_close(vectors[failed], torch.eye(d, dtype=dtype).expand(2, d, d), rtol=0.0, atol=0.0)
    # Their neighbours are decomposed as if alone.
    ok = ~failed
    _assert_eigenpairs(good[ok], values[ok], vectors[ok], PAIR_ATOL[dtype])
    reference = _REAL_EIGH(good[ok]).eigenvalues
    torch.testing.assert_close(values[ok], reference, rtol=0.0, atol=PAIR_ATOL[dtype] * 10)


def test_nonfinite_flags_keep_the_batch_shape() -> None:
    batch = _random_spd_batch((2, 3), 4, seed=20, dtype=torch.float64)
    batch[1, 2, 0, 1] = float("nan")
    batch[0, 0, 3, 3] = float("inf")
    values, vectors, failed = safe_eigh(batch)
    assert failed.shape == (2, 3)
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[1, 2] = expected[0, 0] = True
    assert torch.equal(failed, expected)
    _assert_eigenpairs(batch[~failed], values[~failed], vectors[~failed], PAIR_ATOL[torch.float64])


def test_single_nonfinite_matrix() -> None:
    a = torch.full((3, 3), float("nan"))
    values, vectors, failed = safe_eigh(a)
    assert failed.shape == () and bool(failed)
    assert torch.equal(values, torch.ones(3)) and torch.equal(vectors, torch.eye(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_equals_per_matrix(dtype: torch.dtype) -> None:
    batch = _random_spd_batch((2, 3), 6, seed=30, dtype=dtype)
    values, vectors, failed = safe_eigh(batch)
    assert failed.shape == (2, 3) and not bool(failed.any())
    for i in range(2):
        for j in range(3):
            v, q, f = safe_eigh(batch[i, j])
            assert not bool(f)
            torch.testing.assert_close(values[i, j], v, rtol=0.0, atol=PAIR_ATOL[dtype] * 10)
            torch.testing.assert_close(
                _align_signs(vectors[i, j], q), q, rtol=0.0, atol=PAIR_ATOL[dtype] * 100
            )


@pytest.mark.parametrize("shape", [(3, 4), (5,), (2, 3, 4)])
def test_rejects_non_square_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        safe_eigh(torch.zeros(shape))


# --------------------------------------------------------------------- fallback ladder (monkeypatched)


def test_float64_rung_rescues_float32_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.dtype, int]] = []

    def fake_eigh(x: Tensor, *args, **kwargs):
        calls.append((x.dtype, x.ndim))
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("float32 eigh failed")
        return _REAL_EIGH(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fake_eigh)
    batch64 = _random_spd_batch((3,), 5, seed=40, dtype=torch.float64)
    batch = batch64.float()
    values, vectors, failed = safe_eigh(batch)
    assert not bool(failed.any())
    assert values.dtype == torch.float32 and vectors.dtype == torch.float32
    # One batched float32 attempt, then exactly one float64 rung per matrix (no jitter needed).
    assert calls == [(torch.float32, 3)] + [(torch.float64, 2)] * 3
    reference = _REAL_EIGH(batch.double()).eigenvalues.float()
    torch.testing.assert_close(values, reference, rtol=0.0, atol=1e-5)
    _assert_eigenpairs(batch, values, vectors, PAIR_ATOL[torch.float32])


def test_all_rungs_failing_gives_all_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def failing_eigh(x: Tensor, *args, **kwargs):
        calls.append(x.ndim)
        raise torch.linalg.LinAlgError("always fails")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    d = 4
    batch = _random_spd_batch((3,), d, seed=50, dtype=torch.float32)
    batch[2, 1, 1] = float("nan")
    values, vectors, failed = safe_eigh(batch)  # must not raise
    assert failed.tolist() == [True, True, True]
    assert torch.equal(values, torch.ones(3, d))
    assert torch.equal(vectors, torch.eye(d).expand(3, d, d))
    # Batched call, then float64 + every jitter for each finite matrix; the NaN one is never tried.
    assert calls == [3] + [2] * (2 * (1 + len(DEFAULT_JITTERS)))


def test_per_matrix_ladder_when_only_batched_call_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def eigh_without_batches(x: Tensor, *args, **kwargs):
        calls.append(x.ndim)
        if x.ndim == 3:
            raise torch.linalg.LinAlgError("batched eigh failed")
        return _REAL_EIGH(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_without_batches)
    batch = _random_spd_batch((4,), 6, seed=60, dtype=torch.float64)
    batch[2, 0, 0] = float("nan")
    values, vectors, failed = safe_eigh(batch)
    assert failed.tolist() == [False, False, True, False]
    # Float64 input has no float64 rung: each finite matrix succeeds at its first (tiny) jitter.
    assert calls == [3, 2, 2, 2]
    ok = ~failed
    reference = _REAL_EIGH(batch[ok])
    torch.testing.assert_close(values[ok], reference.eigenvalues, rtol=0.0, atol=1e-9)
    torch.testing.assert_close(
        _align_signs(vectors[ok], reference.eigenvectors), reference.eigenvectors, rtol=0.0, atol=1e-8
    )
    assert torch.equal(values[2], torch.ones(6)) and torch.equal(vectors[2], torch.eye(6))


def test_jitter_shift_is_subtracted_from_eigenvalues(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Tensor] = []

    def eigh_failing_once(x: Tensor, *args, **kwargs):
        seen.append(x.clone())
        if len(seen) == 1:
            raise torch.linalg.LinAlgError("first call fails")
        return _REAL_EIGH(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_once)
    spectrum = torch.tensor([0.5, 1.0, 3.0, 8.0], dtype=torch.float64)
    a = _spd(spectrum, seed=70)
    values, vectors, failed = safe_eigh(a, retry_float64=False, jitters=(0.5,))
    assert not bool(failed)
    # The rung decomposed A + 0.5·mean|diag A|·I; the shift must be removed again.
    shift = 0.5 * float(a.diagonal().abs().mean())
    assert len(seen) == 2
    torch.testing.assert_close(seen[1] - a, shift * torch.eye(4, dtype=torch.float64), rtol=0.0, atol=1e-12)
    torch.testing.assert_close(values, spectrum, rtol=0.0, atol=1e-12)
    _assert_eigenpairs(a, values, vectors, 1e-12)


def test_nonfinite_batched_output_is_rescued(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batched call that returns NaN for one finite matrix (without raising) sends it down the ladder."""

    def eigh_poisoning_second(x: Tensor, *args, **kwargs):
        values, vectors = _REAL_EIGH(x, *args, **kwargs)
        if x.ndim == 3:
            values = values.clone()
            values[1] = float("nan")
        return torch.return_types.linalg_eigh((values, vectors))

    monkeypatch.setattr(torch.linalg, "eigh", eigh_poisoning_second)
    batch = _random_spd_batch((3,), 5, seed=80, dtype=torch.float32)
    values, vectors, failed = safe_eigh(batch)
    assert not bool(failed.any())
    assert bool(torch.isfinite(values).all())
    _assert_eigenpairs(batch, values, vectors, PAIR_ATOL[torch.float32])


def test_finite_matrices_by_reduction_is_exact_or_conservative() -> None:
    x = torch.ones(5, 3, 3)
    x[1, 0, 2] = math.nan
    x[2, 1, 1] = math.inf
    x[3, 0, 0], x[3, 2, 2] = math.inf, -math.inf  # inf − inf: the sum is NaN, still flagged
    x[4] = torch.diag(torch.tensor([3e38, 3e38, 3e38]))  # finite, but its sum overflows float32
    assert finite_matrices(x).tolist() == [True, False, False, False, False]  # conservative
    assert finite_matrices(x, exact=True).tolist() == [True, False, False, False, True]
    assert finite_matrices(x.double()).tolist() == [True, False, False, False, True]


def test_overflowing_sum_is_not_a_failure() -> None:
    """A finite factor whose entries sum past float32's range is decomposed, not skipped."""
    spectrum = torch.tensor([1e38, 2e38, 3e38, 3.3e38])
    a = torch.stack([torch.diag(spectrum), torch.eye(4)])
    values, vectors, failed = safe_eigh(a)
    assert failed.tolist() == [False, False]
    torch.testing.assert_close(values[0], spectrum, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(values[1], torch.ones(4))
    assert bool(torch.isfinite(vectors).all())
