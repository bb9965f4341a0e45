"""Blocks sharded across ranks: the ownership planner, bucket-composition invariance of the
kernels, ``optimizer.shard()`` on torch.distributed, and the Lightning strategies (2 CPU processes
with gloo; the Lightning jobs run in a subprocess, see ``dist_scripts/lightning_job.py``).

Single-process references take the same global batch as the two ranks, as two micro-batches
(rank 0's half, then rank 1's) with gradient accumulation: DDP's ``g₀/2 + g₁/2`` is bitwise what
accumulating ``loss/2`` gives (``dist_common.accumulation_order``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import lightning_shampoo as ls
from lightning_shampoo.distributed import block_cost, lpt_assign, plan_ownership, refresh_weighted_cost
from lightning_shampoo.linalg import stable_pow

SCRIPTS = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))

import dist_common  # noqa: E402
import shard_worker  # noqa: E402
from dist_common import DIST_ENV, Net, callback, summary, trainer  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------ planner


def test_lpt_is_deterministic_and_breaks_ties_by_index_and_rank() -> None:
    costs = [3.0, 1.0, 3.0, 2.0, 2.0, 1.0]
    assert lpt_assign(costs, 2) == lpt_assign(list(costs), 2)
    # 3(i0)→r0, 3(i2)→r1, 2(i3)→r0, 2(i4)→r1, 1(i1)→r0, 1(i5)→r1
    assert lpt_assign(costs, 2) == [0, 0, 1, 0, 1, 1]
    assert lpt_assign(costs, 1) == [0] * 6
    assert sorted(set(lpt_assign([1.0] * 3, 8))) == [0, 1, 2]  # more ranks than blocks
    with pytest.raises(ValueError, match="world_size"):
        lpt_assign(costs, 0)


def _makespan(costs: list[float], owners: list[int], m: int) -> float:
    loads = [0.0] * m
    for c, r in zip(costs, owners):
        loads[r] += c
    return max(loads)


def test_lpt_imbalance_bounds_on_random_costs() -> None:
    rng = random.Random(0)
    for trial in range(200):  # Graham: LPT ≤ (4/3 − 1/(3m))·OPT; OPT by brute force
        m = rng.choice([2, 3])
        n = rng.randint(m + 1, 8)
        costs = [rng.uniform(0.1, 10.0) for _ in range(n)]
        lpt = _makespan(costs, lpt_assign(costs, m), m)
        opt = min(_makespan(costs, list(a), m) for a in itertools.product(range(m), repeat=n))
        assert lpt <= (4 / 3 - 1 / (3 * m)) * opt + 1e-9, (trial, costs)
    for m in (8, 64, 512):  # many blocks: within mean + largest block, and close to the mean
        costs = [rng.lognormvariate(0.0, 1.0) for _ in range(20 * m)]
        loads = [0.0] * m
        for c, r in zip(costs, lpt_assign(costs, m)):
            loads[r] += c
        mean = sum(costs) / m
        assert max(loads) <= mean + max(costs) + 1e-9
        assert max(loads) <= max(max(costs), 1.05 * mean)  # one block may exceed the mean alone


def test_block_cost_model() -> None:
    assert block_cost((64, 64), (0, 1)) > block_cost((32, 64), (0, 1)) > block_cost((32, 64), ())
    assert block_cost((64, 64), (0, 1), 100) < block_cost((64, 64), (0, 1), 1)
    # A refresh dominates: d³ per factor (10 flops each), amortized over the frequency.
    assert block_cost((64, 64), (0, 1), 1) == pytest.approx(2 * 10 * 64**3 + 64 * 64 * (8 + 4 * 128))
    # The planner's default counts the refresh in full: all ranks refresh at the same step.
    assert refresh_weighted_cost((64, 64), (0, 1), 100) == block_cost((64, 64), (0, 1), 1)


def test_plan_assigns_every_block_once_and_balances() -> None:
    opt = ls.Shampoo(Net().parameters(), max_preconditioner_dim=4)
    plan = plan_ownership(opt, 2)
    assert list(plan.owners) == opt.block_keys()  # every block exactly once, in the global order
    assert plan == plan_ownership(ls.Shampoo(Net().parameters(), max_preconditioner_dim=4), 2)
    assert set(plan.owners.values()) == {0, 1}
    assert plan.imbalance < 1.1
    counts = [sum(1 for r in plan.owners.values() if r == rank) for rank in range(3)]
    assert counts[2] == 0 and sum(counts) == len(opt.block_keys())


# ------------------------------------------------------------ bucket-composition invariance


def test_stable_pow_is_position_invariant_and_accurate() -> None:
    x = torch.rand(4099, dtype=torch.float64).mul(20).add(1e-6).float()
    for exponent in (-0.25, 0.25, -1 / 6, 1 / 3, 4.0, -0.5, 0.5):
        full = stable_pow(x, exponent)
        for start, length in ((0, 1), (5, 13), (1000, 40), (4090, 9)):
            assert torch.equal(stable_pow(x[start : start + length], exponent), full[start : start + length])
        exact = x.double().pow(exponent)
        error = ((full.double() - exact).abs() / exact).max()
        # The general path rounds once (float64 exp/log): ≤ ½ ulp; √, 1/√ and (x²)² take ≤ 2 ulps.
        bound = 2.4e-7 if exponent in (4.0, 0.5, -0.5) else 6.0e-8
        assert error <= bound, (exponent, float(error))
    assert torch.equal(stable_pow(torch.zeros(3), -0.25), torch.full((3,), math.inf))


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 4)
        self.e = nn.Parameter(0.1 * torch.randn(1, 8))

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))) + self.e.sum())


def _emulated_shard_run(config: Any, world: int | None, bucketing: bool = True) -> list[Tensor]:
    """Each 'rank' is an optimizer holding only its blocks (``owns``) on one shared model: the
    parameters equal a sharded run's exactly when a block's result does not depend on its bucket."""
    model = _Mixed()
    opts = []
    for rank in range(world or 1):
        opt = ls.Shampoo(
            model.parameters(),
            lr=0.02,
            preconditioner_config=config,
            max_preconditioner_dim=4,
            precondition_frequency=2,
            weight_decay=0.01,
            momentum=0.5,
            grafting_config=ls.AdamPreconditionerConfig(),
            use_bucketing=bucketing,
        )
        if world is not None:
            owners = {(p, b): (7 * p + 3 * b) % world for p, b in opt.block_keys()}
            opt.use_plan(opt.build_plan(world_size=world, owners=owners), rank)
        opts.append(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        for opt in opts:
            opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for opt in opts:
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


INVARIANCE_CONFIGS = {
    "root_inv": ls.RootInvShampooPreconditionerConfig(),
    "coupled_newton": ls.RootInvShampooPreconditionerConfig(
        amortized_computation_config=ls.CoupledNewtonConfig()
    ),
    "eigen_qr": ls.EigendecomposedShampooPreconditionerConfig(
        amortized_computation_config=ls.QREigendecompositionConfig()
    ),
    "kl_corrected": ls.KLShampooPreconditionerConfig(eigenvalue_correction=True),
    "soap": ls.EigenvalueCorrectedShampooPreconditionerConfig(),
    "psgd_kron": ls.PSGDKronPreconditionerConfig(),
    "psgd_quad": ls.PSGDKronPreconditionerConfig(mode="QUAD"),
}


@pytest.mark.parametrize("name", list(INVARIANCE_CONFIGS))
def test_block_results_do_not_depend_on_bucket_composition(name: str) -> None:
    """Buckets of up to 88 blocks vs 2 or 3 'ranks' vs one block per bucket: bitwise equal.
    (CPU ``pow`` rounds differently in the SIMD body and the scalar tail of a tensor, and coupled
    Newton iterated until a whole batch converged — both made results depend on the bucket.)"""
    config = INVARIANCE_CONFIGS[name]
    reference = _emulated_shard_run(config, None)
    initial = [p.detach() for p in _Mixed().parameters()]
    assert all((p - p0).abs().max() > 1e-3 for p, p0 in zip(reference, initial))
    for other in (_emulated_shard_run(config, 2), _emulated_shard_run(config, 3)):
        assert all(torch.equal(a, b) for a, b in zip(reference, other))
    assert all(torch.equal(a, b) for a, b in zip(reference, _emulated_shard_run(config, None, False)))


# ------------------------------------------------------------------ torch.distributed directly


def test_shard_without_lightning(tmp_path: Path) -> None:
    """Two processes shard one optimizer mid-run (its state redistributed) and reproduce the
    single-process parameters and state bitwise; consolidation gives the single-device format."""
    torch.multiprocessing.spawn(shard_worker.worker, args=(free_port(), str(tmp_path)), nprocs=2)
    reference = shard_worker.single()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    blocks = ranks[0]["blocks"]
    for out in ranks:
        assert out["sharded"] and out["same_distributor"]
        assert all(torch.equal(a, b) for a, b in zip(out["params"], reference["params"]))
        assert out["health"] == sorted(blocks)  # every block once, on every rank
    held = [{(p, k.split(".")[0]) for p, e in out["local"]["state"].items() for k in e} for out in ranks]
    assert held[0] and held[1] and not held[0] & held[1]
    assert len(held[0] | held[1]) == len(blocks)
    full, expected = ranks[0]["state"], reference["state"]
    assert full["param_groups"] == expected["param_groups"]
    assert full["state"].keys() == expected["state"].keys()
    for p, entries in expected["state"].items():
        assert full["state"][p].keys() == entries.keys()
        for key, value in entries.items():
            assert torch.equal(full["state"][p][key].nan_to_num(), value.nan_to_num()), (p, key)


def test_merged_weights_beside_skipped_vectors_shard_and_match(tmp_path: Path) -> None:
    """Merged ``[4, 16]`` weights and 64-vectors that skip preconditioning share a block length:
    both ranks shard (one plan, built once), step, and end bitwise equal to each other and to
    the replicated run."""
    torch.multiprocessing.spawn(shard_worker.worker, args=(free_port(), str(tmp_path), "collision"), nprocs=2)
    reference = shard_worker.single("collision")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for out in ranks:
        assert out["sharded"]
        assert all(torch.equal(a, b) for a, b in zip(out["params"], reference["params"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))


def test_iterate_averaging_sharded_matches_single_device(tmp_path: Path) -> None:
    """Schedule-Free with decoupled decay, sharded mid-run: parameters, the averaged weights of
    ``eval()`` (all-gathered values) and the train point restored by ``train()`` equal the
    single-process run's bitwise, and so does the consolidated state."""
    torch.multiprocessing.spawn(shard_worker.worker, args=(free_port(), str(tmp_path), "averaging"), nprocs=2)
    reference = shard_worker.single("averaging")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for out in ranks:
        assert out["sharded"]
        for key in ("params", "eval", "train"):
            assert all(torch.equal(a, b) for a, b in zip(out[key], reference[key])), key
        assert all(torch.equal(a, b) for a, b in zip(out["train"], out["params"]))
    full, expected = ranks[0]["state"], reference["state"]
    for p, entries in expected["state"].items():
        for key, value in entries.items():
            assert torch.equal(full["state"][p][key].nan_to_num(), value.nan_to_num()), (p, key)


