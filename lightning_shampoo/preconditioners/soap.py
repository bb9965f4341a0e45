"""Eigenvalue-corrected Shampoo (SOAP): Adam in the eigenbasis of Shampoo's factors.

Factors accumulate as in Shampoo; every ``precondition_frequency`` steps their eigenvectors are
refreshed (eigh, or warm-started QR). Every step the gradient is rotated into that basis, where a
diagonal second moment (the *corrected eigenvalues*) is kept, Adam-style, and the update is
rotated back. With the identity basis (before the first refresh) this is exactly Adam.

When the basis changes, Distributed Shampoo (and the reference SOAP) leave the second moment
where it is: the default here too. ``rotate_corrected_eigenvalues=True`` (the ``soap`` preset's
choice) carries it into the new basis instead: coordinates with variances ``v`` in the old basis
have variances ``(R∘R)·v`` in the new, ``R = Q_newᵀ Q_old`` per dim. That covers a QR refresh
re-sorting columns (``R`` is then a signed permutation) and, above all, the first switch away
from the identity basis, where Adam's per-coordinate moments would otherwise meet rotated
gradients they never saw (it diverged the convergence suite's CNN at a learning rate AdamW
survives). Without rotation, a reference-SOAP QR refresh (``reference_soap=True``) permutes the
moment with the columns it re-sorts; Distributed Shampoo's QR refresh does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import describe, require_bool, require_int
from ..linalg import spectrum_stats, stable_pow
from ._dtypes import check_optional_dtype
from .amortized import (
    EigendecompositionConfig,
    EighEigendecompositionConfig,
    QREigendecompositionConfig,
    TraceScalingOptions,
    eigendecompose,
    trace_scale,
)
from .base import (
    Context,
    Preconditioner,
    PreconditionerConfig,
    RefreshResult,
    StateSpec,
    accumulate_factors_many,
    apply_along_dims,
    as_dtype,
    commit_,
    decay_,
    eigenbasis_drift,
    full_matrix,
    per_block,
)
from .shampoo import check_exponent_override, is_dim

__all__ = ["EigenvalueCorrectedShampooPreconditionerConfig", "SOAPPreconditioner"]


@dataclass(frozen=True, kw_only=True)
class EigenvalueCorrectedShampooPreconditionerConfig(PreconditionerConfig, TraceScalingOptions):
    """SOAP. ``ignored_basis_change_dims``: ``{order: [dims]}`` kept in the original basis;
    ``inverse_exponent_override``: ``{order: α}`` on the corrected eigenvalues (default ½, Adam);
    ``rotate_corrected_eigenvalues``: carry the second moment into each new basis (module
    docstring; default False: leave it in place, as Distributed Shampoo and the reference SOAP
    do); ``use_trace_scaling``: see ``TraceScalingOptions`` (it only moves the QR damping).
    The ``*_dtype`` fields: ``None`` (default) stores that state in the parameter's dtype, at least
    float32 (float64 under ``precision="64-true"``); an explicit dtype is used as given."""

    family: ClassVar[str | None] = "soap"
    kronecker: ClassVar[bool] = True
    amortized_computation_config: EigendecompositionConfig = field(
        default_factory=EighEigendecompositionConfig
    )
    ignored_basis_change_dims: Mapping[int, Sequence[int]] = field(default_factory=dict)
    inverse_exponent_override: Mapping[int, float] = field(default_factory=dict)
    factor_matrix_dtype: torch.dtype | None = None
    factor_matrix_eigenvectors_dtype: torch.dtype | None = None
    corrected_eigenvalues_dtype: torch.dtype | None = None
    rotate_corrected_eigenvalues: bool = False
    use_symmetric_packing: bool = True  # factors stored as their upper triangle (Distributed Shampoo's)

    def __post_init__(self) -> None:
        super().__post_init__()
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
        ignored = self.ignored_basis_change_dims
        if not isinstance(ignored, Mapping):
            raise ValueError(
                f"ignored_basis_change_dims must be a mapping {{order: [dims]}}, got {describe(ignored)}"
            )
        for order, dims in ignored.items():
            require_int("ignored_basis_change_dims keys (tensor orders)", order, low=0)
            if not (
                isinstance(dims, Sequence)
                and not isinstance(dims, str)
                and all(is_dim(d, order) for d in dims)
                and len(set(dims)) == len(dims)
            ):
                raise ValueError(
                    f"ignored_basis_change_dims[{order}]={dims!r} is not a set of distinct dims "
                    f"of an order-{order} block"
                )
        check_exponent_override(self.inverse_exponent_override, per_dim=False, positive=True)
        require_bool("rotate_corrected_eigenvalues", self.rotate_corrected_eigenvalues)
        require_bool("use_symmetric_packing", self.use_symmetric_packing)


class SOAPPreconditioner(Preconditioner):
    """SOAP over one bucket. It keeps the β₁-filtered gradient itself, in the eigenbasis
    (``rotated_momentum``): rotation is linear, so the EMA of rotated gradients is the rotated EMA,
    and the plain step rotates each gradient once (into the basis) and each update once (back),
    four matmuls, with no copy of the filtered gradient in the parameter's basis. At a refresh the
    buffer is carried into the new basis exactly (``R = Q_newᵀ Q_old`` per dim)."""

    kind = "soap"
    amortized = True
    keeps_first_moment = True

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

    def state_schema(self, dtype: torch.dtype, options: Mapping[str, Any]) -> dict[str, StateSpec]:
        cfg = self.cfg  # a dtype left None is ``dtype``: the parameter's, at least float32
        schema: dict[str, StateSpec] = {}
        for i in self.basis_dims:
            d = self.block_shape[i]
            symmetric = (d * (d + 1) // 2,) if cfg.use_symmetric_packing else (d, d)
            schema[f"factor.{i}"] = StateSpec(symmetric, cfg.factor_matrix_dtype or dtype)
            schema[f"eigenvectors.{i}"] = StateSpec(
                (d, d), cfg.factor_matrix_eigenvectors_dtype or dtype, "identity"
            )
        schema["corrected_eigenvalues"] = StateSpec(
            self.block_shape, cfg.corrected_eigenvalues_dtype or dtype
        )
        if options["betas"][0] > 0.0:
            schema["rotated_momentum"] = StateSpec(self.block_shape, dtype)
        return schema

    def _bases(self, state: dict[str, Tensor]) -> dict[int, Tensor]:
        return {i: state[f"eigenvectors.{i}"] for i in self.basis_dims}

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        accumulate_factors_many([(self.basis_dims, state, grad, ctx)])

    @classmethod
    def update_many(cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context]]) -> None:
        accumulate_factors_many([(k.factor_dims, s, g, c) for k, s, g, c in jobs])

    def refresh(self, state: dict[str, Tensor], ctx: Context, commit: Tensor) -> RefreshResult:
        bc2 = per_block(ctx.bias_correction2, 3)
        block_failed = torch.zeros_like(commit)
        stats = []
        second = state["corrected_eigenvalues"]
        momentum = state.get("rotated_momentum")
        rotate = self.cfg.rotate_corrected_eigenvalues
        changes: dict[int, Tensor] = {}
        basis_changes: dict[int, Tensor] = {}
        eps = ctx.block_epsilon(self.cfg.factor_matrix_dtype)
        for i in self.basis_dims:
            key = f"eigenvectors.{i}"
            factor = full_matrix(state[f"factor.{i}"], self.block_shape[i], None, None)
            matrix = factor / bc2.to(factor.dtype)
            if self.cfg.use_trace_scaling:
                matrix = trace_scale(matrix, self.cfg.trace_scaling_exponent, eps)
            old = state[key].to(matrix.dtype, copy=True)  # commit_ writes state[key] in place
            values, vectors, permutation, failed = eigendecompose(
                matrix, self.cfg.amortized_computation_config, old, warm=ctx.warm, epsilon=eps
            )
            ok = commit & ~failed
            commit_(state[key], vectors, ok)
            change = state[key].to(matrix.dtype).mT @ old  # R = Q_newᵀ Q_old; exactly I where kept
            eye = torch.eye(change.shape[-1], dtype=change.dtype, device=change.device)
            change = torch.where(per_block(ok, 3), change, eye)
            basis_changes[i] = change
            if rotate:
                changes[i] = change.square()
            elif permutation is not None:
                index_shape = [second.shape[0]] + [1] * self.order
                index_shape[i + 1] = self.block_shape[i]
                index = permutation.view(index_shape).expand_as(second)
                commit_(second, second.gather(i + 1, index), ok)
            stats.append(spectrum_stats(values, eps))
            block_failed |= failed & commit
        if changes:
            # Coordinates uncorrelated in the old basis with variances v have variances
            # (R∘R)·v in the new one, R = Q_newᵀ Q_old (per dim; a Kronecker product of squares
            # is the square of the product). Exact for a permutation, so re-sorting needs no
            # special case; without it the first switch away from the identity basis would
            # divide rotated gradients by Adam's per-coordinate moments and can blow up.
            rotated = apply_along_dims(second, changes)
            commit_(second, rotated.clamp_(min=0), commit)
        if momentum is not None:  # the first moment is a vector: it changes basis exactly
            commit_(momentum, apply_along_dims(momentum, basis_changes), commit)
        return RefreshResult(block_failed, tuple(stats))

    def drift(self, state: dict[str, Tensor], ctx: Context) -> Tensor | None:
        """Off-diagonal mass of each factor in the stored eigenbasis (0 while it still diagonalises)."""
        if not self.basis_dims:
            return None
        drifts = [
            eigenbasis_drift(
                full_matrix(state[f"factor.{i}"], self.block_shape[i], None, None), state[f"eigenvectors.{i}"]
            )
            for i in self.basis_dims
        ]
        return torch.stack(drifts).amax(0)

    def _rotate_into(
        self, x: Tensor, state: dict[str, Tensor], ctx: Context, out: Tensor, scratch: Tensor, *, back: bool
    ) -> None:
        """``out ← x`` expressed in (``back=False``) or taken out of (``back=True``) the
        eigenbasis; ``scratch`` may equal ``x`` only when ``out`` does not. Transposed bases are
        views made once per context."""
        bases = self._bases(state)
        left, right = bases.get(0), bases.get(1)
        if x.ndim == 3 and left is not None and right is not None and left.dtype == x.dtype == right.dtype:
            if back:
                torch.matmul(left, x, out=scratch)
                torch.matmul(scratch, ctx.view(("basisT", 1), lambda: right.mT), out=out)
            else:
                torch.matmul(ctx.view(("basisT", 0), lambda: left.mT), x, out=scratch)
                torch.matmul(scratch, right, out=out)
            return
        single = left if right is None else (right if left is None else None)
        if x.ndim == 3 and single is not None and single.dtype == x.dtype:
            # One-sided (a dim left in the original basis, ``factoring.py``): one matmul.
            target = scratch if out.data_ptr() == x.data_ptr() else out
            if left is not None:
                matrix = left if back else ctx.view(("basisT", 0), lambda: left.mT)
                torch.matmul(matrix, x, out=target)
            else:
                assert right is not None
                matrix = ctx.view(("basisT", 1), lambda: right.mT) if back else right
                torch.matmul(x, matrix, out=target)
            if target is not out:
                out.copy_(target)
            return
        out.copy_(apply_along_dims(x, bases, transpose=not back))

    def update_after_refresh(
        self, state: dict[str, Tensor], grad: Tensor, ctx: Context, scratch: Tensor | None = None
    ) -> None:
        scratch = torch.empty_like(grad) if scratch is None else scratch
        self.update_after_refresh_many([(self, state, grad, ctx, scratch)])

    @classmethod
    def update_after_refresh_many(
        cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context, Tensor]]
    ) -> None:
        """Rotate each gradient into its eigenbasis (in place: ``grad`` is the optimizer's
        buffer), then update the second moments and the rotated first moments there — one
        foreach call per operation for all buckets. With β₃ ≠ β₁ the current step's filtered
        value (``lerp(m, g, 1-β₃)``) is left in ``grad``."""
        for kernel, state, grad, ctx, scratch in jobs:
            assert isinstance(kernel, SOAPPreconditioner)
            kernel._rotate_into(grad, state, ctx, grad, scratch, back=False)
        decayed = [(s["corrected_eigenvalues"], c) for _, s, _, c, _ in jobs if c.ema2.beta != 1.0]
        decay_([(v, c.ema2.shaped("keep", v.ndim)) for v, c in decayed])
        seconds = [s["corrected_eigenvalues"] for _, s, _, _, _ in jobs]
        grads = [g for _, _, g, _, _ in jobs]
        if seconds:
            weights = [1.0 if c.ema2.beta == 1.0 else 1.0 - c.ema2.beta for _, _, _, c, _ in jobs]
            torch._foreach_addcmul_(seconds, grads, grads, weights)
        plain = [
            (s["rotated_momentum"], g, c)
            for _, s, g, c, _ in jobs
            if "rotated_momentum" in s and c.beta1 is not None
        ]
        if plain:
            torch._foreach_lerp_(
                [m for m, _, _ in plain],
                [g for _, g, _ in plain],
                [c.ema1.shaped("weight", g.ndim) for _, g, c in plain],
            )
        for _, state, grad, ctx, scratch in jobs:
            momentum = state.get("rotated_momentum")
            if momentum is None or ctx.beta1 is not None:
                continue
            weight = per_block(ctx.live, grad.ndim) * (1.0 - ctx.beta3)
            torch.lerp(momentum, grad, as_dtype(weight, grad.dtype), out=scratch)
            momentum.lerp_(grad, ctx.ema1.shaped("weight", grad.ndim))
            grad.copy_(scratch)

    def _current(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        momentum = state.get("rotated_momentum")
        return grad if momentum is None or ctx.beta1 is None else momentum

    def precondition_into(
        self, state: dict[str, Tensor], grad: Tensor, ctx: Context, out: Tensor, scratch: Tensor
    ) -> None:
        self.precondition_many([(self, state, grad, ctx, out, scratch)])

    @classmethod
    def precondition_many(
        cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context, Tensor, Tensor]]
    ) -> None:
        """``Q (m̃ / (v̂^α + ε)) Qᵀ`` for each bucket's rotated first moment ``m̃`` (unnormalised by
        β₁'s bias correction, which the optimizer applies); the elementwise part is one foreach
        call per operation for all buckets. Clobbers ``grad`` (the rotated gradient)."""
        kernels = [k for k, *_ in jobs]
        assert all(isinstance(k, SOAPPreconditioner) for k in kernels)
        scratches = [x for *_, x in jobs]
        torch._foreach_copy_(scratches, [s["corrected_eigenvalues"] for _, s, *_ in jobs])
        torch._foreach_div_(scratches, [c.ema2.shaped("correction", x.ndim) for _, _, _, c, _, x in jobs])
        roots = [x for k, *_, x in jobs if k.exponent == 0.5]  # type: ignore[attr-defined]
        if roots:
            torch._foreach_sqrt_(roots)
        for kernel, *_, scratch in jobs:  # stable_pow: the same value for an element wherever it sits
            if kernel.exponent != 0.5:  # type: ignore[attr-defined]
                scratch.copy_(stable_pow(scratch.clamp_min_(0.0), kernel.exponent))  # type: ignore[attr-defined]
        torch._foreach_add_(scratches, [c.epsilon for _, _, _, c, _, _ in jobs])
        torch._foreach_reciprocal_(scratches)
        torch._foreach_mul_(scratches, [k._current(s, g, c) for k, s, g, c, _, _ in jobs])  # type: ignore[attr-defined]
        for kernel, state, grad, ctx, out, scratch in jobs:
            kernel._rotate_into(scratch, state, ctx, out, grad, back=True)  # type: ignore[attr-defined]

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        """The SOAP direction of a gradient ``grad`` given in the parameter's basis (a pure
        function of the state; the optimizer's step uses ``precondition_many`` on the kept
        rotated moment instead)."""
        bases = self._bases(state)
        rotated = apply_along_dims(grad, bases, transpose=True)
        second = state["corrected_eigenvalues"] / per_block(ctx.bias_correction2, grad.ndim).to(grad.dtype)
        scaled = rotated / stable_pow(second.clamp_min(0.0), self.exponent).add_(ctx.epsilon)
        return apply_along_dims(scaled, bases)

    def adopt_legacy(self, entries: dict[str, Tensor]) -> None:
        """Earlier versions kept the filtered gradient in the parameter's basis (and the rotated
        copy only between refreshes): rotate it into the saved basis."""
        moment = entries.get("moments.filtered_grad")
        keys = [f"precond.eigenvectors.{i}" for i in self.basis_dims]
        if "precond.rotated_momentum" in entries or moment is None or not all(k in entries for k in keys):
            return
        bases = {i: entries[f"precond.eigenvectors.{i}"][None] for i in self.basis_dims}
        entries["precond.rotated_momentum"] = apply_along_dims(moment[None], bases, transpose=True)[0]

    def first_moment_into(
        self, state: dict[str, Tensor], grad: Tensor, ctx: Context, out: Tensor, scratch: Tensor
    ) -> None:
        """This step's unnormalised filtered gradient, rotated back into the parameter's basis."""
        self._rotate_into(self._current(state, grad, ctx), state, ctx, out, scratch, back=True)
