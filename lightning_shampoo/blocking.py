"""Parameter → blocks: processed shapes, the regions that tile them, and strided views.

A parameter is viewed in a *processed shape*: size-1 dims squeezed, adjacent small dims merged
while their product stays ≤ ``max_preconditioner_dim``. Each processed dim is cut into pieces of at
most ``max_preconditioner_dim``; a parameter thus splits into at most ``2^order`` rectangular
*regions*, each tiled by a regular grid of same-shape blocks, so one strided view (no copy) exposes
all of a region's blocks at once. (``plan.py`` stacks the regions whose blocks share a shape into
buckets; the step's workspace copies between parameters and buckets through the views below.)

A *stacked* parameter keeps its leading dim as an index of independent slices (scanned layers,
MoE experts ``[E, d_in, d_out]``): that dim is never merged and each slice gets its own blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["ParamLayout", "Region", "layout_param", "processed_shape"]


def processed_shape(
    shape: Sequence[int],
    max_dim: float,
    *,
    merge: bool = True,
    stacked: bool = False,
    min_order: int = 1,
    squeeze: bool = True,
) -> tuple[int, ...]:
    """Squeeze size-1 dims, then merge adjacent dims (from the last, as Distributed Shampoo does)
    while the product stays ≤ ``max_dim`` and at least ``min_order`` dims remain.
    ``squeeze=False`` keeps the shape as given, size-1 dims included, and merges nothing
    (Distributed Shampoo's ``target_parameter_dimensionality=math.inf``)."""
    lead, rest = (tuple(shape[:1]), tuple(shape[1:])) if stacked else ((), tuple(shape))
    if not squeeze:
        return lead + rest or (1,)
    dims = [d for d in reversed(rest) if d != 1]
    if merge and dims:
        merged = [dims[0]]
        for done, d in enumerate(dims[1:], start=1):
            remaining = len(dims) - done
            if len(merged) + remaining > min_order and merged[-1] * d <= max_dim:
                merged[-1] *= d
            else:
                merged.append(d)
        dims = merged
    # A scalar (or all-size-1) parameter becomes one 1-element block, as in Distributed Shampoo.
    return lead + tuple(reversed(dims)) or (1,)


@dataclass(frozen=True)
class Region:
    """A rectangle of a processed parameter tiled by a regular grid of identical blocks."""

    slices: tuple[slice, ...]
    grid: tuple[int, ...]
    block_shape: tuple[int, ...]  # per processed dim; stacked dims have size 1
    block_ids: tuple[int, ...]  # block index within the parameter, grid row-major

    @property
    def count(self) -> int:
        return len(self.block_ids)

    def view(self, processed: Tensor) -> Tensor:
        """``[*grid, *block_shape]`` strided view of the region's blocks (no copy)."""
        x = processed[self.slices]
        for i in reversed(range(len(self.grid))):
            x = x.unflatten(i, (self.grid[i], self.block_shape[i]))
        n = len(self.grid)
        return x.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))

    def split_view(self, processed: Tensor) -> Tensor:
        """``[g₁, b₁, g₂, b₂, …]`` view of the region (each dim split into grid × block; no
        permute, so a contiguous parameter gives it with one ``view``)."""
        return _split(processed[self.slices], self.split_shape)

    @property
    def split_shape(self) -> list[int]:
        return [n for pair in zip(self.grid, self.block_shape) for n in pair]

    def rows_view(self, flat: Tensor, row: int) -> Tensor:
        """The same ``[g₁, b₁, g₂, b₂, …]`` index space over bucket rows ``row, row+1, …`` of a
        flat buffer holding ``[rows, *block_shape]`` contiguously: ``split_view(p)`` and
        ``rows_view(buffer, row)`` address the same blocks, so one ``copy_``/``add_`` moves a
        region between a parameter and its bucket rows."""
        numel = math.prod(self.block_shape)
        block_strides = _contiguous_strides(self.block_shape)
        grid_strides = [s * numel for s in _contiguous_strides(self.grid)]
        stride = [s for pair in zip(grid_strides, block_strides) for s in pair]
        return flat.as_strided(self.split_shape, stride, flat.storage_offset() + row * numel)

    def per_block_view(self, values: Tensor, row: int) -> Tensor:
        """Per-block values ``[rows]`` (contiguous) broadcast over ``rows_view``'s index space:
        ``[g₁, 1, g₂, 1, …]``."""
        size = [n for g in self.grid for n in (g, 1)]
        stride = [s for g in _contiguous_strides(self.grid) for s in (g, 0)]
        return values.as_strided(size, stride, values.storage_offset() + row)

    def split(self) -> list[Region]:
        """One single-block region per block (the one-block-at-a-time layout)."""
        out = []
        for j, idx in enumerate(itertools.product(*(range(g) for g in self.grid))):
            slices = tuple(
                slice(s.start + i * b, s.start + (i + 1) * b)
                for s, i, b in zip(self.slices, idx, self.block_shape)
            )
            out.append(Region(slices, (1,) * len(self.grid), self.block_shape, (self.block_ids[j],)))
        return out


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is blocked."""

    index: int
    name: str
    shape: tuple[int, ...]
    processed_shape: tuple[int, ...]
    stacked: bool
    regions: tuple[Region, ...]

    @property
    def num_blocks(self) -> int:
        return sum(r.count for r in self.regions)

    @property
    def rank(self) -> int:
        """Dims of size > 1 of the parameter as given (stacked dim excluded): 1 for a bias."""
        return sum(d > 1 for d in (self.shape[1:] if self.stacked else self.shape))

    @property
    def block_order(self) -> int:
        """Tensor order of this parameter's blocks (stacked dims excluded)."""
        return len(self.processed_shape) - int(self.stacked)

    def processed(self, tensor: Tensor) -> Tensor:
        """View (or, for a non-viewable gradient, copy) ``tensor`` in the processed shape."""
        try:
            return tensor.view(self.processed_shape)
        except RuntimeError:
            return tensor.reshape(self.processed_shape)

    def region_views(self, tensor: Tensor) -> list[Tensor]:
        """``Region.split_view`` of every region of ``tensor`` (the parameter, its gradient or an
        update of its shape); a contiguous one-region tensor costs a single ``view``."""
        if len(self.regions) == 1 and tensor.is_contiguous():
            return [tensor.view(self.regions[0].split_shape)]
        processed = self.processed(tensor)
        return [region.split_view(processed) for region in self.regions]

    def block_shapes(self) -> dict[int, tuple[int, ...]]:
        """Block index → block shape (stacked dims excluded)."""
        skip = 1 if self.stacked else 0
        return {b: r.block_shape[skip:] for r in self.regions for b in r.block_ids}


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def _split(x: Tensor, shape: list[int]) -> Tensor:
    """Split each dim of a (possibly strided) tensor into ``(grid, block)`` as a view."""
    for i in reversed(range(x.ndim)):
        x = x.unflatten(i, (shape[2 * i], shape[2 * i + 1]))
    return x


