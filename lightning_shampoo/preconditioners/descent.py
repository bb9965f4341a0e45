"""Steepest descent under non-Euclidean norms: sign descent (ℓ∞) and spectral descent (Muon).

Neither keeps statistics; both act on the (β₁-filtered) gradient of each block. Spectral descent
orthogonalizes 2-D blocks — Newton–Schulz quintic by default, or exact SVD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import Tensor

from .._checks import describe, require_callable, require_choice, require_float, require_int
from ..linalg import NEWTON_SCHULZ_COEFFICIENTS, newton_schulz, svd_orthogonalize
from .base import Context, Preconditioner, PreconditionerConfig, per_block

__all__ = [
    "NewtonSchulzOrthogonalizationConfig",
    "SVDOrthogonalizationConfig",
    "SignDescentPreconditioner",
    "SignDescentPreconditionerConfig",
    "SpectralDescentPreconditioner",
    "SpectralDescentPreconditionerConfig",
]


@dataclass(frozen=True, kw_only=True)
class SignDescentPreconditionerConfig(PreconditionerConfig):
    """``sign(G) · scale_fn(G)``. ``scale_fn`` receives a bucket of blocks ``[n, *block]`` and returns
    a float or per-block ``[n]`` scales (``None``: 1). ℓ∞ steepest descent:
    ``lambda g: g.abs().flatten(1).sum(1)``. Use a named function if the config must be pickled."""

    scale_fn: Callable[[Tensor], float | Tensor] | None = None

    def __post_init__(self) -> None:
        require_callable("scale_fn", self.scale_fn, allow_none=True)


@dataclass(frozen=True, kw_only=True)
class NewtonSchulzOrthogonalizationConfig:
    num_iterations: int = 5
    coefficients: tuple[float, float, float] = NEWTON_SCHULZ_COEFFICIENTS

    def __post_init__(self) -> None:
        require_int("num_iterations", self.num_iterations, low=1)
        c = self.coefficients
        if not (isinstance(c, tuple | list) and len(c) == 3):
            raise ValueError(f"coefficients must be three numbers (a, b, c), got {describe(c)}")
        for i, value in enumerate(c):
            require_float(f"coefficients[{i}]", value)


@dataclass(frozen=True, kw_only=True)
class SVDOrthogonalizationConfig:
    """Exact polar factor via reduced SVD (slower; a reference for Newton–Schulz)."""


@dataclass(frozen=True, kw_only=True)
class SpectralDescentPreconditionerConfig(PreconditionerConfig):
    """Orthogonalized update of 2-D blocks. ``scale``: ``"none"``; ``"shape"`` multiplies by
    ``sqrt(max(1, rows/cols))`` (Muon); ``"rms"`` by ``0.2·sqrt(max(rows, cols))`` (matches AdamW's
    update RMS, so AdamW learning rates carry over)."""

    family: ClassVar[str | None] = "muon"
    min_block_order: ClassVar[int] = 2
    orthogonalization_config: NewtonSchulzOrthogonalizationConfig | SVDOrthogonalizationConfig = field(
        default_factory=NewtonSchulzOrthogonalizationConfig
    )
    scale: Literal["none", "shape", "rms"] = "shape"

    def __post_init__(self) -> None:
        orthogonalization = self.orthogonalization_config
        allowed = NewtonSchulzOrthogonalizationConfig | SVDOrthogonalizationConfig
        if not isinstance(orthogonalization, allowed):
            raise ValueError(
                "orthogonalization_config must be NewtonSchulzOrthogonalizationConfig or "
                f"SVDOrthogonalizationConfig, got {describe(orthogonalization)}"
            )
        require_choice("scale", self.scale, ("none", "shape", "rms"))


class SignDescentPreconditioner(Preconditioner):
    kind = "sign_descent"
    linear = False

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        assert isinstance(self.config, SignDescentPreconditionerConfig)
        direction = grad.sign()
        if self.config.scale_fn is None:
            return direction
        scale = self.config.scale_fn(grad)
        if isinstance(scale, Tensor) and scale.ndim > 0:
            return direction * per_block(scale.to(direction.dtype), direction.ndim)
        return direction * scale


class SpectralDescentPreconditioner(Preconditioner):
    kind = "spectral_descent"
    linear = False

    def __init__(self, config: PreconditionerConfig, block_shape: tuple[int, ...], where: str) -> None:
        super().__init__(config, block_shape, where)
        if self.order != 2:
            raise ValueError(
                f"{where}: SpectralDescentPreconditionerConfig needs 2-D blocks, got {self.order}-D "
                f"blocks of shape {block_shape}; give such parameters another preconditioner_config "
                "in their own param group"
            )
        assert isinstance(config, SpectralDescentPreconditionerConfig)
        rows, cols = block_shape
        self.factor = {
            "none": 1.0,
            "shape": max(1.0, rows / cols) ** 0.5,
            "rms": 0.2 * max(rows, cols) ** 0.5,
        }[config.scale]

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        assert isinstance(self.config, SpectralDescentPreconditionerConfig)
        ortho = self.config.orthogonalization_config
        if isinstance(ortho, SVDOrthogonalizationConfig):
            out = svd_orthogonalize(grad)
        else:
            out = newton_schulz(grad, steps=ortho.num_iterations, coefficients=ortho.coefficients)
        return out * self.factor if self.factor != 1.0 else out
