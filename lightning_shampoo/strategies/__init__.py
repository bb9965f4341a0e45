"""Lightning strategies whose ``Shampoo`` optimizers shard their preconditioner blocks across ranks.

Importing this package (``lightning_shampoo`` does) registers ``"shampoo_ddp"``,
``"shampoo_ddp_spawn"`` and ``"shampoo_fsdp"`` in Lightning's strategy registry.
"""

from __future__ import annotations

from lightning.pytorch.strategies import StrategyRegistry

from .ddp import ShampooDDPStrategy
from .fsdp import ShampooFSDPStrategy

__all__ = ["ShampooDDPStrategy", "ShampooFSDPStrategy"]

for _cls in (ShampooDDPStrategy, ShampooFSDPStrategy):
    _cls.register_strategies(StrategyRegistry)
