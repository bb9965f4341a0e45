"""Eigenvalue-corrected Shampoo (SOAP): Adam in the eigenbasis of Shampoo's factors.

Factors accumulate as in Shampoo; every ``precondition_frequency`` steps their eigenvectors are
refreshed (eigh, or warm-started QR). Every step the gradient is rotated into that basis, where a
diagonal second moment (the *corrected eigenvalues*) is kept, Adam-style, and the update is
rotated back. With the identity basis (before the first refresh) this is exactly Adam.

When the basis changes, the second moment is carried into the new one: coordinates with variances
``v`` in the old basis have variances ``(R∘R)·v`` in the new, ``R = Q_newᵀ Q_old`` per dim. That
covers a QR refresh re-sorting columns (``R`` is then a signed permutation) and, above all, the
first switch away from the identity basis, where Adam's per-coordinate moments would otherwise
meet rotated gradients they never saw (it diverged the convergence suite's CNN at a learning rate
AdamW survives). ``rotate_corrected_eigenvalues=False`` leaves the moment in place, as the
reference SOAP does, and then only permutes it with re-sorted columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..linalg import spectrum_stats, stable_pow
from ._dtypes import check_optional_dtype
from .amortized import (
    EigendecompositionConfig,
    EighEigendecompositionConfig,
    QREigendecompositionConfig,
    eigendecompose,
)
from .base import (
    Context,
    Preconditioner,
    PreconditionerConfig,
    RefreshResult,
    accumulate_outer_,
    apply_along_dims,
    commit_,
    eigenbasis_drift,
    ema_,
    identity,
    per_block,
)

__all__ = ["EigenvalueCorrectedShampooPreconditionerConfig", "SOAPPreconditioner"]


@dataclass(frozen=True, kw_only=True)
class EigenvalueCorrectedShampooPreconditionerConfig(PreconditionerConfig):
    """SOAP. ``ignored_basis_change_dims``: ``{order: [dims]}`` kept in the original basis;
    ``inverse_exponent_override``: ``{order: α}`` on the corrected eigenvalues (default ½, Adam);
    ``rotate_corrected_eigenvalues``: carry the second moment into each new basis (below; False:
    leave it in place, as the reference SOAP does, permuting it only when QR re-sorts columns).
    The ``*_dtype`` fields: ``None`` (default) stores that state in the parameter's dtype, at least
    float32 (float64 under ``precision="64-true"``); an explicit dtype is used as given."""

    amortized_computation_config: EigendecompositionConfig = field(
        default_factory=EighEigendecompositionConfig
    )
    ignored_basis_change_dims: Mapping[int, Sequence[int]] = field(default_factory=dict)
    inverse_exponent_override: Mapping[int, float] = field(default_factory=dict)
    factor_matrix_dtype: torch.dtype | None = None
    factor_matrix_eigenvectors_dtype: torch.dtype | None = None
    corrected_eigenvalues_dtype: torch.dtype | None = None
    rotate_corrected_eigenvalues: bool = True

    def __post_init__(self) -> None:
        for name in (
            "factor_matrix_dtype",
            "factor_matrix_eigenvectors_dtype",
            "corrected_eigenvalues_dtype",
        ):
            check_optional_dtype(name, getattr(self, name))
        allowed = EighEigendecompositionConfig | QREigendecompositionConfig
        if not isinstance(self.amortized_computation_config, allowed):
            raise ValueError(
                "amortized_computation_config must be EighEigendecompositionConfig or "
                f"QREigendecompositionConfig, got {type(self.amortized_computation_config).__name__}"
            )
        for order, dims in self.ignored_basis_change_dims.items():
            if order < 0 or any(not 0 <= d < max(order, 1) for d in dims) or len(set(dims)) != len(dims):
                raise ValueError(
                    f"ignored_basis_change_dims[{order}]={list(dims)} is not a set of distinct dims "
                    f"of an order-{order} block"
                )
        for order, alpha in self.inverse_exponent_override.items():
            if order < 0 or not alpha > 0:
                raise ValueError(f"inverse_exponent_override[{order}] must be > 0, got {alpha}")


class SOAPPreconditioner(Preconditioner):
    """SOAP over one bucket."""

    kind = "soap"
    amortized = True

    def __init__(self, config: PreconditionerConfig, block_shape: tuple[int, ...], where: str) -> None:
        super().__init__(config, block_shape, where)
        assert isinstance(config, EigenvalueCorrectedShampooPreconditionerConfig)
        self.cfg = config
        ignored = set(config.ignored_basis_change_dims.get(self.order, ()))
        self.basis_dims = tuple(i for i in range(self.order) if i not in ignored)
        self.exponent = float(config.inverse_exponent_override.get(self.order, 0.5))

    @property
    def factor_dims(self) -> tuple[int, ...]:
        return self.basis_dims

    def init_state(self, n: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        cfg = self.cfg  # a dtype left None is ``dtype``: the parameter's, at least float32
        state: dict[str, Tensor] = {}
        for i in self.basis_dims:
            d = self.block_shape[i]
            state[f"factor.{i}"] = torch.zeros(n, d, d, dtype=cfg.factor_matrix_dtype or dtype, device=device)
            state[f"eigenvectors.{i}"] = identity(
                n, d, dtype=cfg.factor_matrix_eigenvectors_dtype or dtype, device=device
            )
        state["corrected_eigenvalues"] = torch.zeros(
            n, *self.block_shape, dtype=cfg.corrected_eigenvalues_dtype or dtype, device=device
        )
        return state

    def _bases(self, state: dict[str, Tensor]) -> dict[int, Tensor]:
        return {i: state[f"eigenvectors.{i}"] for i in self.basis_dims}

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        for i in self.basis_dims:
            factor = state[f"factor.{i}"]
            accumulate_outer_(factor, grad, i, ctx.beta2, ctx.live)

    def refresh(self, state: dict[str, Tensor], ctx: Context, commit: Tensor) -> RefreshResult:
        bc2 = ctx.bias_correction2
        state.pop("rotated_momentum", None)  # the basis changes: precondition re-rotates its input
        block_failed = torch.zeros_like(commit)
        stats = []
        second = state["corrected_eigenvalues"]
        rotate = self.cfg.rotate_corrected_eigenvalues
        changes: dict[int, Tensor] = {}
        for i in self.basis_dims:
            key = f"eigenvectors.{i}"
            matrix = state[f"factor.{i}"] / bc2
            old = state[key].to(matrix.dtype, copy=rotate)  # commit_ writes state[key] in place
            values, vectors, permutation, failed = eigendecompose(
                matrix, self.cfg.amortized_computation_config, old, warm=ctx.warm
            )
            ok = commit & ~failed
            commit_(state[key], vectors, ok)
            if rotate:  # blocks whose basis stayed put get exactly the identity
                change = (state[key].to(matrix.dtype).mT @ old).square_()
                eye = torch.eye(change.shape[-1], dtype=change.dtype, device=change.device)
                changes[i] = torch.where(per_block(ok, 3), change, eye)
            elif permutation is not None:
                index_shape = [second.shape[0]] + [1] * self.order
                index_shape[i + 1] = self.block_shape[i]
                index = permutation.view(index_shape).expand_as(second)
                commit_(second, second.gather(i + 1, index), ok)
            stats.append(spectrum_stats(values, ctx.block_epsilon()))
            block_failed |= failed & commit
        if changes:
            # Coordinates uncorrelated in the old basis with variances v have variances
            # (R∘R)·v in the new one, R = Q_newᵀ Q_old (per dim; a Kronecker product of squares
            # is the square of the product). Exact for a permutation, so re-sorting needs no
            # special case; without it the first switch away from the identity basis would
            # divide rotated gradients by Adam's per-coordinate moments and can blow up.
            rotated = apply_along_dims(second, changes)
            commit_(second, rotated.clamp_(min=0), commit)
        return RefreshResult(block_failed, tuple(stats))

    def drift(self, state: dict[str, Tensor], ctx: Context) -> Tensor | None:
        """Off-diagonal mass of each factor in the stored eigenbasis (0 while it still diagonalises)."""
        if not self.basis_dims:
            return None
        drifts = [eigenbasis_drift(state[f"factor.{i}"], state[f"eigenvectors.{i}"]) for i in self.basis_dims]
        return torch.stack(drifts).amax(0)

    def update_after_refresh(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        """Second moment of the rotated gradient; and, while the basis stays put, the filtered
        gradient's buffer kept rotated too (rotation is linear, so it follows the same EMA) —
        saving ``precondition`` the two matmuls of rotating its input every step."""
        rotated = apply_along_dims(grad, self._bases(state), transpose=True)
        ema_(state["corrected_eigenvalues"], rotated.square(), ctx.beta2, ctx.live)
        if ctx.beta1 is None:
            state.pop("rotated_momentum", None)  # the input no longer follows that EMA
        elif "rotated_momentum" in state:
            ema_(state["rotated_momentum"], rotated, ctx.beta1, ctx.live)

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        bases = self._bases(state)
        if "rotated_momentum" in state:
            rotated = state["rotated_momentum"] / ctx.bias_correction1
        else:
            rotated = apply_along_dims(grad, bases, transpose=True)
            if ctx.beta1 is not None:
                state["rotated_momentum"] = rotated * ctx.bias_correction1
        second = state["corrected_eigenvalues"] / ctx.bias_correction2
        scaled = rotated / stable_pow(second, self.exponent).add_(ctx.epsilon)
        return apply_along_dims(scaled, bases)
