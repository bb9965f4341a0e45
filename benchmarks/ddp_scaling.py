"""Scaling of sharded Shampoo: measured on 1 vs 2 CPU ranks, and planned for large clusters.

Part A — one optimizer over a 2-layer transformer's matrices (q, k, v, o 512x512, MLP 2048x512
and 512x2048; blocks of 256, so 96 blocks of 256x256), gradients set directly (identical on
every rank), run on 1 process and on 2 processes (gloo, one thread each): per-rank refresh
time and optimizer-state bytes as a ratio to 1 rank (targets ≤ 0.6x and ≤ 0.55x), and the
share of a plain (non-refresh) optimizer step spent in the update all-gather, with fp32 and
bf16 communication.

Part B — the ownership planner on LLaMA-7B's parameter list (32 layers of q, k, v, o
[4096, 4096], gate/up [11008, 4096], down [4096, 11008], two norms [4096]; embedding and head
[32000, 4096]; final norm; blocks of 1024) at 8, 64 and 512 ranks: max/mean imbalance of the
planner's cost (``refresh_weighted_cost``), of the refresh flops alone (the spike every rank waits
for at a refresh step), of the per-step products (``numel·Σdᵢ``) and of the optimizer-state
bytes (target ≤ 1.05);
state bytes per rank (per-block bytes measured from a real step of each block shape); bytes
each rank receives from the update all-gather per step (fp32 and bf16), beside the 2·4 bytes
per parameter a ring all-reduce of fp32 gradients moves. Parameters live on the meta device:
nothing of the model's size is allocated.

    python benchmarks/ddp_scaling.py             # both parts, prints markdown tables
    python benchmarks/ddp_scaling.py --part b    # the planner simulation only
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_shampoo.distributed as sharding
from lightning_shampoo import AdamPreconditionerConfig, RootInvShampooPreconditionerConfig, Shampoo

FREQUENCY = 4
STEPS = 4 * FREQUENCY  # four refreshes; medians over them and the plain steps


def _optimizer(params: list[torch.Tensor], max_dim: int, frequency: int) -> Shampoo:
    return Shampoo(
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        epsilon=1e-10,
        weight_decay=0.01,
        max_preconditioner_dim=max_dim,
        precondition_frequency=frequency,
        grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
        preconditioner_config=RootInvShampooPreconditionerConfig(),
    )


def state_bytes(optimizer: Shampoo) -> int:
    total = 0
    for bucket_state in optimizer.state.values():
        for section in bucket_state.values():
            total += sum(t.numel() * t.element_size() for t in section.values())
    return total


# --------------------------------------------------------------------------------- part A


def _transformer_shapes(layers: int = 2, d: int = 512) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    return shapes


def _run_rank(rank: int, world: int, port: int, dtype_name: str, results: Any) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    gather_seconds = [0.0]
    plain_gather = sharding._all_gather

    def timed_gather(output: torch.Tensor, input: torch.Tensor, group: Any) -> None:
        began = time.perf_counter()
        plain_gather(output, input, group)
        gather_seconds[0] += time.perf_counter() - began

    sharding._all_gather = timed_gather  # type: ignore[assignment]
    try:
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).requires_grad_() for s in _transformer_shapes()]
        optimizer = _optimizer(params, 256, FREQUENCY)
        if world > 1:
            optimizer.shard(communication_dtype=getattr(torch, dtype_name))
        refresh, plain = [], []
        for step in range(1, STEPS + 1):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            gather_seconds[0] = 0.0
            began = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - began
            if step % FREQUENCY == 0:
                refresh.append(sum(optimizer.refresh_seconds.values()))
            elif step > 1:
                plain.append((elapsed, gather_seconds[0]))
        results.put(
            {
                "rank": rank,
                "refresh": refresh,
                "plain": plain,
                "state_bytes": state_bytes(optimizer),
                "blocks": sum(plan.bucket.size for plan in optimizer.plans),
            }
        )
    finally:
        sharding._all_gather = plain_gather  # type: ignore[assignment]
        if world > 1:
            dist.destroy_process_group()


def _measure(world: int, dtype_name: str = "float32") -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_run_rank, args=(r, world, port, dtype_name, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sorted(out, key=lambda r: r["rank"])


def part_a(repeats: int = 2) -> None:
    """The machine may be shared: every configuration runs ``repeats`` times, interleaved, and each
    figure is the fastest seen (the least disturbed) — refreshes and plain steps separately."""
    runs: dict[str, list[list[dict[str, Any]]]] = {"1 rank": [], "2 ranks, fp32": [], "2 ranks, bf16": []}
    for _ in range(repeats):
        runs["1 rank"].append(_measure(1))
        runs["2 ranks, fp32"].append(_measure(2, "float32"))
        runs["2 ranks, bf16"].append(_measure(2, "bfloat16"))

    def best(name: str) -> list[dict[str, Any]]:
        out = []
        for rank in range(len(runs[name][0])):
            per_rank = [run[rank] for run in runs[name]]
            step, gather = min(pair for r in per_rank for pair in r["plain"])
            refresh = min(t for r in per_rank for t in r["refresh"])
            out.append({**per_rank[0], "refresh": refresh, "step": step, "gather": gather})
        return out

    one = best("1 rank")[0]
    print(
        f"## A. 1 vs 2 CPU ranks (gloo, 1 thread each; 96 blocks of 256x256, refresh every {FREQUENCY} "
        f"steps; fastest of {repeats} interleaved runs x {STEPS // FREQUENCY} refreshes)\n"
    )
    print(
        "| run | rank | blocks | refresh s | x 1 rank | state MiB | x 1 rank "
        "| plain step ms | all-gather ms | all-gather share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    row = "| {} | {} | {} | {:.3f} | {:.2f} | {:.1f} | {:.2f} | {:.1f} | {:.1f} | {:.0%} |"
    for name in runs:
        for r in best(name):
            print(
                row.format(
                    name,
                    r["rank"],
                    r["blocks"],
                    r["refresh"],
                    r["refresh"] / one["refresh"],
                    r["state_bytes"] / 2**20,
                    r["state_bytes"] / one["state_bytes"],
                    1e3 * r["step"],
                    1e3 * r["gather"],
                    r["gather"] / r["step"],
                )
            )
    print()


# --------------------------------------------------------------------------------- part B


def llama7b_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(32000, 4096)]
    for _ in range(32):
        shapes += [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008), (4096,), (4096,)]
    return [*shapes, (4096,), (32000, 4096)]


def _bytes_per_block(shapes: set[tuple[int, ...]]) -> dict[tuple[int, ...], int]:
    """Optimizer-state bytes of one block of each shape, from a real refresh step on the CPU."""
    out = {}
    for shape in sorted(shapes):
        p = torch.randn(shape).requires_grad_()
        optimizer = _optimizer([p], 1024, 1)
        p.grad = torch.randn(shape)
        optimizer.step()
        out[shape] = state_bytes(optimizer)
    return out


def part_b() -> None:
    shapes = llama7b_shapes()
    params = [torch.empty(s, device="meta", requires_grad=True) for s in shapes]
    optimizer = _optimizer(params, 1024, 100)
    blocks: dict[tuple[int, int], tuple[int, ...]] = {}
    for layouts in optimizer._layouts:
        for layout, _, _ in layouts:
            for b, shape in layout.block_shapes().items():
                blocks[(layout.index, b)] = shape
    per_block = _bytes_per_block(set(blocks.values()))
    numel = sum(p.numel() for p in params)
    total_bytes = sum(per_block[s] for s in blocks.values())
    counts = Counter(blocks.values())
    print(
        f"## B. Planner on LLaMA-7B ({numel / 1e9:.2f} B parameters, {len(blocks)} blocks of at most 1024: "
        + ", ".join(f"{n}x {'x'.join(map(str, s))}" for s, n in counts.most_common())
        + "; root-inverse Shampoo + Adam grafting, frequency 100; "
        + f"state {total_bytes / 2**30:.1f} GiB in all)\n"
    )
    print(
        "| ranks | blocks/rank | imbalance: planner cost | refresh flops | per-step flops | state bytes "
        "| state GiB/rank (max) | 1/N of total | all-gather GB/rank/step fp32 | bf16 | padding "
        "| grad all-reduce GB/rank/step (fp32 ring) | plan ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for world in (8, 64, 512):
        began = time.perf_counter()
        plan = sharding.plan_ownership(optimizer, world)
        planned = time.perf_counter() - began

        def imbalance(weight: Any, plan: sharding.OwnershipPlan = plan, world: int = world) -> float:
            loads = [0.0] * world
            for key, rank in plan.owners.items():
                loads[rank] += weight(key)
            return max(loads) / (sum(loads) / world)

        state = [0] * world
        owned_numel = [0] * world
        for key, rank in plan.owners.items():
            shape = blocks[key]
            state[rank] += per_block[shape]
            owned_numel[rank] += int(torch.Size(shape).numel())
        chunk = max(owned_numel)
        received = world * chunk
        all_reduce = 2 * 4 * numel * (world - 1) / world
        refresh = imbalance(lambda k: sum(d**3 for d in blocks[k]))
        per_step = imbalance(lambda k: torch.Size(blocks[k]).numel() * sum(blocks[k]))
        print(
            f"| {world} | {len(blocks) / world:.1f} | {plan.imbalance:.3f} | {refresh:.3f} | {per_step:.3f} "
            f"| {imbalance(lambda k: per_block[blocks[k]]):.3f} | {max(state) / 2**30:.2f} "
            f"| {total_bytes / world / 2**30:.2f} | {4 * received / 1e9:.1f} | {2 * received / 1e9:.1f} "
            f"| {received / numel - 1:.1%} | {all_reduce / 1e9:.1f} | {1e3 * planned:.0f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per part-A configuration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("a", "both"):
        part_a(args.repeats)
    if args.part in ("b", "both"):
        part_b()


if __name__ == "__main__":
    main()
