"""Diagonal preconditioners: SGD (identity), AdaGrad, RMSprop, Adam.

They serve as main preconditioners (for parameters where a Kronecker factorisation does not pay)
and as ``grafting_config``, the per-block step-size reference that Shampoo's direction borrows its
norm from. Field names, defaults and semantics follow Distributed Shampoo (epsilon 1e-10 for all
three; Adam always bias-corrects its second moment, RMSprop never does); the update formulas
match ``torch.optim`` so that grafting-only runs reproduce those optimizers (pass their epsilon,
1e-8 for Adam and RMSprop). ``drop_weighting_factor_on_gsquare`` accumulates ``β₂·v + g²``
without bias correction, as Distributed Shampoo's option of that name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Context, Preconditioner, PreconditionerConfig, ema_, per_block

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
        if not self.epsilon > 0.0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")


@dataclass(frozen=True, kw_only=True)
class RMSpropPreconditionerConfig(AdaGradPreconditionerConfig):
    """``g / (sqrt(EMA_β₂ g²) + epsilon)`` without bias correction, as ``torch.optim.RMSprop``."""

    beta2: float = 0.99
    drop_weighting_factor_on_gsquare: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.beta2 <= 1.0:
            raise ValueError(f"beta2 must be in (0, 1], got {self.beta2}")


@dataclass(frozen=True, kw_only=True)
class AdamPreconditionerConfig(RMSpropPreconditionerConfig):
    """RMSprop with Adam's ``1 - β₂ᵗ`` bias correction, applied whatever the optimizer's
    ``use_bias_correction`` (which governs β₁ and the Kronecker factors), as in Distributed
    Shampoo; β₁ is the optimizer's ``betas[0]``. Without bias correction use RMSprop."""

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
        if getattr(self.config, "drop_weighting_factor_on_gsquare", False) and beta2 < 1.0:
            second = state["second_moment"]
            g = grad.to(second.dtype)  # zero on dead blocks, whose keep factor is 1
            keep = 1.0 - (1.0 - beta2) * ctx.live.to(second.dtype)
            second.mul_(per_block(keep, second.ndim)).addcmul_(g, g)
            return
        ema_(state["second_moment"], grad * grad, beta2, ctx.live)

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        if self.kind == "sgd":
            return grad
        denom = state["second_moment"].sqrt()  # the only temporary: the rest works in place
        if self.kind == "adam" and not self.config.drop_weighting_factor_on_gsquare:  # type: ignore[attr-defined]
            denom.div_((1.0 - self.config.beta2**ctx.step) ** 0.5)  # type: ignore[attr-defined]
        denom.add_(self.config.epsilon)  # type: ignore[attr-defined]
        return torch.div(grad, denom, out=denom)
