"""``IterateAveragingSwitch``: evaluation and checkpoints see iterate averaging's averaged weights.

A ``Shampoo`` with ``iterate_averaging_config`` (GPA, Schedule-Free) holds the gradient point
``y`` in the parameters while it trains; the weights to evaluate and to keep are the average
``x``. This callback calls ``optimizer.eval()`` when validation, test or prediction starts and
when training ends, and ``optimizer.train()`` when training (re)starts, on every ``Shampoo`` of
the trainer that averages (others are left alone). A checkpoint saved while training holds the
averaged weights in ``state_dict`` and the optimizer state of eval mode, whose saved ``y``
``train()`` restores bitwise on resume. ``ShampooCallback`` runs one from its own hooks; with
``configure_shampoo`` or a ``Shampoo`` of your own, add it to the trainer yourself.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..optim import Shampoo
from ..strategies.ddp import consolidate_checkpoint, unwrap

__all__ = ["IterateAveragingSwitch"]


def _averaging(trainer: pl.Trainer) -> list[Shampoo]:
    optimizers = [unwrap(o) for o in getattr(trainer, "optimizers", [])]
    return [o for o in optimizers if isinstance(o, Shampoo) and o.averaging]


class IterateAveragingSwitch(pl.Callback):
    """Switch averaging optimizers to the averaged weights for evaluation and checkpoints."""

    def _eval(self, trainer: pl.Trainer) -> None:
        for optimizer in _averaging(trainer):
            optimizer.eval()

    def _train(self, trainer: pl.Trainer) -> None:
        for optimizer in _averaging(trainer):
            optimizer.train()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._train(trainer)  # after a validation inside the epoch (a host check otherwise)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)  # the fitted module holds the averaged weights

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)

    def on_save_checkpoint(  # type: ignore[override]
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> bool:
        """Lightning took the module's and optimizers' state before this hook: when an averaging
        optimizer is training, take them again in eval mode (cloned, and consolidated as
        ``ShampooCallback`` does), then switch back; returns whether it did. Collective under the
        Shampoo strategies and plain DDP (every rank runs this hook)."""
        training = [o for o in _averaging(trainer) if o.training]
        if not training:
            return False
        for optimizer in training:
            optimizer.eval()
        strategy = trainer.strategy
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {
                k: v.clone() for k, v in strategy.lightning_module_state_dict().items()
            }
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [strategy.optimizer_state(o) for o in trainer.optimizers]
            consolidate_checkpoint(trainer, checkpoint)
        for optimizer in training:
            optimizer.train()
        return "optimizer_states" in checkpoint
