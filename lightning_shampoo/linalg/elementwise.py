"""Elementwise helpers: finiteness checked by a reduction, and powers whose value for an element
does not depend on where it sits in the tensor.

On CPU, PyTorch's ``pow`` with a general exponent (and e.g. ``sigmoid``) runs a SIMD routine over
most of a tensor and a scalar libm call over the last few elements; the two round differently.
A block's result would then depend on its row in a bucket — on how many blocks the bucket holds,
which differs between one process and a sharded run, so the two would not agree bitwise.
``exp`` and ``log`` (and the correctly rounded ``sqrt``, ``rsqrt``, ``*``, ``/``) are consistent, so
the general case goes through ``exp(e·log x)`` in float64, which also rounds better than
float32 ``pow``. Other devices apply one routine to every element and keep the native ``pow``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finite_matrices", "stable_pow"]


def finite_matrices(x: Tensor, *, exact: bool = False) -> Tensor:
    """Per matrix (the last two dims) whether every element is finite, by one sum per matrix
    instead of an elementwise ``isfinite`` (a ``[..., d, d]`` boolean) and an ``all``.

    A NaN or infinite element always makes the sum non-finite (inf + finite = inf, inf − inf =
    NaN), so ``True`` is exact. A sum of finite elements can still overflow (``|Σ| > 3.4e38`` in
    float32): then the answer is a conservative ``False``. ``exact=True`` re-checks those
    matrices elementwise (one host sync, and the elementwise pass only when some sum is not
    finite) — for inputs, where a false ``False`` would skip a refresh; outputs of a refresh may
    take the conservative answer (the block is retried or kept as it was)."""
    finite = torch.isfinite(x.sum((-2, -1)))
    if exact and not bool(finite.all()):
        finite = finite | torch.isfinite(x).flatten(-2).all(-1)
    return finite


def stable_pow(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent`` for ``x ≥ 0`` (negative ``x`` gives NaN unless the exponent is 2 or 4),
    identical for an element wherever it sits in ``x`` (see the module docstring)."""
    e = float(exponent)
    if e == 0.0:
        return torch.ones_like(x)
    if e == 1.0:
        return x.clone()
    if e == 0.5:
        return x.sqrt()
    if e == -0.5:
        return x.rsqrt()
    if e == -1.0:
        return x.reciprocal()
    if e == 2.0:
        return x * x
    if e == 4.0:
        square = x * x
        return square * square
    if x.device.type != "cpu":
        return x.pow(e)
    return torch.exp(torch.log(x.to(torch.float64)) * e).to(x.dtype)
