"""Staggered refreshes (``refresh_stagger``): every block refreshes once per interval, the per-step
refresh work is balanced, the total work is unchanged, and the phases come from the plan."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import make_batches, small_model, train
from torch import nn

import lightning_shampoo as ls
from lightning_shampoo._refresh import block_phases, is_refresh_step
from lightning_shampoo.plan import refresh_flops

FREQ = 5


def _mlp(seed: int = 0) -> nn.Module:
    """Blocks of several refresh costs (max_preconditioner_dim=8 splits the weights)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 4))


def _batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 4, generator=g)) for _ in range(steps)]


def _make(model: nn.Module, stagger: bool, frequency: int = FREQ, **kwargs) -> ls.Shampoo:
    return ls.Shampoo(
        model.parameters(),
        lr=0.02,
        betas=(0.9, 0.95),
        epsilon=1e-8,
        precondition_frequency=frequency,
        max_preconditioner_dim=8,
        refresh_stagger=stagger,
        grafting_config=ls.AdamPreconditionerConfig(),
        **kwargs,
    )


def _run(model: nn.Module, opt: ls.Shampoo, batches) -> list[set[tuple[int, int]]]:
    """Train step by step; the blocks refreshed at each step (from their refresh step)."""
    refreshed = []
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        step = opt.param_groups[0]["step"]
        refreshed.append(
            {k for k in opt.block_keys() if int(opt.block_state(k)["status.refresh_step"]) == step}
        )
    return refreshed


def _costs(opt: ls.Shampoo) -> dict[tuple[int, int], float]:
    return {
        key: refresh_flops(b.block_shape, tuple(b.kernel.factor_dims))
        for b in opt.buckets
        for key in b.rows()
    }


def test_rule_in_one_place() -> None:
    assert [s for s in range(1, 16) if is_refresh_step(s, 5, 5)] == [5, 10, 15]
    assert [s for s in range(1, 16) if is_refresh_step(s, 5, 5, phase=2)] == [5, 7, 12]
    assert [s for s in range(1, 20) if is_refresh_step(s, 5, 8)] == [8, 10, 15]  # DS: grid, not start
    assert not any(is_refresh_step(s, 5, float("inf"), 3) for s in range(1, 30))


def test_each_block_refreshes_once_per_interval() -> None:
    model = _mlp()
    opt = _make(model, stagger=True)
    intervals = 6
    refreshed = _run(model, opt, _batches(FREQ * (intervals + 1)))
    keys = set(opt.block_keys())
    assert len(keys) >= 8
    assert all(not r for r in refreshed[: FREQ - 1])  # nothing before start_preconditioning_step
    assert refreshed[FREQ - 1] == keys  # every block at the start
    phases = opt.refresh_phases()
    assert len(set(phases.values())) == FREQ  # spread over every phase
    for i in range(intervals):
        window = refreshed[FREQ * (i + 1) : FREQ * (i + 2)]  # steps (start + i f, start + (i+1) f]
        for key in keys:
            hits = [j for j, r in enumerate(window) if key in r]
            assert len(hits) == 1, (key, i, hits)
            assert (FREQ * (i + 1) + 1 + hits[0]) % FREQ == phases[key]
    # An unstaggered run refreshes every block on the same steps, as many times.
    model2 = _mlp()
    plain = _make(model2, stagger=False)
    grid = _run(model2, plain, _batches(FREQ * (intervals + 1)))
    assert [len(r) for r in grid] == [len(keys) if (s + 1) % FREQ == 0 else 0 for s in range(len(grid))]
    assert opt.refresh_counts() == plain.refresh_counts() == (len(keys) * (intervals + 1), 0)


def test_per_step_refresh_work_is_balanced() -> None:
    model = _mlp()
    opt = _make(model, stagger=True)
    costs = _costs(opt)
    total = sum(costs.values())
    refreshed = _run(model, opt, _batches(FREQ * 4))
    per_step = [sum(costs[k] for k in r) for r in refreshed[FREQ:]]  # after the start
    assert sum(per_step) == pytest.approx(3 * total)  # the same work: 3 full refreshes
    mean = total / FREQ
    # LPT's bound: within one block's refresh of the mean; the unstaggered peak is ``total``.
    assert max(per_step) <= mean + max(costs.values())
    assert max(per_step) < 0.5 * total
    assert min(per_step) > 0


