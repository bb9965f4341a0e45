"""Shared by ``tests/test_finetune_and_resume.py`` and the 2-rank job it launches
(``finetune_resume_job.py``): a LightningModule with a ``backbone`` that ``BackboneFinetuning``
unfreezes, fixed data, and the trainers and callbacks of the fine-tuning and resume runs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_shampoo as ls

BATCH = 8  # per rank
SAMPLES = 64
UNFREEZE_AT = 1  # epoch
LR = 1e-2
WEIGHT_DECAY = 1e-2
BETAS = (0.85, 0.99)
EPS = 1e-7


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SAMPLES, 6, generator=g)
    return TensorDataset(x, torch.tanh(x @ torch.randn(6, 3, generator=g)))


class Tuner(pl.LightningModule):
    """``optimizer``: ``"adamw"`` (AdamW over the trainable parameters, named or not, with a
    LambdaLR schedule per step) or ``"configure_shampoo"``."""

    def __init__(self, optimizer: str = "adamw", named: bool = False, schedule: bool = True) -> None:
        super().__init__()
        self.optimizer_kind, self.named, self.schedule = optimizer, named, schedule
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh())
        self.head = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer_kind == "configure_shampoo":
            return ls.configure_shampoo(
                self, lr=LR, weight_decay=WEIGHT_DECAY, precondition_frequency=2, start_preconditioning_step=2
            )
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        params: Any = trainable if self.named else [p for _, p in trainable]
        optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        if not self.schedule:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.05 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        data = dataset()
        world = self.trainer.world_size
        sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH, sampler=sampler)


def drop_in(**kwargs: Any) -> ls.ShampooCallback:
    """The drop-in with a short refresh interval (helpers off: only the optimizer)."""
    options: dict[str, Any] = dict(
        precondition_frequency=2,
        start_preconditioning_step=2,
        frequency_scheduler=False,
        health_monitor=False,
        fallback=False,
    )
    options.update(kwargs)
    return ls.ShampooCallback(**options)


def finetuning() -> BackboneFinetuning:
    return BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE_AT, backbone_initial_ratio_lr=0.5)


def trainer(root: Any, epochs: int = -1, steps: int = -1, devices: int = 1, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        default_root_dir=root,
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


def params(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}
