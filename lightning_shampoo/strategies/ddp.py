"""``ShampooDDPStrategy``: Lightning's DDP with every ``Shampoo`` sharded across the ranks."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from torch.optim import Optimizer

from .._checks import require_choice
from ..distributed import COMMUNICATION_DTYPES, consolidate_state_dict
from ..optim import Shampoo

__all__ = ["COMMUNICATION_DTYPES", "ShampooDDPStrategy", "consolidate_checkpoint", "unwrap"]


def check_communication_dtype(value: Any) -> torch.dtype:
    return require_choice("communication_dtype", value, COMMUNICATION_DTYPES)


def unwrap(optimizer: Any) -> Any:
    """The optimizer a ``LightningOptimizer`` wraps (the package's one place that unwraps)."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def shard_all(optimizers: Any, communication_dtype: torch.dtype) -> None:
    """Shard every not-yet-sharded ``Shampoo`` among a strategy's optimizers (default group)."""
    for optimizer in optimizers:
        optimizer = unwrap(optimizer)
        if isinstance(optimizer, Shampoo) and optimizer.distributor is None:
            optimizer.shard(None, communication_dtype)


def consolidate_checkpoint(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """For a Lightning checkpoint being saved under a strategy that stores rank 0's own
    ``optimizer.state_dict()`` (plain DDP): replace each sharded ``Shampoo``'s entry by every
    block's state. Collective: every rank calls it (``ShampooCallback.on_save_checkpoint`` does).
    The Shampoo strategies consolidate themselves and are left alone."""
    states = checkpoint.get("optimizer_states")
    if states is None or getattr(trainer.strategy, "consolidates_shampoo_state", False):
        return
    for i, optimizer in enumerate(trainer.optimizers):
        optimizer = unwrap(optimizer)
        if isinstance(optimizer, Shampoo) and optimizer.sharded and i < len(states):
            states[i] = consolidate_state_dict(optimizer)


class ShampooDDPStrategy(DDPStrategy):
    """DDP whose ``Shampoo`` optimizers each rank runs for its own preconditioner blocks only
    (1/N of the refresh work and optimizer state per rank), sharing the updates through one
    all-gather per step in ``communication_dtype``. Parameters equal a single-device run's
    (bitwise with fp32 communication).

    Checkpoints: rank 0's holds every block's state keyed by (parameter, block), as a
    single-device run writes it, so it resumes on any number of ranks; on load each rank keeps
    the blocks it owns. Other arguments are ``DDPStrategy``'s.
    """

    strategy_name = "shampoo_ddp"
    #: ``ShampooCallback`` checks this before consolidating a checkpoint itself.
    consolidates_shampoo_state = True

    def __init__(self, *args: Any, communication_dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        check_communication_dtype(communication_dtype)
        super().__init__(*args, **kwargs)
        self.communication_dtype = communication_dtype

    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        shard_all(self.optimizers, self.communication_dtype)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Collective for a sharded ``Shampoo``: rank 0 gets every block (the checkpoint's)."""
        inner = unwrap(optimizer)
        if isinstance(inner, Shampoo):
            return consolidate_state_dict(inner)
        return super().optimizer_state(optimizer)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("shampoo_ddp", "popen"), ("shampoo_ddp_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"DDP sharding Shampoo's blocks across ranks, start_method '{start_method}'",
                    start_method=start_method,
                )
