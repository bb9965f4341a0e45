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


class Collision(nn.Module):
    """Three merged small weights (``[4, 16]`` → one 64-long block) beside three 64-vectors: the
    same block length, but the vectors skip preconditioning (``skip_preconditioning_rank_lt=2``)
    — the model that once made rank 1 raise a layout mismatch while rank 0 hung."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weights = nn.ParameterList([nn.Parameter(0.3 * torch.randn(4, 16)) for _ in range(3)])
        self.scales = nn.ParameterList([nn.Parameter(1.0 + 0.1 * torch.randn(64)) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, x, x, x], dim=1)  # [B, 64]
        out = 0.0
        for w, s in zip(self.weights, self.scales):
            out = out + torch.tanh((h * s) @ w.reshape(64)[:, None].expand(64, 3))
        return out


def model(kind: str = "mlp") -> nn.Module:
    if kind == "collision":
        return Collision()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))


def optimizer(module: nn.Module, kind: str = "mlp") -> ls.Shampoo:
    if kind == "averaging":  # Schedule-Free with decoupled decay (it shrinks z on the owner)
        return ls.Shampoo(
            module.parameters(),
            lr=0.02,
            betas=(0.0, 0.999),
            epsilon=1e-10,
            weight_decay=1e-2,
            max_preconditioner_dim=4,
            precondition_frequency=2,
            grafting_config=ls.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
            iterate_averaging_config=ls.ScheduleFreeConfig(train_interp_coeff=0.9),
        )
    if kind == "collision":
        return ls.Shampoo(
            module.parameters(),
            lr=0.02,
            grafting_config=ls.AdamPreconditionerConfig(),
            skip_preconditioning_rank_lt=2,
            precondition_frequency=2,
        )
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


def train(module: nn.Module, opt: ls.Shampoo, steps: range, kind: str = "mlp") -> None:
    g = torch.Generator().manual_seed(3)
    width = 16 if kind == "collision" else 6
    batches = [(torch.randn(8, width, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]
    for step in steps:
        x, y = batches[step]
        opt.zero_grad()
        nn.functional.mse_loss(module(x), y).backward()
        opt.step()


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def single(kind: str = "mlp") -> dict[str, Any]:
    module = model(kind)
    opt = optimizer(module, kind)
    train(module, opt, range(STEPS), kind)
    out = {"params": _params(module), "state": opt.state_dict()}
    if kind == "averaging":
        opt.eval()
        out["eval"] = _params(module)
        opt.train()
        out["train"] = _params(module)
    return out


def worker(rank: int, port: int, out: str, kind: str = "mlp") -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = model(kind)
        opt = optimizer(module, kind)
        shard_at = 0 if kind == "collision" else SHARD_AT
        train(module, opt, range(shard_at), kind)  # some state exists already: sharding redistributes it
        distributor = opt.shard()
        again = opt.shard()  # a second call returns the same distributor
        train(module, opt, range(shard_at, STEPS), kind)
        swapped = {}
        if kind == "averaging":  # through the distributor's all-gather, on every rank
            opt.eval()
            swapped["eval"] = _params(module)
            opt.train()
            swapped["train"] = _params(module)
        torch.save(
            {
                "params": [p.detach().clone() for p in module.parameters()],
                "state": consolidate_state_dict(opt),
                "local": opt.state_dict(),
                "health": [(h.param_index, h.block_index) for h in gather_health(opt)],
                "sharded": opt.sharded,
                "same_distributor": distributor is again,
                "blocks": opt.block_keys(),
                **swapped,
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
