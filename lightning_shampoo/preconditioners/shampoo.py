"""Shampoo: Kronecker-factored preconditioners ``P = G ×₁ L₁^(-α₁) ×₂ L₂^(-α₂) …`` per block.

Factors accumulate ``Lᵢ ← β₂ Lᵢ + (1-β₂) G₍ᵢ₎ G₍ᵢ₎ᵀ`` (a plain sum when β₂ = 1) every step; inverse
roots are refreshed every ``precondition_frequency`` steps. Three variants share the loop:

* root-inverse: the root is computed (eigh or coupled Newton) and cached;
* eigendecomposed: eigenvectors/eigenvalues are kept (eigh, or QR warm start) and the root cached;
* KL-Shampoo: factors see the gradient preconditioned by the other factors first, through the
  ``transform_grad_for_outer_product`` hook — ``Lᵢ ← β₂Lᵢ + (1-β₂)/dᵢ' · G (⊗ⱼ≠ᵢ Lⱼ⁻¹) Gᵀ`` — with
  default exponent ½ per factor, optionally with per-factor eigenvalue correction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import describe, require_bool, require_float, require_int
from ..linalg import (
    SpectrumStats,
    coupled_newton_inverse_root,
    finite_matrices,
    inverse_root_from_eigh,
    safe_eigh,
    scaled_epsilon,
    spectral_norm_lower_bound,
    spectrum_stats,
)
from ._dtypes import check_optional_dtype
from .amortized import (
    CoupledNewtonConfig,
    EigenConfig,
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
    accumulate_outer_,
    apply_along_dims,
    commit_,
    eigenbasis_drift,
    ema_,
    full_matrix,
    per_block,
    precondition_kronecker_into,
    relative_change,
    resolve_exponent,
    store_symmetric_,
)
from .diagonal_factors import accumulate_diagonals_, apply_diagonals_, diagonal_schema, refresh_diagonals

__all__ = [
    "EigendecomposedShampooPreconditionerConfig",
    "KLShampooPreconditioner",
    "KLShampooPreconditionerConfig",
    "RootInvShampooPreconditionerConfig",
    "ShampooPreconditioner",
]


def _damping(ctx: Context, largest: Tensor, epsilon_rtol: float) -> Tensor | float:
    """A refresh's damping per block, ``s·(ε + ε_rtol·λ_max)`` (``s``: the block's retry
    multiplier), formed in ``largest``'s dtype (a float32 product would round a float64 ε).
    ``ε_rtol = 0``: exactly ``ctx.block_epsilon``."""
    eps = scaled_epsilon(largest, ctx.epsilon, epsilon_rtol)
    return eps if ctx.epsilon_scale is None else eps * ctx.epsilon_scale.to(largest.dtype)


def is_dim(value: Any, order: int) -> bool:
    """Whether ``value`` is a dim of an ``order``-D block (0-D blocks have dim 0)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < max(order, 1)


