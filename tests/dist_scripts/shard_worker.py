"""``optimizer.shard()`` without Lightning: the worker of one rank (started by
``torch.multiprocessing.spawn`` from ``tests/test_distributed.py``) and the single-process run it
is compared with. Every rank computes the same full-batch gradient, so the sharded optimizer
must reproduce the single-process parameters and state bitwise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lightning_shampoo as ls
from lightning_shampoo.distributed import consolidate_state_dict, gather_health

STEPS, SHARD_AT = 6, 2


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))


def optimizer(module: nn.Module) -> ls.Shampoo:
    return ls.Shampoo(
        module.parameters(),
        lr=0.02,
        betas=(0.9, 0.999),
        epsilon=1e-10,
        weight_decay=1e-3,
        max_preconditioner_dim=4,
        precondition_frequency=2,
        start_preconditioning_step=2,
        grafting_config=ls.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
    )


def train(module: nn.Module, opt: ls.Shampoo, steps: range) -> None:
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]
    for step in steps:
        x, y = batches[step]
        opt.zero_grad()
        nn.functional.mse_loss(module(x), y).backward()
        opt.step()


def single() -> dict[str, Any]:
    module = model()
    opt = optimizer(module)
    train(module, opt, range(STEPS))
    return {"params": [p.detach().clone() for p in module.parameters()], "state": opt.state_dict()}


def worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = model()
        opt = optimizer(module)
        train(module, opt, range(SHARD_AT))  # some state exists already: sharding redistributes it
        distributor = opt.shard()
        again = opt.shard()  # a second call returns the same distributor
        train(module, opt, range(SHARD_AT, STEPS))
        torch.save(
            {
                "params": [p.detach().clone() for p in module.parameters()],
                "state": consolidate_state_dict(opt),
                "local": opt.state_dict(),
                "health": [(h.param_index, h.block_index) for h in gather_health(opt)],
                "sharded": opt.sharded,
                "same_distributor": distributor is again,
                "blocks": opt.block_keys(),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
