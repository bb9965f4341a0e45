"""Pure kernels of Kronecker-factored PSGD (Xi-Lin Li): Q-factor updates and cheap norm bounds.

PSGD fits ``P = QᵀQ`` so that ``E[hᵀPh] + E[vᵀP⁻¹v]`` is minimal for gradients ``h`` and
``v ~ N(0, I)``, whose minimiser is ``P = E[hhᵀ]^(-1/2)`` (``Ph`` is whitened). For one Kronecker
factor ``Qᵢ`` of a block with ``N`` elements and dim ``dᵢ``, the relative gradient of that criterion
is ``Eᵢ = gramᵢ - (N/dᵢ)·I`` where ``gramᵢ`` contracts ``Ph`` with itself over every other dim (the
expectation over ``v`` is taken in closed form), or ``gram(Qh) - gram(Q⁻ᵀv)`` in the original
triangular form. Each geometry moves ``Qᵢ`` along ``-Eᵢ`` by ``lr/Lᵢ``, where ``Lᵢ`` is a running
estimate of the Lipschitz constant (a max-EMA of a cheap spectral-norm lower bound), which makes
``lr`` scale-free.

Everything here is batched over leading dims (``q: [..., d, d]`` dense, ``[..., d]`` diagonal,
``lipschitz: [...]``), takes float32/float64 inputs and returns new tensors (no in-place updates),
so callers can commit results per block.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "balance_factors",
    "lipschitz_update",
    "procrustes_step",
    "rademacher_probes",
    "smallest_singular_value_estimate",
    "spectral_norm_lower_bound",
    "update_eq",
    "update_q0p5eq1p5",
    "update_quad",
]


@functools.lru_cache(maxsize=64)
def rademacher_probes(k: int, d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A fixed ``[k, d]`` matrix of ±1 from an integer hash of the entry index: deterministic and
    identical on every device and rank (no RNG state), cached because it never changes."""
    idx = torch.arange(k * d, dtype=torch.int64, device=device)
    h = (idx * 2654435761 + 0x9E3779B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (1 - 2 * (h & 1)).to(dtype).view(k, d)


def spectral_norm_lower_bound(a: Tensor, *, num_probes: int = 32, half_iters: int = 2) -> Tensor:
    """A lower bound of ``‖A‖₂`` for square ``a: [..., d, d]``: valid for any matrix, tight (within a
    few percent) for the symmetric and skew-symmetric matrices PSGD applies it to.

    Subspace iteration from ``num_probes`` fixed ±1 probes, each tilted towards the largest row of
    ``A`` (so a dominant direction is never missed), without orthonormalisation: the result is the
    largest ``‖vA‖`` over unit rows ``v``, hence always ``≤ ‖A‖₂``. Costs ``O(k·d²)``, no
    eigendecomposition. A zero matrix gives 0.
    """
    tiny = torch.finfo(a.dtype).tiny
    scale = a.abs().amax(dim=(-2, -1), keepdim=True) + tiny
    a = a / scale
    d = a.shape[-1]
    j = torch.linalg.vector_norm(a, dim=-1).argmax(dim=-1)
    row = torch.take_along_dim(a, j[..., None, None].expand(*j.shape, 1, d), dim=-2)  # [..., 1, d]
    probes = rademacher_probes(min(num_probes, d), d, a.device, a.dtype)
    v = row + torch.sign((row * probes).sum(-1, keepdim=True)) * probes
    for _ in range(half_iters):
        v = v @ a
        v = v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + tiny)
        v = v @ a
    return scale[..., 0, 0] * torch.linalg.vector_norm(v, dim=-1).amax(-1)