def test_shard_on_one_rank_is_a_no_op() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        opt = ls.Shampoo(Net().parameters())
        assert opt.shard() is None and not opt.sharded and opt.distributor is None
        with pytest.raises(ValueError, match="communication_dtype"):
            opt.shard(communication_dtype=torch.int32)
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="process group"):
        ls.Shampoo(Net().parameters()).shard()


# ------------------------------------------------------------------------------- Lightning


def test_strategies_are_registered() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert {"shampoo_ddp", "shampoo_ddp_spawn", "shampoo_fsdp"} <= set(StrategyRegistry)
    spawn = StrategyRegistry.get("shampoo_ddp_spawn")
    assert isinstance(spawn, ls.ShampooDDPStrategy) and spawn._start_method == "spawn"
    assert isinstance(StrategyRegistry.get("shampoo_fsdp"), ls.ShampooFSDPStrategy)


def _runs(out: Path) -> list[dict[str, Any]]:
    names = ("half", "fsdp_half", "fsdp_full", "plain_half", "averaging_half")
    ckpt = {name: str(out / f"{name}.ckpt") for name in names}
    return [
        {"name": "shampoo", "strategy": "shampoo_ddp"},  # by registry name, fp32
        {"name": "soap", "strategy": "shampoo_ddp", "preconditioner": "soap"},
        {"name": "psgd_kron", "strategy": "shampoo_ddp", "preconditioner": "psgd_kron"},
        {"name": "bf16", "strategy": "shampoo_ddp", "communication_dtype": "bfloat16", "epsilon": 1e-3},
        {"name": "half", "strategy": "shampoo_ddp", "epochs": 1, "save": ckpt["half"]},
        {"name": "resumed", "strategy": "shampoo_ddp", "resume": ckpt["half"]},
        {"name": "fsdp", "strategy": "shampoo_fsdp"},
        {"name": "fsdp_half", "strategy": "shampoo_fsdp", "epochs": 1, "save": ckpt["fsdp_half"]},
        {"name": "fsdp_resumed", "strategy": "shampoo_fsdp", "resume": ckpt["fsdp_half"]},
        {
            "name": "fsdp_full",
            "strategy": "shampoo_fsdp",
            "epochs": 1,
            "full_checkpoint": True,
            "save": ckpt["fsdp_full"],
        },
        {"name": "plain", "strategy": "ddp", "callback": True},
        {"name": "plain_half", "strategy": "ddp", "callback": True, "epochs": 1, "save": ckpt["plain_half"]},
        {"name": "plain_resumed", "strategy": "ddp", "callback": True, "resume": ckpt["plain_half"]},
        {"name": "averaging", "strategy": "shampoo_ddp", "averaging": True},
        {
            "name": "averaging_half",
            "strategy": "shampoo_ddp",
            "averaging": True,
            "epochs": 1,
            "save": ckpt["averaging_half"],
        },
        {
            "name": "averaging_resumed",
            "strategy": "shampoo_ddp",
            "averaging": True,
            "resume": ckpt["averaging_half"],
        },
    ]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process Lightning job running every multi-process fit (about 20 s)."""
    out = tmp_path_factory.mktemp("lightning_job")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"devices": 2, "out": str(out), "runs": _runs(out)}))
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "lightning_job.py"), str(spec)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def _load(job: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(job / f"{name}.rank{r}.pt", weights_only=True) for r in range(2)]


_REFERENCES: dict[tuple[Any, ...], dict[str, Any]] = {}


def reference(
    preconditioner: str = "shampoo", *, adamw: bool = False, epsilon: float = 1e-10, averaging: bool = False
) -> dict[str, Any]:
    """The one-process run with the same global batch (two accumulated micro-batches per step)."""
    key = (preconditioner, adamw, epsilon, averaging)
    if key not in _REFERENCES:
        module = Net(preconditioner, mode="accumulate", adamw=adamw, epsilon=epsilon, averaging=averaging)
        callbacks = [callback()] if adamw else []
        if averaging:
            callbacks.append(ls.IterateAveragingSwitch())
        t = trainer(accumulate_grad_batches=2, callbacks=callbacks or None)
        t.fit(module)
        _REFERENCES[key] = summary(module, t.optimizers[0])
    return _REFERENCES[key]


def _assert_bitwise(params: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    initial = dict(Net().named_parameters())
    for name, value in expected.items():
        assert (value - initial[name]).abs().max() > 1e-3, f"{name} did not move"
        assert torch.equal(params[name], value), f"{name}: max diff {(params[name] - value).abs().max()}"


def _assert_partition(ranks: list[dict[str, Any]]) -> None:
    """Each rank holds state for the blocks the planner gave it, the union is every block once."""
    blocks = ranks[0]["blocks"]
    plan = plan_ownership(Net().configure_optimizers(), 2)
    held = [{tuple(k) for k in out["held"]} for out in ranks]
    for rank, out in enumerate(ranks):
        assert out["sharded"]
        assert held[rank] == {key for key, owner in plan.owners.items() if owner == rank}
    assert len(held[0]) + len(held[1]) == len(blocks) == len(held[0] | held[1])
    total = ranks[0]["state_numel"] + ranks[1]["state_numel"]
    assert max(out["state_numel"] for out in ranks) < 0.6 * total


@pytest.mark.parametrize("preconditioner", ["shampoo", "soap", "psgd_kron"])
def test_shampoo_ddp_equals_one_process_bitwise(job: Path, preconditioner: str) -> None:
    ranks = _load(job, preconditioner)
    for out in ranks:
        _assert_bitwise(out["params"], reference(preconditioner)["params"])
    _assert_partition(ranks)


def test_shampoo_ddp_bf16_communication(job: Path) -> None:
    """Updates travel in bf16: each parameter's total displacement stays within bf16's unit
    roundoff (2⁻⁸ relative, on a well-conditioned run) of the fp32 run's — and is not identical."""
    expected = reference(epsilon=1e-3)["params"]
    initial = dict(Net().named_parameters())
    for out in _load(job, "bf16"):
        for name, value in expected.items():
            moved, moved_bf16 = value - initial[name], out["params"][name] - initial[name]
            error = (moved_bf16 - moved).norm() / moved.norm()
            assert 0 < error < 2**-8, (name, float(error))


