"""Shared by ``tests/test_distributed.py`` and the multi-process jobs it launches: a small
LightningModule with every parameter kind (including ``[1, 8]`` and ``[1]`` parameters, whose
FSDP shard is empty on rank 1), fixed data and the per-rank data order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_shampoo as ls

GLOBAL_BATCH = 8  # two ranks get 4 samples each per step
STEPS_PER_EPOCH = 4

PRECONDITIONERS: dict[str, Any] = {
    "shampoo": ls.RootInvShampooPreconditionerConfig(),
    "soap": ls.EigenvalueCorrectedShampooPreconditionerConfig(),
    "psgd_kron": ls.PSGDKronPreconditionerConfig(),
}

#: Launcher variables that would make Lightning join (or wait for) a distributed job.
DIST_ENV = (
    "MASTER_PORT",
    "MASTER_ADDR",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    n = STEPS_PER_EPOCH * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g))


def rank_order(world_size: int, rank: int) -> list[int]:
    """Sample order of ``rank``: what a non-shuffling ``DistributedSampler`` gives it."""
    return list(DistributedSampler(dataset(), num_replicas=world_size, rank=rank, shuffle=False))


def accumulation_order() -> list[int]:
    """One process, two micro-batches per step: rank 0's half of the global batch, then rank
    1's. DDP averages the two ranks' gradients as ``g₀/2 + g₁/2`` (exact halvings, one sum), which
    is bitwise what accumulating ``loss/2`` over these two micro-batches gives; one backward over
    the whole global batch sums in another order and agrees only to rounding."""
    half = GLOBAL_BATCH // 2
    orders = [rank_order(2, r) for r in range(2)]
    out: list[int] = []
    for step in range(STEPS_PER_EPOCH):
        for order in orders:
            out += order[step * half : (step + 1) * half]
    return out


class Net(pl.LightningModule):
    """``mode``: ``"ddp"`` (each rank its half), ``"accumulate"`` (one process, two micro-batches
    per step) or ``"full"`` (one process, the global batch at once). ``adamw``: return AdamW
    (for ``ShampooCallback`` to translate) instead of Shampoo. ``averaging``: Schedule-Free instead
    of momentum (run with ``IterateAveragingSwitch``). ``epsilon``: Shampoo's damping;
    the default 1e-10 leaves these small rank-deficient factors ill-conditioned, which turns any
    difference (a rounding) into a large one within a few steps — a sharp test of equality."""

    def __init__(
        self,
        preconditioner: str = "shampoo",
        mode: str = "ddp",
        adamw: bool = False,
        epsilon: float = 1e-10,
        averaging: bool = False,
    ) -> None:
        super().__init__()
        self.preconditioner, self.mode, self.adamw, self.epsilon = preconditioner, mode, adamw, epsilon
        self.averaging = averaging  # Schedule-Free instead of momentum (with IterateAveragingSwitch)
        torch.manual_seed(0)
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 8)
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(1, 8))
        self.c = nn.Linear(8, 3)
        self.offset = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x)))) * self.gain
        return self.c(h) + self.offset

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in (self.a, self.b, self.c):
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.adamw:  # for ShampooCallback to translate
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=1e-3)
        return ls.Shampoo(
            self.parameters(),
            lr=0.02,
            betas=(0.9, 0.999),
            epsilon=self.epsilon,
            weight_decay=1e-3,
            momentum=0.0 if self.averaging else 0.5,
            iterate_averaging_config=ls.ScheduleFreeConfig() if self.averaging else None,
            max_preconditioner_dim=4,
            precondition_frequency=2,
            start_preconditioning_step=2,
            grafting_config=ls.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
            preconditioner_config=PRECONDITIONERS[self.preconditioner],
        )

    def train_dataloader(self) -> DataLoader:
        data = dataset()
        if self.mode == "ddp":
            world, rank = self.trainer.world_size, self.trainer.global_rank
            return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=rank_order(world, rank))
        if self.mode == "accumulate":
            return DataLoader(data, batch_size=GLOBAL_BATCH // 2, sampler=accumulation_order())
        return DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)


def trainer(
    strategy: Any = "auto", devices: int = 1, epochs: int = 2, steps: int = -1, **kwargs: Any
) -> pl.Trainer:
    """Runs stop at epoch ends (``epochs``), so that a run resumed from the checkpoint of an
    earlier epoch continues exactly; ``steps`` stops earlier."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        max_steps=steps,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def full_parameters(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter in full (collective for FSDP ``DTensor`` shards)."""
    out = {}
    for name, p in module.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def summary(module: pl.LightningModule, optimizer: ls.Shampoo) -> dict[str, Any]:
    """What a test checks of one rank: full parameters and the blocks this rank holds state for."""
    state = optimizer.state_dict()["state"]
    held = sorted(
        (p, int(key.split(".", 1)[0][len("block_") :])) for p, entries in state.items() for key in entries
    )
    return {
        "params": full_parameters(module),
        "held": sorted(set(held)),
        "blocks": optimizer.block_keys(),
        "sharded": optimizer.sharded,
        "state_numel": sum(t.numel() for entries in state.values() for t in entries.values()),
        "local_shapes": {
            name: tuple(p.to_local().shape if hasattr(p, "to_local") else p.shape)
            for name, p in module.named_parameters()
        },
    }


def save_summary(path: Path, module: pl.LightningModule, optimizer: ls.Shampoo, rank: int) -> None:
    torch.save(summary(module, optimizer), path.with_name(f"{path.name}.rank{rank}.pt"))


def callback() -> Any:
    """The ``ShampooCallback`` of the plain-``"ddp"`` runs (helpers off: only the optimizer)."""
    return ls.ShampooCallback(
        "shampoo",
        precondition_frequency=2,
        start_preconditioning_step=2,
        max_preconditioner_dim=4,
        frequency_scheduler=False,
        health_monitor=False,
        fallback=False,
    )