def smallest_singular_value_estimate(
    q: Tensor, *, triangular: bool = False, num_probes: int = 4, iters: int = 2
) -> Tensor:
    """An estimate (from above) of ``σ_min(Q)`` for ``q: [..., d, d]`` via power iteration on
    ``Q⁻ᵀQ⁻¹`` with triangular solves (``triangular``: ``Q`` upper triangular) or one LU.

    Used for health records only, so it is cheap rather than exact: the returned value is
    ``1/‖Q⁻¹x‖`` for the best probe ``x``, never below the true ``σ_min``. A singular or
    non-finite ``Q`` gives 0.
    """
    d = q.shape[-1]
    if triangular:

        def solve(x: Tensor) -> Tensor:
            return torch.linalg.solve_triangular(q, x, upper=True)

        def solve_t(x: Tensor) -> Tensor:
            return torch.linalg.solve_triangular(q.mT, x, upper=False)

    else:
        lu, pivots, _ = torch.linalg.lu_factor_ex(q)

        def solve(x: Tensor) -> Tensor:
            return torch.linalg.lu_solve(lu, pivots, x)

        def solve_t(x: Tensor) -> Tensor:
            return torch.linalg.lu_solve(lu, pivots, x, adjoint=True)

    x = rademacher_probes(min(num_probes, d), d, q.device, q.dtype).mT / d**0.5
    x = x.expand(*q.shape[:-2], d, x.shape[-1])
    for _ in range(iters):
        x = solve_t(solve(x))
        x = x / (torch.linalg.vector_norm(x, dim=-2, keepdim=True) + torch.finfo(q.dtype).tiny)
    norm_inv = torch.linalg.vector_norm(solve(x), dim=-2).amax(-1)
    norm_inv = torch.nan_to_num(norm_inv, nan=torch.inf, posinf=torch.inf)
    return 1.0 / norm_inv


def lipschitz_update(lipschitz: Tensor, ell: Tensor, beta: float) -> Tensor:
    """``max(β·L + (1-β)·ℓ, ℓ)``: follows increases at once, decreases slowly (a safe step)."""
    return torch.maximum(beta * lipschitz + (1.0 - beta) * ell, ell)


def _ell_dense(gram: Tensor) -> Tensor:
    return spectral_norm_lower_bound(gram)


def _bcast(x: Tensor, ndim: int) -> Tensor:
    """Per-matrix scalars ``[...]`` → broadcastable against ``[..., d]`` or ``[..., d, d]``."""
    return x.view(*x.shape, *([1] * ndim))


def _rate(lr: float, lipschitz: Tensor, ndim: int) -> Tensor:
    """``lr / L`` broadcast over the factor (``L = 0`` only with an all-zero gradient: step 0)."""
    return _bcast(lr / lipschitz.clamp_min(torch.finfo(lipschitz.dtype).tiny), ndim)


def update_q0p5eq1p5(
    q: Tensor, gram: Tensor, c: float, lipschitz: Tensor, *, lr: float, beta: float, diagonal: bool = False
) -> tuple[Tensor, Tensor]:
    """Default geometry ``dQ = Q^½·E·Q^{3/2}``: ``Q ← Q - lr/L·E·Q`` then one Procrustes rotation.

    The rotation ``UQ`` (``U`` orthogonal) leaves ``P = QᵀQ`` unchanged to second order while
    pulling ``Q`` towards the SPD square root of ``P``, so ``Q`` stays close to symmetric without
    triangular solves. Returns ``(Q, L)``.
    """
    if diagonal:
        ell = gram.amax(-1) + c
        lipschitz = lipschitz_update(lipschitz, ell, beta)
        return q * (1.0 - _rate(lr, lipschitz, 1) * (gram - c)), lipschitz
    lipschitz = lipschitz_update(lipschitz, _ell_dense(gram) + c, beta)
    step = _rate(lr, lipschitz, 2)
    q = q - step * (gram @ q - c * q)
    return procrustes_step(q), lipschitz


