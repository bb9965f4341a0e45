"""Blocking: processed shapes, regions that tile a parameter, views, buckets, gather/scatter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_shampoo import RootInvShampooPreconditionerConfig, Shampoo
from lightning_shampoo import _stages as stages
from lightning_shampoo._workspace import Workspace
from lightning_shampoo.blocking import layout_param, processed_shape
from lightning_shampoo.plan import GroupBlocks, build_plan


@pytest.mark.parametrize(
    ("shape", "max_dim", "kwargs", "expected"),
    [
        ((1, 2, 5, 1), 1024, {}, (10,)),  # squeeze, then merge
        ((1, 2, 5, 1), 1, {}, (2, 5)),  # nothing fits under the threshold: squeeze only
        ((32, 3, 64, 64), 8192, {}, (96, 4096)),  # merged from the last dim
        ((32, 3, 64, 64), math.inf, {"min_order": 2}, (32, 12288)),  # keep two dims
        ((32, 3, 64, 64), 8192, {"merge": False}, (32, 3, 64, 64)),
        ((4, 2, 6), 64, {"stacked": True}, (4, 12)),  # leading dim never merged
        ((1, 2, 6), 64, {"stacked": True}, (1, 12)),  # ... nor squeezed
        ((4, 2, 6), 64, {}, (48,)),
        ((), 1024, {}, (1,)),  # scalar: one 1-element block
        ((1, 1), 1024, {}, (1,)),
        ((7,), 3, {}, (7,)),
    ],
)
def test_processed_shape(shape, max_dim, kwargs, expected):
    assert processed_shape(shape, max_dim, **kwargs) == expected


def _block_slices(shape: tuple[int, ...], max_dim: int) -> list[tuple[slice, ...]]:
    """Reference: row-major enumeration of the blocks of a processed shape."""
    per_dim = []
    for n in shape:
        starts = list(range(0, n, max_dim))
        per_dim.append([slice(s, min(s + max_dim, n)) for s in starts])
    out: list[tuple[slice, ...]] = [()]
    for pieces in per_dim:
        out = [(*prefix, piece) for prefix in out for piece in pieces]
    return out


@pytest.mark.parametrize(
    ("shape", "max_dim"),
    [((96, 64), 32), ((70, 40), 32), ((5, 7, 9), 4), ((100,), 32), ((33, 1, 65), 16), ((8, 8), 8)],
)
def test_regions_tile_processed_tensor_once(shape, max_dim):
    layout = layout_param(0, "w", shape, max_dim)
    proc = layout.processed_shape
    numel = math.prod(proc)
    x = torch.arange(numel, dtype=torch.float64).view(proc)
    seen = torch.zeros(numel, dtype=torch.int64)
    ids = []
    for region in layout.regions:
        view = region.view(x)
        assert tuple(view.shape) == (*region.grid, *region.block_shape)
        assert all(b <= max_dim for b in region.block_shape)
        seen.index_add_(0, view.reshape(-1).long(), torch.ones(view.numel(), dtype=torch.int64))
        ids.extend(region.block_ids)
    assert torch.equal(seen, torch.ones_like(seen)), "every element is covered exactly once"
    assert sorted(ids) == list(range(layout.num_blocks))
    expected = _block_slices(proc, max_dim)
    assert layout.num_blocks == len(expected)
    # Block ids follow the row-major block grid: gathering in row order gives those blocks.
    bucket_blocks = {}
    for region in layout.regions:
        view = region.view(x).reshape(region.count, *region.block_shape)
        for row, b in enumerate(region.block_ids):
            bucket_blocks[b] = view[row]
    for b, slices in enumerate(expected):
        assert torch.equal(bucket_blocks[b], x[slices])


def test_region_view_is_a_view_of_the_parameter():
    p = torch.zeros(70, 40)
    layout = layout_param(0, "w", p.shape, 32)
    processed = layout.processed(p)
    for k, region in enumerate(layout.regions):
        view = region.view(processed)
        assert view.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        view.fill_(k + 1.0)
    # The four regions of a 70x40 in blocks of 32: [0:64, 0:32], [0:64, 32:40], [64:70, 0:32], ...
    assert torch.equal(p[:64, :32], torch.full((64, 32), 1.0))
    assert torch.equal(p[:64, 32:], torch.full((64, 8), 2.0))
    assert torch.equal(p[64:, :32], torch.full((6, 32), 3.0))
    assert torch.equal(p[64:, 32:], torch.full((6, 8), 4.0))


def _plan(shapes: list[tuple[int, ...]], max_dim: int, *, stacked: bool = False, bucketing: bool = True):
    layouts = tuple(layout_param(i, f"p{i}", s, max_dim, stacked=stacked) for i, s in enumerate(shapes))
    group = GroupBlocks(
        index=0,
        layouts=layouts,
        dtypes=(torch.float32,) * len(shapes),
        devices=("cpu",) * len(shapes),
        preconditioner_config=RootInvShampooPreconditionerConfig(),
        grafting_config=None,
    )
    return build_plan([group], bucketing=bucketing), layouts


def _lane(plan, tensors: list[Tensor]):
    options = {
        "betas": (0.0, 1.0),
        "beta3": -1.0,
        "momentum": 0.0,
        "epsilon": 1e-12,
        "use_bias_correction": True,
    }
    return Workspace(plan.local(0), {}, tensors, [options]).lanes[0]


@pytest.mark.parametrize("bucketing", [True, False])
def test_gather_and_apply_round_trip(bucketing):
    """The workspace's strided views: gathering puts block ``b`` of parameter ``p`` in the bucket
    row ``rows()`` names (checked against plain slicing), missing gradients gather as zeros, and
    applying the rows as an update adds them back into the right places."""
    torch.manual_seed(0)
    shapes = [(96, 64), (70, 40), (64, 32), (96,), (3, 5, 7)]
    plan, layouts = _plan(shapes, 32, bucketing=bucketing)
    tensors = [torch.randn(s) for s in shapes]
    total = sum(layout.num_blocks for layout in layouts)
    assert sum(b.size for b in plan.local(0)) == total
    lane = _lane(plan, [torch.zeros(s) for s in shapes])
    present, complete = stages.gather(lane, tensors)
    assert complete and bool(present.all())
    for slot in lane.slots:
        for row, (pidx, bidx) in enumerate(slot.bucket.rows()):
            layout = layouts[pidx]
            ref = tensors[pidx].reshape(layout.processed_shape)[
                _block_slices(layout.processed_shape, 32)[bidx]
            ]
            assert torch.equal(slot.grad[row], ref)
    rebuilt = [torch.zeros(s) for s in shapes]
    lane.out.copy_(lane.grad)
    stages.apply_updates(
        lane, lambda link: link.region.split_view(link.layout.processed(rebuilt[link.layout.index]))
    )
    for a, b in zip(rebuilt, tensors):
        assert torch.equal(a, b)
    missing: list[Tensor | None] = [None, *tensors[1:]]
    present, complete = stages.gather(lane, missing)
    assert not complete
    for slot in lane.slots:
        for row, (pidx, _) in enumerate(slot.bucket.rows()):
            assert bool(present[slot.start + row]) == (pidx != 0)
            if pidx == 0:
                assert not bool(slot.grad[row].any())


def test_same_shape_blocks_share_a_bucket():
    plan, _ = _plan([(96, 64), (64, 32), (70, 40)], 32)
    buckets = plan.local(0)
    sizes = {b.block_shape: b.size for b in buckets}
    # (32, 32): 6 from the 96x64, 2 from the 64x32, 2 from the 70x40.
    assert sizes == {(32, 32): 10, (32, 8): 2, (6, 32): 1, (6, 8): 1}
    big = next(b for b in buckets if b.block_shape == (32, 32))
    assert {m.param.index for m in big.members} == {0, 1, 2}
    unbucketed, _ = _plan([(96, 64), (64, 32), (70, 40)], 32, bucketing=False)
    assert len(unbucketed.local(0)) == 14 and all(b.size == 1 for b in unbucketed.local(0))


def test_stacked_parameter_blocks_per_slice():
    shape = (3, 40, 20)
    layout = layout_param(0, "experts", shape, 32, stacked=True)
    assert layout.processed_shape == (3, 40, 20)
    assert layout.block_order == 2
    # Each of the 3 slices: 40 -> 32 + 8, 20 -> 20: two blocks per slice.
    assert layout.num_blocks == 6
    assert sorted(set(layout.block_shapes().values())) == [(8, 20), (32, 20)]
    x = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    plan, _ = _plan([shape], 32, stacked=True)
    assert sorted(b.block_shape for b in plan.local(0)) == [(8, 20), (32, 20)]
    lane = _lane(plan, [torch.zeros(shape)])
    stages.gather(lane, [x])
    for slot in lane.slots:
        for row, (_, bidx) in enumerate(slot.bucket.rows()):
            expert, part = divmod(bidx, 2)
            rows_slice = slice(0, 32) if part == 0 else slice(32, 40)
            assert torch.equal(slot.grad[row], x[expert, rows_slice])
    # Without stacked, a small leading dim would be merged away.
    assert layout_param(0, "w", (4, 2, 6), 64).processed_shape == (48,)
    assert layout_param(0, "w", (4, 2, 6), 64, stacked=True).num_blocks == 4
    with pytest.raises(ValueError, match="stacked"):
        layout_param(0, "v", (5,), 64, stacked=True)


def _train(params: list[Tensor], grads: list[list[Tensor]], **kwargs) -> None:
    opt = Shampoo(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def test_non_contiguous_parameter_is_not_merged_and_updates_correctly():
    torch.manual_seed(1)
    base = torch.randn(8, 6)
    transposed = torch.nn.Parameter(base.clone().t())  # shape (6, 8), not contiguous
    assert not transposed.is_contiguous()
    reference = torch.nn.Parameter(base.clone().t().contiguous())
    opt = Shampoo([transposed], max_preconditioner_dim=64)
    assert opt.buckets[0].block_shape == (6, 8)  # 48 <= 64 but not merged (no view exists)
    grads = [[torch.randn(6, 8)] for _ in range(6)]
    kwargs = dict(lr=0.05, max_preconditioner_dim=64, precondition_frequency=2, betas=(0.9, 0.99))
    _train([transposed], grads, **kwargs)
    _train([reference], grads, use_merge_dims=False, **kwargs)
    assert not transposed.is_contiguous()
    assert not torch.equal(transposed.detach(), base.t())
    torch.testing.assert_close(transposed.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


def test_zero_size_parameters_are_skipped():
    empty = torch.nn.Parameter(torch.empty(0, 5))
    w = torch.nn.Parameter(torch.ones(4, 3))
    opt = Shampoo([empty, w], lr=0.1)
    assert all(m.param.index == 1 for plan in opt.buckets for m in plan.members)
    empty.grad = torch.empty(0, 5)
    w.grad = torch.full((4, 3), 0.5)
    opt.step()
    assert empty.shape == (0, 5)
    assert not torch.equal(w.detach(), torch.ones(4, 3))
    assert {r.param_index for r in opt.health()} == {1}
    assert set(opt.state_dict()["state"]) == {1}


def test_scalar_parameters():
    s = torch.nn.Parameter(torch.tensor(2.0))
    one = torch.nn.Parameter(torch.tensor([[3.0]]))
    opt = Shampoo([s, one], lr=0.1, betas=(0.0, 1.0), epsilon=1e-12, precondition_frequency=1)
    for _ in range(3):
        s.grad = torch.tensor(4.0)
        one.grad = torch.tensor([[-2.0]])
        opt.step()
    # A 1x1 factor: L = t·g² (β₂ = 1 sums), root L^(-1/2) = 1/(sqrt(t)·|g|), refreshed every step
    # before preconditioning, so step t moves the parameter by -lr·sign(g)/sqrt(t).
    moved = 0.1 * sum(1 / math.sqrt(t) for t in (1, 2, 3))
    torch.testing.assert_close(s.detach(), torch.tensor(2.0 - moved), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.detach(), torch.tensor([[3.0 + moved]]), rtol=1e-5, atol=1e-6)
    assert s.shape == () and one.shape == (1, 1)
    assert [r.shape for r in opt.health()] == [(1,), (1,)]
