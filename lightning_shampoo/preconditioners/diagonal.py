"""Diagonal preconditioners: SGD (identity), AdaGrad, RMSprop, Adam.

They serve as main preconditioners (for parameters where a Kronecker factorisation does not pay)
and as ``grafting_config``, the per-block step-size reference that Shampoo's direction borrows its
norm from. Field names, defaults and semantics follow Distributed Shampoo (epsilon 1e-10 for all
three; Adam always bias-corrects its second moment, RMSprop never does); the update formulas
match ``torch.optim`` so that grafting-only runs reproduce those optimizers (pass their epsilon,
1e-8 for Adam and RMSprop). ``drop_weighting_factor_on_gsquare`` accumulates ``β₂·v + g²``
without bias correction, as Distributed Shampoo's option of that name. Their work is
elementwise, so the ``*_many`` methods serve every bucket of the step with one
``torch._foreach_*`` call per operation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import require_bool, require_float
from .base import Context, Preconditioner, PreconditionerConfig, StateSpec, decay_

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

    diagonal: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class AdaGradPreconditionerConfig(PreconditionerConfig):
    """``g / (sqrt(Σ g²) + epsilon)``, as ``torch.optim.Adagrad``."""

    diagonal: ClassVar[bool] = True
    epsilon: float = 1e-10

    def __post_init__(self) -> None:
        require_float("epsilon", self.epsilon, low=0.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class RMSpropPreconditionerConfig(AdaGradPreconditionerConfig):
    """``g / (sqrt(EMA_β₂ g²) + epsilon)`` without bias correction, as ``torch.optim.RMSprop``."""

    beta2: float = 0.99
    drop_weighting_factor_on_gsquare: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_float("beta2", self.beta2, low=0.0, high=1.0, low_open=True)
        require_bool("drop_weighting_factor_on_gsquare", self.drop_weighting_factor_on_gsquare)


@dataclass(frozen=True, kw_only=True)
class AdamPreconditionerConfig(RMSpropPreconditionerConfig):
    """RMSprop with Adam's ``1 - β₂ᵗ`` bias correction, applied whatever the optimizer's
    ``use_bias_correction`` (which governs β₁ and the Kronecker factors), as in Distributed
    Shampoo; β₁ is the optimizer's ``betas[0]``. Without bias correction use RMSprop."""

    family: ClassVar[str | None] = "adam"
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
        #: The second moment's EMA factor (1: a sum, AdaGrad) and its additive damping.
        self.beta2: float = getattr(config, "beta2", 1.0)
        self.epsilon: float = getattr(config, "epsilon", 0.0)
        #: ``v ← β₂·v + g²`` (Distributed Shampoo's ``drop_weighting_factor_on_gsquare``).
        self.unweighted: bool = getattr(config, "drop_weighting_factor_on_gsquare", False)

    def bias_corrected(self, use_bias_correction: bool) -> bool:
        """Whether the second moment is divided by ``1 - β₂ᵗ``: Adam's always (as Distributed
        Shampoo, whatever the optimizer's ``use_bias_correction``), unless unweighted."""
        return self.kind == "adam" and not self.unweighted

    def state_schema(self, dtype: torch.dtype, options: Mapping[str, Any]) -> dict[str, StateSpec]:
        if self.kind == "sgd":
            return {}
        return {"second_moment": StateSpec(self.block_shape, dtype)}

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        self.update_many([(self, state, grad, ctx)])

    @classmethod
    def update_many(cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context]]) -> None:
        """``v ← β₂·v + (1-β₂)·g²`` (AdaGrad: ``v += g²``) on live blocks, for every bucket at once."""
        stateful = [
            (k, s["second_moment"], g, c)
            for k, s, g, c in jobs
            if isinstance(k, DiagonalPreconditioner) and k.kind != "sgd"
        ]
        decay_([(v, c.diagonal.shaped("keep", v.ndim)) for k, v, _, c in stateful if k.beta2 != 1.0])
        if stateful:
            weights = [1.0 if k.beta2 == 1.0 or k.unweighted else 1.0 - k.beta2 for k, _, _, _ in stateful]
            grads = [g for _, _, g, _ in stateful]
            torch._foreach_addcmul_([v for _, v, _, _ in stateful], grads, grads, weights)

    @staticmethod
    def denominators_into(
        jobs: Sequence[tuple[DiagonalPreconditioner, dict[str, Tensor], Context, Tensor]],
    ) -> None:
        """``out ← sqrt(v) / sqrt(1 - β₂ᵗ) + ε`` (torch's Adam/RMSprop/Adagrad denominator) for
        every stateful bucket at once; SGD buckets are skipped."""
        jobs = [j for j in jobs if j[0].kind != "sgd"]
        if not jobs:
            return
        outs = [out for _, _, _, out in jobs]
        torch._foreach_copy_(outs, [s["second_moment"] for _, s, _, _ in jobs])
        torch._foreach_sqrt_(outs)
        corrected = [
            (out, c.diagonal.shaped("root", out.ndim))
            for k, _, c, out in jobs
            if k.bias_corrected(c.use_bias_correction) and c.diagonal.root is not None
        ]
        if corrected:
            torch._foreach_div_([o for o, _ in corrected], [r for _, r in corrected])
        torch._foreach_add_(outs, [k.epsilon for k, _, _, _ in jobs])

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        if self.kind == "sgd":
            return grad
        denom = torch.empty_like(grad)
        self.denominators_into([(self, state, ctx, denom)])
        return torch.div(grad, denom, out=denom)