def update_quad(
    q: Tensor, gram: Tensor, c: float, lipschitz: Tensor, *, lr: float, beta: float, diagonal: bool = False
) -> tuple[Tensor, Tensor]:
    """Quadratic form ``Q ← (I - a·E)·Q·(I - a·E)``, ``a = lr/(2L)``, symmetrised.

    A congruence of a symmetric ``Q`` by a matrix that stays non-singular (``a‖E‖ ≤ lr/2 < 1``),
    so an SPD ``Q`` stays SPD; the symmetrisation removes round-off asymmetry. Returns ``(Q, L)``.
    Near the fixed point, with grams close to their expectation, the iteration is linearly stable
    only for ``lr < 8/((1+r)²(1+r⁻²))``, ``r = cond(Q)`` (0.1 covers ``r ≲ 7``; Q0.5EQ1.5's bound,
    ``2/(r + 1/r)``, is much wider): prefer the default geometry for very ill-conditioned factors.
    """
    if diagonal:
        lipschitz = lipschitz_update(lipschitz, gram.amax(-1) + c, beta)
        gain = 1.0 - _rate(lr / 2.0, lipschitz, 1) * (gram - c)
        return q * gain * gain, lipschitz
    lipschitz = lipschitz_update(lipschitz, _ell_dense(gram) + c, beta)
    a = _rate(lr / 2.0, lipschitz, 2)
    p = q - a * (gram @ q - c * q)
    p = p - a * (p @ gram - c * p)
    return (p + p.mT) / 2, lipschitz


def update_eq(
    q: Tensor,
    gram_a: Tensor,
    gram_b: Tensor,
    lipschitz: Tensor,
    *,
    lr: float,
    beta: float,
    diagonal: bool = False,
) -> tuple[Tensor, Tensor]:
    """The original Lie-group update ``dQ = E·Q`` on upper-triangular ``Q``:
    ``Q ← Q - lr/L·triu(gram(Qh) - gram(Q⁻ᵀv))·Q``; ``triu`` keeps ``Q`` in the triangular group.
    ``L`` tracks ``‖gram_a + gram_b‖``. Returns ``(Q, L)``."""
    if diagonal:
        lipschitz = lipschitz_update(lipschitz, (gram_a + gram_b).amax(-1), beta)
        return q - _rate(lr, lipschitz, 1) * (gram_a - gram_b) * q, lipschitz
    lipschitz = lipschitz_update(lipschitz, _ell_dense(gram_a + gram_b), beta)
    return q - _rate(lr, lipschitz, 2) * (torch.triu(gram_a - gram_b) @ q), lipschitz


def procrustes_step(q: Tensor, *, max_step: float = 0.125) -> Tensor:
    """One step of the online orthogonal Procrustes solver ``min_U ‖UQ - I‖``, ``UᵀU = I``.

    Rotates ``Q ← exp(aR)·Q`` with generator ``R = Qᵀ - Q`` (normalised by a spectral-norm lower
    bound) through the second-order expansion ``I + aR + (aR)²/2``, whose orthogonality error is
    ``≤ ‖aR‖⁴/4``; ``a ≤ max_step`` keeps it below 1e-3 of ``‖Q‖``. The step length comes from a
    line search on ``tr(UQ)`` (which the rotation maximises): ``tr(RQ) ≥ 0`` always, and when
    ``tr(R²Q) < 0`` the quadratic's maximiser ``-tr(RQ)/tr(R²Q)`` is used if shorter.
    Batched over leading dims; a symmetric ``Q`` is returned unchanged.
    """
    r = q.mT - q
    r = r / _bcast(spectral_norm_lower_bound(r) + torch.finfo(q.dtype).tiny, 2)
    rq = r @ q
    rrq = r @ rq
    tr_rq = rq.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr_rrq = rrq.diagonal(dim1=-2, dim2=-1).sum(-1)
    a = torch.where(tr_rrq < 0, (-tr_rq / tr_rrq).clamp(max=max_step), max_step)
    a = _bcast(torch.nan_to_num(a, nan=0.0), 2)
    return q + a * (rq + 0.5 * a * rrq)


def balance_factors(factors: list[Tensor], batch_ndim: int = 1) -> list[Tensor]:
    """Rescale the Kronecker factors (dense or diagonal, after ``batch_ndim`` leading dims) of each
    block to a common max-abs value, their geometric mean: the Kronecker product is unchanged, and
    no factor drifts towards over- or underflow."""
    if len(factors) < 2:
        return factors
    tiny = torch.finfo(factors[0].dtype).tiny
    norms = [f.abs().flatten(batch_ndim).amax(-1).clamp_min(tiny) for f in factors]
    logs = torch.stack([n.log() for n in norms]).mean(0)
    return [f * _bcast((logs - n.log()).exp(), f.ndim - n.ndim) for f, n in zip(factors, norms)]