def test_shampoo_ddp_checkpoint_resumes_on_two_and_one_ranks(job: Path) -> None:
    checkpoint = torch.load(job / "half.ckpt", weights_only=True)
    saved = checkpoint["optimizer_states"][0]["state"]
    blocks = {(p, key.split(".")[0]) for p, entries in saved.items() for key in entries}
    assert len(blocks) == len(_load(job, "half")[0]["blocks"])  # rank 0's file holds every block
    uninterrupted = _load(job, "shampoo")[0]["params"]
    for out in _load(job, "resumed"):
        _assert_bitwise(out["params"], uninterrupted)
    _assert_partition(_load(job, "resumed"))
    module = Net(mode="accumulate")
    trainer(accumulate_grad_batches=2).fit(module, ckpt_path=job / "half.ckpt")
    _assert_bitwise(dict(module.named_parameters()), uninterrupted)


def test_iterate_averaging_under_shampoo_ddp(job: Path) -> None:
    """Schedule-Free with ``IterateAveragingSwitch`` on two ranks: the fitted module (the
    averaged weights, eval() through the all-gather) equals the one-process run's bitwise; a
    run resumed from the epoch-1 checkpoint (saved in eval mode) ends there bitwise too."""
    expected = reference(averaging=True)["params"]
    for out in _load(job, "averaging"):
        _assert_bitwise(out["params"], expected)
    _assert_partition(_load(job, "averaging"))
    checkpoint = torch.load(job / "averaging_half.ckpt", weights_only=True)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["train_mode"] is False
    for out in _load(job, "averaging_resumed"):
        _assert_bitwise(out["params"], expected)


