"""The block plan is built once and is the same wherever it is built: for random models (mixed
shapes, merged and skipped parameters, stacked parameters) and 1–8 simulated ranks, every rank's
plan equals the optimizer's, every block has exactly one owner, and the ranks' buckets tile the
blocks; the update-buffer segments of every rank fit the chunk."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from lightning_shampoo import AdamPreconditionerConfig, Shampoo


def _random_groups(seed: int) -> list[dict]:
    rng = random.Random(seed)
    shapes: list[tuple[int, ...]] = []
    for _ in range(rng.randint(3, 9)):
        kind = rng.choice(["matrix", "small", "vector", "conv", "scalar"])
        if kind == "matrix":
            shapes.append((rng.randint(2, 70), rng.randint(2, 70)))
        elif kind == "small":
            shapes.append((4, 16))  # merged into a 64-long block
        elif kind == "vector":
            shapes.append((rng.choice([16, 64, 70]),))
        elif kind == "conv":
            shapes.append((rng.randint(2, 8), rng.randint(1, 4), 3, 3))
        else:
            shapes.append(())
    torch.manual_seed(seed)
    plain = [nn.Parameter(torch.randn(s)) for s in shapes]
    stacked = [nn.Parameter(torch.randn(rng.randint(2, 4), rng.randint(3, 40), rng.randint(3, 40)))]
    return [
        {"params": plain, "skip_preconditioning_rank_lt": rng.choice([0, 2])},
        {"params": stacked, "stacked": True},
    ]


def _optimizer(seed: int) -> Shampoo:
    return Shampoo(
        _random_groups(seed),
        grafting_config=AdamPreconditionerConfig(),
        max_preconditioner_dim=32,
        max_bucket_numel=4096,
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_every_rank_builds_the_optimizers_plan_and_each_block_has_one_owner(seed: int, world: int) -> None:
    reference = _optimizer(seed).build_plan(world_size=world)
    blocks = reference.block_keys()
    assert set(reference.ownership.owners) == set(blocks) and len(reference.ownership.owners) == len(blocks)
    for rank in range(world):
        # Each "rank" is a separate optimizer over the same model: it builds its own plan.
        mine = _optimizer(seed)
        plan = mine.build_plan(world_size=world)
        assert plan == reference
        assert plan.fingerprint() == reference.fingerprint()
        mine.use_plan(plan, rank)
        assert mine.buckets == reference.local(rank)
        assert all(b.owner == rank for b in mine.buckets)
    rows = [key for rank in range(world) for b in reference.local(rank) for key in b.rows()]
    assert sorted(rows) == sorted(blocks)  # every block exactly once, on its owner
    assert all(reference.owner(key) == b.owner for b in reference.buckets for key in b.rows())
    totals = [sum(b.numel for b in reference.local(r)) for r in range(world)]
    assert reference.chunk == max(1, *totals)
    for rank in range(world):
        offsets = [offset for _, offset in reference.segments(rank)]
        assert offsets == sorted(offsets) and all(o <= reference.chunk for o in offsets)


def test_plans_differ_when_the_models_do() -> None:
    a, b = _optimizer(0).build_plan(world_size=2), _optimizer(1).build_plan(world_size=2)
    assert a.fingerprint() != b.fingerprint()


def test_a_group_added_later_keeps_the_owners_of_existing_blocks() -> None:
    opt = _optimizer(3)
    plan = opt.build_plan(world_size=4)
    opt.use_plan(plan, 1)
    extra = nn.Parameter(torch.randn(40, 24))
    opt.add_param_group({"params": [extra]})
    after = opt.plan
    assert after.world_size == 4
    for key, owner in plan.ownership.owners.items():
        assert after.owner(key) == owner
    new = [key for key in after.block_keys() if key[0] == len(opt.param_groups[0]["params"]) + 1]
    assert new and all(0 <= after.owner(key) < 4 for key in new)


def test_merged_weight_and_skipped_vector_of_one_length_never_share_a_bucket() -> None:
    weights = [nn.Parameter(torch.randn(4, 16)) for _ in range(3)]
    vectors = [nn.Parameter(torch.randn(64)) for _ in range(3)]
    opt = Shampoo(
        weights + vectors, grafting_config=AdamPreconditionerConfig(), skip_preconditioning_rank_lt=2
    )
    for world in (1, 2):
        plan = opt.build_plan(world_size=world)
        for bucket in plan.buckets:
            kinds = {m.param.rank < 2 for m in bucket.members}
            assert len(kinds) == 1
            assert bucket.graft is None if kinds == {True} else bucket.graft is not None
    assert math.prod(opt.buckets[0].block_shape) == 64
