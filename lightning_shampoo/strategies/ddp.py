"""``ShampooDDPStrategy``: Lightning's DDP with every ``Shampoo`` sharded across the ranks."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from torch.optim import Optimizer

from .._checks import require_choice
from ..distributed import consolidate_state_dict, shard_optimizer
from ..optim import Shampoo

__all__ = ["COMMUNICATION_DTYPES", "ShampooDDPStrategy"]

#: Dtypes the update all-gather may use (``shard_optimizer`` accepts the same).
COMMUNICATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_communication_dtype(value: Any) -> torch.dtype:
    return require_choice("communication_dtype", value, COMMUNICATION_DTYPES)


def unwrap(optimizer: Any) -> Any:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def shard_all(optimizers: Any, communication_dtype: torch.dtype) -> None:
    """Shard every not-yet-sharded ``Shampoo`` among a strategy's optimizers (default group)."""
    for optimizer in optimizers:
        optimizer = unwrap(optimizer)
        if isinstance(optimizer, Shampoo) and optimizer._distributor is None:
            shard_optimizer(optimizer, None, communication_dtype)


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