def test_frequency_one_equals_unstaggered_bitwise() -> None:
    batches = make_batches(8)
    a, b = small_model(), small_model()
    train(a, ls.Shampoo(a.parameters(), lr=0.01, precondition_frequency=1, refresh_stagger=True), batches)
    train(b, ls.Shampoo(b.parameters(), lr=0.01, precondition_frequency=1), batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_staggered_differs_but_trains() -> None:
    batches = _batches(20)
    a, b = _mlp(), _mlp()
    _run(a, _make(a, stagger=True), batches)
    _run(b, _make(b, stagger=False), batches)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.isfinite(p).all() for p in a.parameters())


def test_checkpoint_resume_is_bitwise() -> None:
    batches = _batches(FREQ * 3 + 2)
    whole = _mlp()
    _run(whole, _make(whole, stagger=True), batches)

    first = _mlp()
    opt = _make(first, stagger=True)
    cut = FREQ + 3  # mid-interval: some blocks of this interval refreshed, others not yet
    _run(first, opt, batches[:cut])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = _make(resumed, stagger=True)
    opt2.load_state_dict(saved["opt"])
    assert opt2.refresh_phases() == opt.refresh_phases()
    _run(resumed, opt2, batches[cut:])
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_phases_do_not_depend_on_bucketing_or_ranks() -> None:
    model = _mlp()
    bucketed = _make(model, stagger=True)
    single = _make(copy.deepcopy(model), stagger=True, use_bucketing=False)
    assert bucketed.refresh_phases() == single.refresh_phases()
    for world in (2, 3):
        plan = bucketed.build_plan(world_size=world)
        assert block_phases(plan, 0, FREQ) == bucketed.refresh_phases()


def test_phases_follow_a_changed_frequency() -> None:
    model = _mlp()
    opt = _make(model, stagger=True)
    _run(model, opt, _batches(FREQ))
    opt.param_groups[0]["precondition_frequency"] = 3
    assert set(opt.refresh_phases().values()) == {0, 1, 2}
    refreshed = _run(model, opt, _batches(6))
    for key in opt.block_keys():  # once in each interval of the new frequency
        assert sum(key in r for r in refreshed[1:4]) == 1
        assert sum(key in r for r in refreshed[4:]) <= 1


def test_stagger_off_reports_phase_zero_and_validates() -> None:
    model = _mlp()
    assert set(_make(model, stagger=False).refresh_phases().values()) == {0}
    with pytest.raises(ValueError, match="refresh_stagger"):
        ls.Shampoo(model.parameters(), refresh_stagger="yes")


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _emulated_ranks(config, world: int | None, bucketing: bool = True) -> list[torch.Tensor]:
    """Each 'rank' an optimizer holding only its blocks of one shared model (as
    tests/test_distributed.py): equal parameters mean a block's staggered refreshes do not
    depend on its bucket, its rank or the bucketing."""
    model = _Mixed()
    opts = []
    for rank in range(world or 1):
        opt = ls.Shampoo(
            model.parameters(),
            lr=0.02,
            preconditioner_config=config,
            max_preconditioner_dim=4,
            precondition_frequency=3,
            refresh_stagger=True,
            grafting_config=ls.AdamPreconditionerConfig(),
            use_bucketing=bucketing,
        )
        if world is not None:
            owners = {(p, b): (7 * p + 3 * b) % world for p, b in opt.block_keys()}
            opt.use_plan(opt.build_plan(world_size=world, owners=owners), rank)
        opts.append(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        for opt in opts:
            opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for opt in opts:
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "config",
    [
        ls.RootInvShampooPreconditionerConfig(),
        ls.RootInvShampooPreconditionerConfig(amortized_computation_config=ls.CoupledNewtonConfig()),
        ls.EigenvalueCorrectedShampooPreconditionerConfig(
            amortized_computation_config=ls.QREigendecompositionConfig(reference_soap=True)
        ),
    ],
    ids=["eigh", "newton", "soap_qr"],
)
def test_staggered_run_equals_across_ranks_and_bucketing(config) -> None:
    reference = _emulated_ranks(config, None)
    for other in (
        _emulated_ranks(config, 2),
        _emulated_ranks(config, 3),
        _emulated_ranks(config, None, False),
    ):
        assert all(torch.equal(a, b) for a, b in zip(reference, other))


def test_more_phases_than_blocks_spread_over_the_interval() -> None:
    model = _mlp()
    opt = _make(model, stagger=True, frequency=10**9)
    phases = opt.refresh_phases()
    n = len(phases)
    assert sorted(phases.values()) == [i * 10**9 // n for i in range(n)]
