"""Symmetric matrices stored packed: the upper triangle, row by row, ``d(d+1)/2`` numbers.

``pack_into`` and ``unpack_into`` are one ``index_select`` each (into a preallocated output), so a
kernel that keeps its factors packed pays one op per factor to rebuild a full matrix in a reused
buffer. The index tensors are made once per ``(d, device)`` and shared process-wide (a plain
dict, not ``functools.cache``: ``torch.compile`` reads a dict's entries but traces through a
cache wrapper, rebuilding the indices inside the graph).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "pack",
    "pack_into",
    "packed_size",
    "symmetric_index",
    "unpack",
    "unpack_into",
    "unpacked_dim",
    "upper_index",
]


def packed_size(d: int) -> int:
    return d * (d + 1) // 2


def unpacked_dim(size: int) -> int:
    """``d`` with ``d(d+1)/2 == size`` (``ValueError`` when there is none)."""
    d = int(((8 * size + 1) ** 0.5 - 1) / 2)
    while packed_size(d) < size:
        d += 1
    if packed_size(d) != size:
        raise ValueError(f"{size} numbers are not the upper triangle of a square matrix")
    return d


_INDICES: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}


def _indices(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(upper, symmetric)``: flat positions of the upper triangle in a ``d×d`` matrix, and for
    each of the ``d²`` positions the packed index of its upper-triangle twin."""
    key = (d, str(device))
    found = _INDICES.get(key)
    if found is None:
        found = _INDICES[key] = _make_indices(d, device)
    return found


def _make_indices(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(d, d)
    upper = (rows * d + cols).to(device)
    packed = torch.empty(d, d, dtype=torch.int64)
    packed[rows, cols] = torch.arange(rows.numel())
    packed[cols, rows] = torch.arange(rows.numel())
    return upper, packed.reshape(-1).to(device)


def upper_index(d: int, device: torch.device) -> Tensor:
    """Flat positions (in ``d²``) of the packed entries: ``packed = full.view(…, d²)[…, upper]``."""
    return _indices(d, device)[0]


def symmetric_index(d: int, device: torch.device) -> Tensor:
    """For each of the ``d²`` positions, its packed index: ``full.view(…, d²) = packed[…, symmetric]``."""
    return _indices(d, device)[1]


def pack_into(full: Tensor, out: Tensor) -> Tensor:
    """``out[..., k] = full[..., i, j]`` over the upper triangle (``full``: ``[..., d, d]``
    contiguous, ``out``: ``[..., d(d+1)/2]``)."""
    d = full.shape[-1]
    upper, _ = _indices(d, full.device)
    flat = full.reshape(*full.shape[:-2], d * d)
    return torch.index_select(flat, -1, upper, out=out)


def unpack_into(packed: Tensor, out: Tensor) -> Tensor:
    """The full symmetric ``[..., d, d]`` of ``packed`` written into ``out`` (contiguous)."""
    d = out.shape[-1]
    _, symmetric = _indices(d, packed.device)
    torch.index_select(packed, -1, symmetric, out=out.view(*out.shape[:-2], d * d))
    return out


def pack(full: Tensor) -> Tensor:
    d = full.shape[-1]
    return pack_into(full.contiguous(), full.new_empty(*full.shape[:-2], packed_size(d)))


def unpack(packed: Tensor) -> Tensor:
    d = unpacked_dim(packed.shape[-1])
    return unpack_into(packed, packed.new_empty(*packed.shape[:-1], d, d))
