"""Which dims of a block get a Kronecker factor: the one-sided rule.

A factor of a block dim of size ``d`` costs ``d²`` numbers (its statistics, and as many again for
a cached root or eigenbasis) against the block's ``numel``: for a vocabulary-side block of an
embedding or output head (``[1024, 128]``) the 1024² factor is 8× the block itself, and on a small
transformer LM such factors were most of Shampoo's state (issue 12). The reference SOAP leaves dims
above its ``max_precond_dim`` unpreconditioned, PSGD-Kron makes a dim with ``d² > max_skew·numel``
diagonal, and Distributed Shampoo can do it by hand (``inverse_exponent_override`` of 0). Here two
param-group options say it once for every Kronecker family:

* ``max_factor_dim``: a block dim larger than this gets no factor;
* ``max_factor_ratio``: nor does a dim whose factor would be larger than this many times the
  block (``d² > ratio·numel``, i.e. ``d > ratio·(numel/d)``: the dim is more than ``ratio``
  times the product of the block's other dims).

Both default to ``math.inf`` in ``Shampoo`` (Distributed Shampoo's behaviour); the presets and the
drop-in switch the ratio on (``configure.py``). A dim without a full factor is scaled per
coordinate instead: Shampoo keeps the factor's diagonal (``diagonal_dims``, ``d`` numbers:
``preconditioners/diagonal_factors.py``; the other dims keep their exponents), SOAP leaves the dim
in the original basis (``ignored_basis_change_dims``), where its Adam-style second moment is
per coordinate. (Identity along a dim, Distributed Shampoo's exponent 0, stays available through
``inverse_exponent_override``; on the convergence suite it trained worse.) At least
one dim always keeps its factor when the block has more than one: the rule never turns a matrix
into a diagonal preconditioner (give it to Adam for that). Families without Kronecker factors, and
PSGD-Kron (which has its own ``max_skew`` rule), are left unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

__all__ = ["FactorRule", "unfactored_dims", "with_unfactored_dims"]

#: ``(max_factor_dim, max_factor_ratio)`` of a param group.
FactorRule = tuple[float, float]


def unfactored_dims(
    block_shape: Sequence[int], max_factor_dim: float, max_factor_ratio: float
) -> tuple[int, ...]:
    """Dims of a ``block_shape`` block that get no Kronecker factor under the rule (module
    docstring). 1-D and scalar blocks keep theirs (a rule for them is the grafting config's job:
    ``skip_preconditioning_rank_lt``); when every dim would go, the smallest stays."""
    order = len(block_shape)
    if order < 2 or (math.isinf(max_factor_dim) and math.isinf(max_factor_ratio)):
        return ()
    numel = math.prod(block_shape)
    drop = [
        i
        for i, d in enumerate(block_shape)
        if d > max_factor_dim or (d > 1 and d * d > max_factor_ratio * numel)
    ]
    if len(drop) == order:
        keep = min(range(order), key=lambda i: (block_shape[i], i))
        drop.remove(keep)
    return tuple(drop)


def _add_dims(
    mapping: Mapping[int, Sequence[int]], order: int, dims: Sequence[int]
) -> dict[int, tuple[int, ...]]:
    out = {k: tuple(v) for k, v in mapping.items()}
    out[order] = tuple(sorted({*out.get(order, ()), *dims}))
    return out


def with_unfactored_dims(config: Any, block_shape: Sequence[int], dims: Sequence[int]) -> Any:
    """``config`` for ``block_shape`` blocks with no factor along ``dims`` (module docstring);
    ``config`` itself when there is nothing to change or the family has no such notion."""
    if not dims:
        return config
    order = len(block_shape)
    family = getattr(config, "family", None)
    if family in ("shampoo", "eigen"):  # KL-Shampoo's config subclasses the eigendecomposed one
        return replace(config, diagonal_dims=_add_dims(config.diagonal_dims, order, dims))
    if family == "soap":
        return replace(
            config, ignored_basis_change_dims=_add_dims(config.ignored_basis_change_dims, order, dims)
        )
    return config
