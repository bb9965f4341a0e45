"""Parameter → blocks → buckets.

A parameter is viewed in a *processed shape*: size-1 dims squeezed, adjacent small dims merged
while their product stays ≤ ``max_preconditioner_dim``. Each processed dim is cut into pieces of at
most ``max_preconditioner_dim``; a parameter thus splits into at most ``2^order`` rectangular
*regions*, each tiled by a regular grid of same-shape blocks, so one strided view (no copy) exposes
all of a region's blocks at once. Buckets stack the regions whose blocks share a shape (and dtype,
device, param group) into one ``[B, *block_shape]`` batch, so one batched kernel serves them all.

A *stacked* parameter keeps its leading dim as an index of independent slices (scanned layers,
MoE experts ``[E, d_in, d_out]``): that dim is never merged and each slice gets its own blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Bucket",
    "BucketMember",
    "ParamLayout",
    "Region",
    "block_configs",
    "build_buckets",
    "gather",
    "layout_param",
    "processed_shape",
    "scatter_add_",
    "skips_preconditioning",
]


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

    def block_shapes(self) -> dict[int, tuple[int, ...]]:
        """Block index → block shape (stacked dims excluded)."""
        skip = 1 if self.stacked else 0
        return {b: r.block_shape[skip:] for r in self.regions for b in r.block_ids}


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


@dataclass(frozen=True)
class BucketMember:
    """Rows ``offset : offset + region.count`` of a bucket hold ``region`` of ``param``."""

    param: ParamLayout
    region: Region
    offset: int


@dataclass(frozen=True)
class Bucket:
    """Same-shape blocks of one param group, stacked into ``[size, *block_shape]`` tensors."""

    key: str
    group: int
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    members: tuple[BucketMember, ...]

    @property
    def size(self) -> int:
        return sum(m.region.count for m in self.members)

    def rows(self) -> list[tuple[int, int]]:
        """``(param index, block index)`` of every row, in row order."""
        return [(m.param.index, b) for m in self.members for b in m.region.block_ids]


def skips_preconditioning(group: Mapping[str, Any], layout: ParamLayout) -> bool:
    """Whether the group's ``skip_preconditioning_rank_lt`` leaves this parameter to its grafting."""
    return layout.rank < group["skip_preconditioning_rank_lt"]


def block_configs(group: Mapping[str, Any], layout: ParamLayout) -> tuple[Any, Any]:
    """``(preconditioner config, grafting config or None)`` of one parameter's blocks."""
    if skips_preconditioning(group, layout):
        return group["grafting_config"], None
    return group["preconditioner_config"], group["grafting_config"]


def build_buckets(
    group: int,
    layouts: Iterable[tuple[ParamLayout, torch.dtype, torch.device]],
    *,
    bucketing: bool = True,
    owns: Callable[[int, int], bool] | None = None,
    max_numel: int | None = None,
    tag: Callable[[ParamLayout], Hashable] | None = None,
) -> list[Bucket]:
    """Group the blocks of one param group into buckets.

    ``bucketing=False`` gives one bucket per block (the reference one-block-at-a-time path).
    ``owns(param_index, block_index)`` keeps only the blocks this process is responsible for.
    ``max_numel`` caps a bucket's largest per-step tensor (``n·max(block numel, dᵢ²)`` elements):
    beyond a few blocks batching gains nothing, while very large temporaries cost memory (and on
    CPU, fresh pages for every allocation). Blocks whose parameters ``tag`` tells apart never
    share a bucket (they get different preconditioners).
    """
    grouped: dict[tuple[Any, ...], list[tuple[ParamLayout, Region]]] = {}
    for layout, dtype, device in layouts:
        for region in layout.regions:
            parts = region.split() if (not bucketing or owns is not None) else [region]
            for part in parts:
                if owns is not None and not owns(layout.index, part.block_ids[0]):
                    continue
                shape = part.block_shape[1:] if layout.stacked else part.block_shape
                key: tuple[Any, ...] = (shape, dtype, str(device), tag(layout) if tag else None)
                if not bucketing:
                    key = (*key, layout.index, part.block_ids[0])
                grouped.setdefault(key, []).append((layout, part))
    buckets: list[Bucket] = []
    for key, items in grouped.items():
        shape, dtype = key[0], key[1]
        name = "x".join(map(str, shape)) or "scalar"
        per_block = max([math.prod(shape), *(d * d for d in shape)])
        cap = max(1, max_numel // per_block) if max_numel else None
        for chunk in _chunks(items, cap):
            members, offset = [], 0
            for layout, region in chunk:
                members.append(BucketMember(layout, region, offset))
                offset += region.count
            buckets.append(Bucket(f"g{group}.b{len(buckets)}.{name}", group, shape, dtype, tuple(members)))
    return buckets


def _chunks(
    items: list[tuple[ParamLayout, Region]], cap: int | None
) -> list[list[tuple[ParamLayout, Region]]]:
    """Split a bucket's regions into runs of at most ``cap`` blocks (splitting large regions)."""
    if cap is None:
        return [items]
    chunks: list[list[tuple[ParamLayout, Region]]] = [[]]
    count = 0
    for layout, region in items:
        for part in region.split() if region.count > cap else [region]:
            if count + part.count > cap and chunks[-1]:
                chunks.append([])
                count = 0
            chunks[-1].append((layout, part))
            count += part.count
    return chunks


def gather(
    bucket: Bucket, tensors: Mapping[int, Tensor | None], *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Copy the bucket's blocks of ``tensors`` (by param index; ``None`` → zeros) into ``[size, *block]``."""
    out = torch.empty((bucket.size, *bucket.block_shape), dtype=dtype, device=device)
    for m in bucket.members:
        region = m.region
        dst = out[m.offset : m.offset + region.count].view(*region.grid, *region.block_shape)
        source = tensors.get(m.param.index)
        if source is None:
            dst.zero_()
        else:
            dst.copy_(region.view(m.param.processed(source)))
    return out


def scatter_add_(bucket: Bucket, params: Mapping[int, Tensor], update: Tensor, alpha: float | Tensor) -> None:
    """``param_block += alpha · update_row`` for every block, writing through strided views."""
    for m in bucket.members:
        region = m.region
        src = update[m.offset : m.offset + region.count].view(*region.grid, *region.block_shape)
        target = region.view(params[m.param.index].view(m.param.processed_shape))
        if isinstance(alpha, Tensor):
            target.add_(src * alpha)
        else:
            target.add_(src, alpha=alpha)