def check_dims_map(name: str, value: Any) -> None:
    """``{order: [distinct dims of that order]}`` (``ignored_basis_change_dims``, ``diagonal_dims``)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping {{order: [dims]}}, got {describe(value)}")
    for order, dims in value.items():
        require_int(f"{name} keys (tensor orders)", order, low=0)
        if not (
            isinstance(dims, Sequence)
            and not isinstance(dims, str)
            and all(is_dim(d, order) for d in dims)
            and len(set(dims)) == len(dims)
        ):
            raise ValueError(
                f"{name}[{order}]={dims!r} is not a set of distinct dims of an order-{order} block"
            )


def check_exponent_override(override: Any, *, per_dim: bool = True, positive: bool = False) -> None:
    """``inverse_exponent_override``: a mapping ``{order: α}`` (``per_dim``: or ``{order: {dim: α}}``)
    with int orders >= 0, dims of that order and finite exponents (>= 0, or > 0 if ``positive``)."""
    name = "inverse_exponent_override"
    if not isinstance(override, Mapping):
        raise ValueError(f"{name} must be a mapping {{order: exponent}}, got {describe(override)}")
    for order, value in override.items():
        require_int(f"{name} keys (tensor orders)", order, low=0)
        values = value.items() if per_dim and isinstance(value, Mapping) else [(None, value)]
        for dim, exponent in values:
            where = f"{name}[{order}]" + ("" if dim is None else f"[{dim!r}]")
            if dim is not None and not is_dim(dim, order):
                raise ValueError(f"{name}[{order}] names a dim outside [0, {max(order, 1)}): {dim!r}")
            require_float(where, exponent, low=0.0, low_open=positive)


@dataclass(frozen=True, kw_only=True)
class _ShampooFamilyConfig(PreconditionerConfig, TraceScalingOptions):
    """``inverse_exponent_override``: ``{order: α | {dim: α}}``; α = 0 leaves a dim unpreconditioned.
    ``use_trace_scaling`` / ``trace_scaling_exponent``: see ``TraceScalingOptions``.

    The ``*_dtype`` fields: storage of each state tensor; ``None`` (default) is the parameter's
    dtype, at least float32 — float32 for float32, bfloat16 and float16 parameters, as
    Distributed Shampoo's explicit float32 defaults, and float64 for float64 parameters
    (``precision="64-true"``), where float32 state would throw the precision away. An explicit
    dtype is used as given, as in Distributed Shampoo.

    ``diagonal_dims``: ``{order: [dims]}`` whose factor is kept as its diagonal only (``d``
    numbers, not ``d²``; ``diagonal_factors.py``), with the exponent the full factor would have.
    The presets' ``max_factor_ratio`` rule puts oversized dims here (``factoring.py``).

    ``use_symmetric_packing`` (Distributed Shampoo's, on by default there and here): factors and
    cached roots, being symmetric, are stored as their upper triangle (``d(d+1)/2`` numbers
    instead of ``d²``: half their memory); each step then rebuilds the full matrices it uses in
    shared buffers (one ``index_select`` per root, and per factor update one more op).
    """

    kronecker: ClassVar[bool] = True
    inverse_exponent_override: Mapping[int, float | Mapping[int, float]] = field(default_factory=dict)
    factor_matrix_dtype: torch.dtype | None = None
    use_symmetric_packing: bool = True
    diagonal_dims: Mapping[int, Sequence[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_exponent_override(self.inverse_exponent_override)
        check_dims_map("diagonal_dims", self.diagonal_dims)
        check_optional_dtype("factor_matrix_dtype", self.factor_matrix_dtype)
        require_bool("use_symmetric_packing", self.use_symmetric_packing)


@dataclass(frozen=True, kw_only=True)
class RootInvShampooPreconditionerConfig(_ShampooFamilyConfig):
    """Classic Shampoo caching ``Lᵢ^(-αᵢ)``; default ``αᵢ = 1/(2·order)``."""

    family: ClassVar[str | None] = "shampoo"
    amortized_computation_config: EigenConfig | CoupledNewtonConfig = field(default_factory=EigenConfig)
    inv_factor_matrix_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_dtype("inv_factor_matrix_dtype", self.inv_factor_matrix_dtype)
        if not isinstance(self.amortized_computation_config, EigenConfig | CoupledNewtonConfig):
            raise ValueError(
                "amortized_computation_config must be EigenConfig or CoupledNewtonConfig, "
                f"got {type(self.amortized_computation_config).__name__}"
            )


@dataclass(frozen=True, kw_only=True)
class EigendecomposedShampooPreconditionerConfig(_ShampooFamilyConfig):
    """Shampoo keeping each factor's eigendecomposition (eigh, or QR warm start)."""

    family: ClassVar[str | None] = "eigen"
    amortized_computation_config: EigendecompositionConfig = field(
        default_factory=EighEigendecompositionConfig
    )
    factor_matrix_eigenvectors_dtype: torch.dtype | None = None
    factor_matrix_eigenvalues_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_dtype("factor_matrix_eigenvectors_dtype", self.factor_matrix_eigenvectors_dtype)
        check_optional_dtype("factor_matrix_eigenvalues_dtype", self.factor_matrix_eigenvalues_dtype)
        allowed = EighEigendecompositionConfig | QREigendecompositionConfig
        if not isinstance(self.amortized_computation_config, allowed):
            raise ValueError(
                "amortized_computation_config must be EighEigendecompositionConfig or "
                f"QREigendecompositionConfig, got {type(self.amortized_computation_config).__name__}"
            )


@dataclass(frozen=True, kw_only=True)
class KLShampooPreconditionerConfig(EigendecomposedShampooPreconditionerConfig):
    """KL-Shampoo (default exponent ½ per factor). ``eigenvalue_correction`` re-estimates each
    factor's eigenvalues every step in its last eigenbasis (cheap, diagonal) between refreshes."""

    eigenvalue_correction: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_bool("eigenvalue_correction", self.eigenvalue_correction)
        if self.eigenvalue_correction and self.use_trace_scaling:
            raise ValueError(
                "use_trace_scaling is not supported with eigenvalue_correction=True: the corrected "
                "eigenvalues are re-estimated every step from unscaled statistics"
            )


class ShampooPreconditioner(Preconditioner):
    """Root-inverse and eigendecomposed Shampoo over one bucket."""

    amortized = True
    default_exponent_scale = 0.5  # α = scale / order

    def __init__(self, config: PreconditionerConfig, block_shape: tuple[int, ...], where: str) -> None:
        super().__init__(config, block_shape, where)
        assert isinstance(config, _ShampooFamilyConfig)
        self.kind = (
            "shampoo_eigen"
            if isinstance(config, EigendecomposedShampooPreconditionerConfig)
            else ("shampoo_root_inv")
        )
        default = self.default_exponent(self.order)
        exponents = {
            i: resolve_exponent(config.inverse_exponent_override, self.order, i, default)
            for i in range(self.order)
        }
        diagonal = set(config.diagonal_dims.get(self.order, ()))
        self.diagonal = {i: a for i, a in exponents.items() if a > 0.0 and i in diagonal}
        self.exponents = {i: a for i, a in exponents.items() if a > 0.0 and i not in diagonal}
        amortized = getattr(config, "amortized_computation_config", None)
        if isinstance(amortized, CoupledNewtonConfig):
            for i, a in self.exponents.items():
                if abs(1.0 / a - round(1.0 / a)) > 1e-9:
                    raise ValueError(
                        f"{where}: CoupledNewtonConfig needs an integer root, but dim {i} of a "
                        f"{self.order}-D block has exponent {a} (root {1.0 / a}); use EigenConfig"
                    )
        self.eigendecomposed = isinstance(config, EigendecomposedShampooPreconditionerConfig)
        self.packed = config.use_symmetric_packing

    def default_exponent(self, order: int) -> float:
        return self.default_exponent_scale / max(order, 1)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        return tuple(self.exponents)

    def _dtypes(self) -> tuple[torch.dtype | None, torch.dtype | None]:
        cfg = self.config
        if isinstance(cfg, EigendecomposedShampooPreconditionerConfig):
            return cfg.factor_matrix_eigenvectors_dtype, cfg.factor_matrix_eigenvalues_dtype
        assert isinstance(cfg, RootInvShampooPreconditionerConfig)
        return cfg.inv_factor_matrix_dtype, cfg.inv_factor_matrix_dtype

    def state_schema(self, dtype: torch.dtype, options: Mapping[str, Any]) -> dict[str, StateSpec]:
        assert isinstance(self.config, _ShampooFamilyConfig)
        fdtype = self.config.factor_matrix_dtype or dtype  # ``dtype``: the parameter's, >= float32
        vdtype, edtype = (d or dtype for d in self._dtypes())
        schema: dict[str, StateSpec] = {}
        for i in self.factor_dims:
            d = self.block_shape[i]
            symmetric = (d * (d + 1) // 2,) if self.packed else (d, d)
            schema[f"factor.{i}"] = StateSpec(symmetric, fdtype)
            schema[f"root.{i}"] = StateSpec(symmetric, vdtype, "identity")
            if self.eigendecomposed:
                schema[f"eigenvectors.{i}"] = StateSpec((d, d), vdtype, "identity")
                schema[f"eigenvalues.{i}"] = StateSpec((d,), edtype)
            elif options.get("refresh_tolerance") is not None:  # drift() compares with it
                schema[f"reference.{i}"] = StateSpec(symmetric, fdtype)
        return {**schema, **diagonal_schema(self.block_shape, self.diagonal, fdtype, vdtype)}

    def full(self, state: dict[str, Tensor], name: str, ctx: Context | None = None) -> Tensor:
        """The symmetric state ``name`` (``factor.i``, ``root.i``, ``reference.i``) as ``[n, d, d]``:
        with a context, packed storage is unpacked into a shared buffer (the plain step)."""
        i = int(name.rsplit(".", 1)[1])
        return full_matrix(state[name], self.block_shape[i], ctx, name)

    def transform_grad_for_outer_product(
        self, state: dict[str, Tensor], grad: Tensor, dim: int, ctx: Context
    ) -> Tensor:
        """What factor ``dim`` accumulates the outer product of; classic Shampoo: the gradient."""
        return grad

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        for i in self.factor_dims:
            factor = state[f"factor.{i}"]
            x = self.transform_grad_for_outer_product(state, grad, i, ctx).to(factor.dtype)
            accumulate_outer_(factor, x, i, ctx.ema2, ctx)
        accumulate_diagonals_(state, grad, self.diagonal, ctx)

    @classmethod
    def update_many(cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context]]) -> None:
        """Classic Shampoo's factor EMAs for every bucket: one ``_foreach_mul_`` decays all
        factors, then one ``baddbmm`` per factor adds ``(1-β₂)·GGᵀ``."""
        plain = [(k.factor_dims, s, g, c) for k, s, g, c in jobs if type(k) is ShampooPreconditioner]
        for kernel, state, grad, ctx in jobs:
            if type(kernel) is not ShampooPreconditioner:  # KL-Shampoo transforms G per factor
                kernel.update(state, grad, ctx)
        accumulate_factors_many(plain)
        for kernel, state, grad, ctx in jobs:
            if type(kernel) is ShampooPreconditioner and kernel.diagonal:
                accumulate_diagonals_(state, grad, kernel.diagonal, ctx)

    def _eigen_refresh(
        self, state: dict[str, Tensor], i: int, matrix: Tensor, ctx: Context, eps: float | Tensor
    ):
        cfg = self.config
        assert isinstance(cfg, EigendecomposedShampooPreconditionerConfig)
        previous = state[f"eigenvectors.{i}"].to(matrix.dtype)
        return eigendecompose(matrix, cfg.amortized_computation_config, previous, warm=ctx.warm, epsilon=eps)

    def refresh(self, state: dict[str, Tensor], ctx: Context, commit: Tensor) -> RefreshResult:
        amortized = getattr(self.config, "amortized_computation_config", None)
        eps = ctx.block_epsilon(getattr(self.config, "factor_matrix_dtype", None))
        rtol = getattr(amortized, "epsilon_rtol", 0.0)
        bc2 = per_block(ctx.bias_correction2, 3)
        block_failed = torch.zeros_like(commit)
        stats: list[SpectrumStats | None] = []
        cfg = self.config
        assert isinstance(cfg, _ShampooFamilyConfig)
        for i, alpha in self.exponents.items():
            factor = self.full(state, f"factor.{i}")
            bias_corrected = factor / bc2.to(factor.dtype)
            matrix = bias_corrected
            if cfg.use_trace_scaling:
                matrix = trace_scale(bias_corrected, cfg.trace_scaling_exponent, eps)
            root_key = f"root.{i}"
            if isinstance(amortized, CoupledNewtonConfig):
                largest = spectral_norm_lower_bound(matrix) if rtol else matrix.new_zeros(())
                root, _, failed = coupled_newton_inverse_root(
                    matrix,
                    round(1.0 / alpha),
                    _damping(ctx, largest, rtol),
                    max_iterations=amortized.max_iterations,
                    tolerance=amortized.tolerance,
                )
                stats.append(None)
            else:
                options = amortized
                if self.eigendecomposed:
                    values, vectors, _, failed = self._eigen_refresh(state, i, matrix, ctx, eps)
                else:
                    assert isinstance(options, EigenConfig)
                    values, vectors, failed = safe_eigh(matrix, retry_float64=options.retry_double_precision)
                damping = _damping(ctx, values.amax(-1), rtol)
                root = inverse_root_from_eigh(
                    values,
                    vectors,
                    alpha,
                    damping,
                    pseudo_inverse=getattr(options, "pseudo_inverse", False),
                    rank_rtol=getattr(options, "rank_rtol", None),
                )
                failed = failed | ~finite_matrices(root)
                stats.append(spectrum_stats(values, damping))
                if self.eigendecomposed:
                    ok = commit & ~failed
                    commit_(state[f"eigenvectors.{i}"], vectors, ok)
                    commit_(state[f"eigenvalues.{i}"], values * bc2[..., 0].to(values.dtype), ok)
            # Exactly symmetric (eigh's Q·diag·Qᵀ and Newton's products are so only up to
            # rounding): the plain step then multiplies by the root without transposing it.
            root = (root + root.mT).mul_(0.5)
            store_symmetric_(state[root_key], root, commit & ~failed)
            if f"reference.{i}" in state:  # snapshot for drift(); see there
                store_symmetric_(state[f"reference.{i}"], bias_corrected, commit & ~failed)
            block_failed |= failed & commit
        refresh_diagonals(state, self.diagonal, ctx, ctx.epsilon, rtol, commit)
        return RefreshResult(block_failed, tuple(stats))

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        out = apply_along_dims(grad, {i: self.full(state, f"root.{i}") for i in self.factor_dims})
        if self.diagonal:
            out = out.clone() if out is grad else out
            apply_diagonals_(out, state, self.diagonal)
        return out

    def precondition_into(
        self, state: dict[str, Tensor], grad: Tensor, ctx: Context, out: Tensor, scratch: Tensor
    ) -> None:
        roots = {i: self.full(state, f"root.{i}", ctx) for i in self.factor_dims}
        precondition_kronecker_into(grad, roots, out, scratch)
        apply_diagonals_(out, state, self.diagonal)

    def drift(self, state: dict[str, Tensor], ctx: Context) -> Tensor | None:
        """Eigendecomposed: off-diagonal mass of each factor in its stored eigenbasis. Root-inverse
        keeps no basis, so it compares with a snapshot of the factor taken at refresh (declared
        only when ``refresh_tolerance`` is set, so it costs no memory otherwise)."""
        if not self.factor_dims:
            return None
        if self.eigendecomposed:
            drifts = [
                eigenbasis_drift(self.full(state, f"factor.{i}"), state[f"eigenvectors.{i}"])
                for i in self.factor_dims
            ]
        else:
            if f"reference.{self.factor_dims[0]}" not in state:
                return None  # declared only with refresh_tolerance
            bc2 = per_block(ctx.bias_correction2, 3)
            drifts = [
                relative_change(
                    self.full(state, f"factor.{i}") / bc2.to(state[f"factor.{i}"].dtype),
                    self.full(state, f"reference.{i}"),
                )
                for i in self.factor_dims
            ]
        return torch.stack(drifts).amax(0)


