"""Diagonal preconditioners: SGD (identity), AdaGrad, RMSprop, Adam.

They serve as main preconditioners (for parameters where a Kronecker factorisation does not pay)
and as ``grafting_config``, the per-block step-size reference that Shampoo's direction borrows its
norm from. Field names and semantics follow Distributed Shampoo; the update formulas match
``torch.optim`` so that grafting-only runs reproduce those optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import require_float
from .base import Context, Preconditioner, PreconditionerConfig, ema_

__all__ = [
    "AdaGradPreconditionerConfig",
    "AdamPreconditionerConfig",
    "DiagonalPreconditioner",
    "RMSpropPreconditionerConfig",
    "SGDPreconditionerConfig",
]


@dataclass(frozen=True)
class SGDPreconditionerConfig(PreconditionerConfig):
    """Identity: the (filtered) gradient is the search direction."""


@dataclass(frozen=True, kw_only=True)
class AdaGradPreconditionerConfig(PreconditionerConfig):
    """``g / (sqrt(Σ g²) + epsilon)``, as ``torch.optim.Adagrad``."""

    epsilon: float = 1e-10

    def __post_init__(self) -> None:
        require_float("epsilon", self.epsilon, low=0.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class RMSpropPreconditionerConfig(AdaGradPreconditionerConfig):
    """``g / (sqrt(EMA_β₂ g²) + epsilon)`` without bias correction, as ``torch.optim.RMSprop``."""

    beta2: float = 0.99
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        require_float("beta2", self.beta2, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class AdamPreconditionerConfig(RMSpropPreconditionerConfig):
    """RMSprop with Adam's ``1 - β₂ᵗ`` bias correction; β₁ is the optimizer's ``betas[0]``."""

    beta2: float = 0.999


class DiagonalPreconditioner(Preconditioner):
    """Kernel for the four diagonal configs (SGD keeps no state)."""

    def __init__(self, config: PreconditionerConfig, block_shape: tuple[int, ...], where: str) -> None:
        super().__init__(config, block_shape, where)
        if isinstance(config, AdamPreconditionerConfig):
            self.kind = "adam"
        elif isinstance(config, RMSpropPreconditionerConfig):
            self.kind = "rmsprop"
        elif isinstance(config, AdaGradPreconditionerConfig):
            self.kind = "adagrad"
        else:
            self.kind = "sgd"

    def init_state(self, n: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        if self.kind == "sgd":
            return {}
        return {"second_moment": torch.zeros(n, *self.block_shape, device=device, dtype=dtype)}

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        if self.kind == "sgd":
            return
        beta2 = getattr(self.config, "beta2", 1.0)
        ema_(state["second_moment"], grad * grad, beta2, ctx.live)

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        if self.kind == "sgd":
            return grad
        denom = state["second_moment"].sqrt()  # the only temporary: the rest works in place
        if self.kind == "adam" and ctx.use_bias_correction:
            denom.div_((1.0 - self.config.beta2**ctx.step) ** 0.5)  # type: ignore[attr-defined]
        denom.add_(self.config.epsilon)  # type: ignore[attr-defined]
        return torch.div(grad, denom, out=denom)