def _dim_pieces(n: int, max_dim: float) -> list[tuple[int, int, int, list[int]]]:
    """(start, grid count, block size, block indices along this dim) for the pieces of one dim."""
    if n <= max_dim:
        return [(0, 1, n, [0])]
    b = int(max_dim)
    q, r = divmod(n, b)
    pieces = [(0, q, b, list(range(q)))]
    if r:
        pieces.append((q * b, 1, r, [q]))
    return pieces


def layout_param(
    index: int,
    name: str,
    shape: Sequence[int],
    max_dim: float,
    *,
    merge: bool = True,
    stacked: bool = False,
    min_order: int = 1,
    squeeze: bool = True,
) -> ParamLayout:
    """Block one parameter of ``shape``; ``merge`` must be False for non-contiguous parameters."""
    if stacked and len(shape) < 2:
        raise ValueError(f"parameter {name!r}: a stacked parameter needs >= 2 dims, got shape {tuple(shape)}")
    proc = processed_shape(shape, max_dim, merge=merge, stacked=stacked, min_order=min_order, squeeze=squeeze)
    per_dim = []
    for axis, n in enumerate(proc):
        if stacked and axis == 0:
            per_dim.append([(0, n, 1, list(range(n)))])
        else:
            per_dim.append(_dim_pieces(n, max_dim))
    counts = [sum(len(p[3]) for p in pieces) for pieces in per_dim]
    regions = []
    for combo in itertools.product(*per_dim):
        slices = tuple(slice(start, start + g * b) for start, g, b, _ in combo)
        ids = tuple(
            int(sum(i * math.prod(counts[a + 1 :]) for a, i in enumerate(idx)))
            for idx in itertools.product(*(p[3] for p in combo))
        )
        regions.append(Region(slices, tuple(p[1] for p in combo), tuple(p[2] for p in combo), ids))
    return ParamLayout(index, name, tuple(shape), proc, stacked, tuple(regions))