class KLShampooPreconditioner(ShampooPreconditioner):
    """KL-Shampoo: factor ``i`` accumulates the outer product of ``G ×ⱼ≠ᵢ Lⱼ^(-½) / sqrt(Πⱼ≠ᵢ dⱼ)``."""

    kind = "kl_shampoo"
    default_exponent_scale = 0.5

    def default_exponent(self, order: int) -> float:
        return 0.5

    def __init__(self, config: PreconditionerConfig, block_shape: tuple[int, ...], where: str) -> None:
        super().__init__(config, block_shape, where)
        self.kind = "kl_shampoo"
        assert isinstance(config, KLShampooPreconditionerConfig)
        self.correction = config.eigenvalue_correction

    def state_schema(self, dtype: torch.dtype, options: Mapping[str, Any]) -> dict[str, StateSpec]:
        schema = super().state_schema(dtype, options)
        if self.correction:
            schema["refreshed"] = StateSpec((), torch.bool, False)
        return schema

    def transform_grad_for_outer_product(
        self, state: dict[str, Tensor], grad: Tensor, dim: int, ctx: Context
    ) -> Tensor:
        others = {j: self.full(state, f"root.{j}", ctx) for j in self.factor_dims if j != dim}
        scale = math.prod(self.block_shape[j] for j in range(self.order) if j != dim)
        return apply_along_dims(grad, others) * (scale**-0.5)

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        super().update(state, grad, ctx)
        if self.correction:
            self._correct_eigenvalues(state, grad, ctx)

    def _correct_eigenvalues(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        """``λᵢ ← β₂λᵢ + (1-β₂)·diag(Qᵢᵀ G (⊗ⱼ≠ᵢ Lⱼ⁻¹) Gᵀ Qᵢ)/Πⱼ≠ᵢdⱼ`` in the last eigenbases."""
        bc2 = ctx.bias_correction2.unsqueeze(-1)
        # The stored eigenvalues still describe the previous step's factors (as do the roots the
        # factor update just used), so they take that step's bias correction, not this one's.
        previous_bc2 = ctx.previous_bias_correction2()
        if isinstance(previous_bc2, Tensor):
            previous_bc2 = previous_bc2.unsqueeze(-1)
        bases = {i: state[f"eigenvectors.{i}"] for i in self.factor_dims}
        energy = apply_along_dims(grad, bases, transpose=True).square()
        options = getattr(self.config, "amortized_computation_config", None)
        pseudo_inverse = getattr(options, "pseudo_inverse", False)
        rank_rtol = getattr(options, "rank_rtol", None)
        rtol = getattr(options, "epsilon_rtol", 0.0)
        inverse = {}
        for j in self.factor_dims:
            lam = (state[f"eigenvalues.{j}"] / previous_bc2).clamp_min(0.0)
            eps = _damping(ctx, lam.amax(-1), rtol)
            inv = (lam + (eps.unsqueeze(-1) if isinstance(eps, Tensor) else eps)).reciprocal()
            if pseudo_inverse:  # as the refresh's root: zero on the numerical null space (ε may be 0)
                rank_tol = rank_rtol if rank_rtol is not None else lam.shape[-1] * torch.finfo(lam.dtype).eps
                inv = torch.where(lam > rank_tol * lam.amax(-1, keepdim=True), inv, 0.0)
            inverse[j] = inv
        live = ctx.live * state["refreshed"].to(ctx.live.dtype)
        ema = replace(
            ctx.ema2,
            keep=torch.where(live > 0, ctx.ema2.beta, 1.0),
            weight=(1.0 - ctx.ema2.beta) * live,
            _shaped={},
        )
        order = self.order
        for i in self.factor_dims:
            x = energy
            for j, inv in inverse.items():
                if j != i:
                    shape = [inv.shape[0]] + [1] * order
                    shape[j + 1] = inv.shape[1]
                    x = x * inv.view(shape).to(x.dtype)
            scale = math.prod(self.block_shape[j] for j in range(order) if j != i)
            summed = [d + 1 for d in range(order) if d != i]
            # sum(dim=[]) would reduce over every dim (mixing the bucket's blocks): 1-D blocks skip it.
            estimate = (x.sum(dim=summed) if summed else x) / scale
            estimate = torch.where(per_block(live > 0, estimate.ndim), estimate, 0.0)  # sums (β₂=1) too
            ema_(state[f"eigenvalues.{i}"], estimate, ema)
        refreshed = state["refreshed"]
        for i, alpha in self.exponents.items():
            values = state[f"eigenvalues.{i}"] / bc2.to(state[f"eigenvalues.{i}"].dtype)
            vectors = bases[i]
            root = inverse_root_from_eigh(
                values.to(vectors.dtype),
                vectors,
                alpha,
                _damping(ctx, values.clamp_min(0.0).amax(-1), rtol),
                pseudo_inverse=pseudo_inverse,
                rank_rtol=rank_rtol,
            )
            store_symmetric_(state[f"root.{i}"], (root + root.mT).mul_(0.5), refreshed)

    def refresh(self, state: dict[str, Tensor], ctx: Context, commit: Tensor) -> RefreshResult:
        result = super().refresh(state, ctx, commit)
        if self.correction:
            state["refreshed"] |= commit & ~result.failed
        return result