def test_shampoo_fsdp_equals_ddp_and_resumes(job: Path) -> None:
    ddp = _load(job, "shampoo")[0]["params"]
    ranks = _load(job, "fsdp")
    assert ranks[1]["local_shapes"]["gain"] == (0, 8) and ranks[1]["local_shapes"]["offset"] == (0,)
    assert ranks[0]["local_shapes"]["gain"] == (1, 8)
    for out in ranks:
        for name, value in ddp.items():
            torch.testing.assert_close(out["params"][name], value, rtol=0, atol=1e-6)
    _assert_partition(ranks)
    for out in _load(job, "fsdp_resumed"):
        for name, value in _load(job, "fsdp")[0]["params"].items():
            torch.testing.assert_close(out["params"][name], value, rtol=0, atol=1e-6)
    _assert_partition(_load(job, "fsdp_resumed"))


def test_shampoo_fsdp_distributed_checkpoint_holds_each_block_once(job: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(job / "fsdp_half.ckpt").read_metadata()
    files: dict[str, set[tuple[int, str]]] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith("optimizer_0.state."):
            param, block = index.fqn.split(".")[2:4]
            files.setdefault(info.relative_path, set()).add((int(param), block))
    assert len(files) == 2  # one file per rank, each with that rank's blocks only
    parts = list(files.values())
    assert not parts[0] & parts[1]
    assert len(parts[0] | parts[1]) == len(_load(job, "fsdp")[0]["blocks"])
    # The single-file variant (save_distributed_checkpoint=False) resumes on one process.
    module = Net(mode="accumulate")
    trainer(accumulate_grad_batches=2).fit(module, ckpt_path=job / "fsdp_full.ckpt")
    _assert_bitwise(dict(module.named_parameters()), _load(job, "shampoo")[0]["params"])


def test_plain_ddp_with_shampoo_callback_shards_and_checkpoints(job: Path) -> None:
    expected = reference(adamw=True)["params"]
    ranks = _load(job, "plain")
    for out in ranks:
        _assert_bitwise(out["params"], expected)
    held = [{tuple(k) for k in out["held"]} for out in ranks]
    assert all(out["sharded"] for out in ranks) and held[0] and held[1] and not held[0] & held[1]
    assert len(held[0] | held[1]) == len(ranks[0]["blocks"])
    saved = torch.load(job / "plain_half.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert len({(p, k.split(".")[0]) for p, e in saved.items() for k in e}) == len(ranks[0]["blocks"])
    for out in _load(job, "plain_resumed"):
        _assert_bitwise(out["params"], expected)
    module = Net(mode="accumulate", adamw=True)
    trainer(accumulate_grad_batches=2, callbacks=[callback()]).fit(module, ckpt_path=job / "plain_half.ckpt")
    _assert_bitwise(dict(module.named_parameters()), expected)


def test_accumulation_order_is_the_ranks_batches() -> None:
    order, half = dist_common.accumulation_order(), dist_common.GLOBAL_BATCH // 2
    ranks = [dist_common.rank_order(2, r) for r in range(2)]
    assert order[:half] == ranks[0][:half] and order[half : 2 * half] == ranks[1][:half]
    assert sorted(order) == list(range(dist_common.STEPS_PER_EPOCH * dist_common.GLOBAL_BATCH))
