"""PSGD-Kron (Xi-Lin Li): a Kronecker-factored whitening preconditioner ``P = QᵀQ`` fitted online.

Per block, ``Q = Q₁ ⊗ … ⊗ Q_k`` with each factor dense or diagonal. On update steps the factors take
one Lipschitz-normalised step towards ``P = E[hhᵀ]^(-1/2)`` (``h``: the gradient, or the momentum
with ``whiten_grad=False``, plus damping noise), in one of three geometries (``mode``; the
update rules are the pure functions of :mod:`lightning_shampoo.linalg.psgd`); every step the
direction is ``P·m`` for the optimizer's filtered gradient ``m``, RMS-clipped. There is no
amortized refresh: the fit is incremental, so everything runs inside ``update``/``precondition``.

Which steps update ``Q`` is decided on the host from the step count alone: a deterministic
credit counter (no coin flip) gives every rank, and a resumed run, the same schedule without
synchronising with the device. The damping noise is drawn from a generator seeded by the step,
shared by all blocks, so it too is identical across ranks, layouts and resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import describe, require_bool, require_choice, require_float, require_int
from ..linalg import SpectrumStats, stable_pow
from ..linalg.psgd import (
    balance_factors,
    smallest_singular_value_estimate,
    spectral_norm_lower_bound,
    update_eq,
    update_q0p5eq1p5,
    update_quad,
)
from .base import Context, Preconditioner, PreconditionerConfig, StateSpec, commit_, outer_products, per_block
from .psgd_schedule import PSGDUpdateProbabilitySchedule

__all__ = [
    "PSGDKronPreconditioner",
    "PSGDKronPreconditionerConfig",
    "PSGDUpdateProbabilitySchedule",
]

MODES = ("Q0.5EQ1.5", "EQ", "QUAD")
MEMORY_SAVE_MODES = (None, "one_diag", "all_diag")
_STORAGE_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
_UNIT = 1 << 32  # update credit is counted in exact integer units of 2⁻³² (no float drift)


@dataclass(frozen=True, kw_only=True)
class PSGDKronPreconditionerConfig(PreconditionerConfig):
    """Kronecker-factored PSGD. Defaults follow the reference implementations.

    * ``mode``: Q geometry, ``"Q0.5EQ1.5"`` (Procrustes-symmetrised), ``"EQ"`` (triangular) or
      ``"QUAD"`` (SPD quadratic form).
    * ``preconditioner_lr`` (step of the Q fit, relative to its Lipschitz estimate),
      ``lipschitz_beta`` (EMA factor of that estimate; larger for sparse gradients), ``damping``
      (noise added to the fitted gradient; bounds ``P ≤ I/damping``).
    * ``whiten_grad``: fit ``P`` on the gradient (and apply it to the momentum); ``False`` fits it on
      the momentum, which needs the optimizer's ``betas[0] > 0``. With ``False`` the fit happens in
      ``precondition`` and so pauses during grafting-only steps.
    * ``preconditioner_update_probability``: float or ``step -> float``; the expected fraction of
      steps that update ``Q``, realised by a deterministic credit counter (first step always fits).
    * ``init_scale``: ``P₀ = init_scale²·I``; ``None`` estimates ``(mean g⁴ + damping⁴)^(-1/8)``
      per block from its first non-zero gradient (until then ``P = I`` and no fit).
    * ``max_size_triangular``, ``max_skew`` (a dim ``d`` with ``d² > max_skew·numel`` is
      diagonal), ``min_ndim_triangular`` (lower-order blocks are all diagonal; 1-D blocks always
      are), ``memory_save_mode``: ``"one_diag"`` (largest dim diagonal) or ``"all_diag"``. The
      optimizer merges the dims of a >= 2-D parameter down to two at most (never into one long
      vector, which would get only a diagonal factor).
    * ``preconditioner_dtype``: storage of ``Q`` (and cached ``P``), ``None`` = the gradient's;
      bfloat16 allowed. Fits run in float32 (float64 for float64 gradients).
    * ``max_update_rms``: RMS clip of each block's ``P·m`` (``None``: off); whitened gradients have
      unit RMS, so this only bites on transients.
    * ``cache_preconditioner``: keep ``Pᵢ = QᵢᵀQᵢ`` of dense factors (one more ``d×d`` each) so steps
      without a fit cost one matmul per dim instead of two.
    * ``health_interval``: the health figures of ``QᵢᵀQᵢ`` are re-estimated on the first fit and
      every ``health_interval``-th fit after it (each fit moves ``Q`` by at most ``lr``; the
      estimate costs about one LU per dense factor).
    """

    family: ClassVar[str | None] = "psgd_kron"
    min_block_order: ClassVar[int] = 2
    mode: str = "Q0.5EQ1.5"
    preconditioner_lr: float = 0.1
    lipschitz_beta: float = 0.9
    damping: float = 1e-9
    whiten_grad: bool = True
    preconditioner_update_probability: float | Callable[[int], float] = field(
        default_factory=PSGDUpdateProbabilitySchedule
    )
    init_scale: float | None = None
    max_size_triangular: int | float = 8192
    max_skew: float = math.inf
    min_ndim_triangular: int = 2
    memory_save_mode: str | None = None
    preconditioner_dtype: torch.dtype | None = None
    max_update_rms: float | None = 1.1
    cache_preconditioner: bool = True
    health_interval: int = 10

    def __post_init__(self) -> None:
        require_choice("mode", self.mode, MODES)
        require_float("preconditioner_lr", self.preconditioner_lr, low=0.0, high=1.0, low_open=True)
        require_float("lipschitz_beta", self.lipschitz_beta, low=0.0, high=1.0, high_open=True)
        require_float("damping", self.damping, low=0.0, low_open=True)
        require_bool("whiten_grad", self.whiten_grad)
        require_bool("cache_preconditioner", self.cache_preconditioner)
        p = self.preconditioner_update_probability
        if not callable(p):
            name = "preconditioner_update_probability"
            if isinstance(p, int | float) and not isinstance(p, bool):
                require_float(name, p, low=0.0, high=1.0)
            else:
                raise ValueError(f"{name} must be a number in [0, 1] or a callable, got {describe(p)}")
        require_float("init_scale", self.init_scale, low=0.0, low_open=True, allow_none=True)
        require_int("max_size_triangular", self.max_size_triangular, low=1, allow_inf=True)
        require_float("max_skew", self.max_skew, low=0.0, allow_inf=True)
        require_int("min_ndim_triangular", self.min_ndim_triangular, low=1)
        require_choice("memory_save_mode", self.memory_save_mode, MEMORY_SAVE_MODES)
        if self.preconditioner_dtype is not None:
            require_choice("preconditioner_dtype", self.preconditioner_dtype, _STORAGE_DTYPES)
        require_float("max_update_rms", self.max_update_rms, low=0.0, low_open=True, allow_none=True)
        require_int("health_interval", self.health_interval, low=1)


def _credit(probability: float) -> int:
    if not (isinstance(probability, int | float) and 0.0 <= probability <= 1.0):
        raise ValueError(f"preconditioner_update_probability returned {probability!r}, expected [0, 1]")
    return round(probability * _UNIT)


class PSGDKronPreconditioner(Preconditioner):
    """PSGD-Kron over one bucket. State per block: ``q.{i}`` (``[d,d]`` or ``[d]``), ``lipschitz.{i}``,
    ``p.{i}`` (cached ``QᵢᵀQᵢ`` of dense factors), ``health.{i}`` (min/max eigenvalue and condition
    number of ``QᵢᵀQᵢ`` at the last fit) and, when the scale is estimated, ``initialized``."""

    kind = "psgd_kron"
    amortized = False
    linear = False  # the RMS clip of the update
    compilable = False  # whether Q is fitted is decided on the host from the step count

    def __init__(self, config: PreconditionerConfig, block_shape: tuple[int, ...], where: str) -> None:
        super().__init__(config, block_shape, where)
        assert isinstance(config, PSGDKronPreconditionerConfig)
        self.cfg = config
        self.dense = self._dense_dims(config, block_shape)
        self._cached = (0, _UNIT - 1)  # (step s, credit C(s)); C(0) = one unit minus 1: step 1 fits
        self._decision = (-1, False, 0)  # (step, fits at step, fits up to step)

    @staticmethod
    def _dense_dims(cfg: PSGDKronPreconditionerConfig, shape: tuple[int, ...]) -> tuple[bool, ...]:
        numel = math.prod(shape)
        dense = [
            len(shape) >= cfg.min_ndim_triangular
            and 1 < d <= cfg.max_size_triangular
            and d * d <= cfg.max_skew * numel
            for d in shape
        ]
        if cfg.memory_save_mode == "all_diag":
            dense = [False] * len(shape)
        elif cfg.memory_save_mode == "one_diag" and len(shape) >= 2:
            dense[max(range(len(shape)), key=lambda i: shape[i])] = False
        return tuple(dense)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        return tuple(range(self.order))

    def _storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.cfg.preconditioner_dtype or dtype

    def state_schema(self, dtype: torch.dtype, options: Mapping[str, Any]) -> dict[str, StateSpec]:
        sdtype = self._storage_dtype(dtype)
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        scale = (self.cfg.init_scale or 1.0) ** (1.0 / self.order)
        schema: dict[str, StateSpec] = {}
        for i, d in enumerate(self.block_shape):
            if self.dense[i]:
                schema[f"q.{i}"] = StateSpec((d, d), sdtype, "identity", scale)
                if self.cfg.cache_preconditioner:
                    schema[f"p.{i}"] = StateSpec((d, d), sdtype, "identity", scale * scale)
            else:
                schema[f"q.{i}"] = StateSpec((d,), sdtype, scale)
            schema[f"lipschitz.{i}"] = StateSpec((), cdtype)
            schema[f"health.{i}"] = StateSpec((3,), torch.float32, math.nan)
        if self.cfg.init_scale is None:
            schema["initialized"] = StateSpec((), torch.bool, False)
        return schema

    # ------------------------------------------------------------------------------ schedule

    def _credit_at(self, step: int) -> int:
        """``C(step) = C(0) + Σ_{s≤step} round(p(s)·2³²)``: O(1) per step forwards (memoised),
        and in closed form for a jump (a resume) with the built-in schedule; an arbitrary
        callable is replayed from the start on a backward jump."""
        p = self.cfg.preconditioner_update_probability
        if not callable(p):
            return _UNIT - 1 + step * _credit(p)
        s, c = self._cached
        if step == s:
            return c
        if step == s + 1:
            c += _credit(float(p(step)))
        elif type(p) is PSGDUpdateProbabilitySchedule:  # a subclass may change __call__
            c = _UNIT - 1 + p.credit(step, _UNIT)
        else:
            if step < s:  # e.g. after loading an earlier checkpoint: recount from the start
                s, c = 0, _UNIT - 1
            while s < step:
                s += 1
                c += _credit(float(p(s)))
        self._cached = (step, c)
        return c

    def update_due(self, step: int) -> bool:
        """Whether ``Q`` is fitted at ``step``: the credit counter crossed a whole unit. A pure
        function of the step (and the schedule), decided on the host: identical on every rank and
        after a resume, with no device synchronisation."""
        if self._decision[0] != step:
            before = self._credit_at(step - 1) // _UNIT
            fits = self._credit_at(step) // _UNIT
            self._decision = (step, fits > before, fits)
        return self._decision[1]

    # -------------------------------------------------------------------------- application

    def _mode_view(self, v: Tensor, i: int) -> Tensor:
        """Diagonal factor ``[n, dᵢ]`` → broadcastable along block dim ``i`` of ``[n, *block]``."""
        return v.view(v.shape[0], *(d if j == i else 1 for j, d in enumerate(self.block_shape)))

    def _apply(self, x: Tensor, factors: list[Tensor], *, transpose: bool = False) -> Tensor:
        """``x ×ᵢ Fᵢ`` (or ``Fᵢᵀ``) along every dim: dense factors by mode products, diagonal ones
        elementwise."""
        for i, f in enumerate(factors):
            f = f.to(x.dtype)
            if not self.dense[i]:
                x = x * self._mode_view(f, i)
                continue
            moved = x.movedim(i + 1, -1)
            y = moved.reshape(x.shape[0], -1, moved.shape[-1]) @ (f if transpose else f.mT)
            x = y.reshape(moved.shape).movedim(-1, i + 1)
        return x

    def _solve_qt(self, v: Tensor, qs: list[Tensor]) -> Tensor:
        """``v ×ᵢ Qᵢ⁻ᵀ`` along every dim (upper-triangular dense ``Qᵢ``): triangular solves."""
        for i, q in enumerate(qs):
            if not self.dense[i]:
                v = v / self._mode_view(q, i)
                continue
            moved = v.movedim(i + 1, -1)
            flat = moved.reshape(v.shape[0], -1, moved.shape[-1])
            y = torch.linalg.solve_triangular(q, flat, upper=True, left=False)  # Y·Q = V
            v = y.reshape(moved.shape).movedim(-1, i + 1)
        return v

    def _gram(self, x: Tensor, i: int) -> Tensor:
        """``X₍ᵢ₎X₍ᵢ₎ᵀ`` (dense) or its diagonal (diagonal factor)."""
        if self.dense[i]:
            return outer_products(x, i)
        return (x * x).movedim(i + 1, 1).reshape(x.shape[0], x.shape[i + 1], -1).sum(-1)

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        if not self.cfg.whiten_grad and self.update_due(ctx.step):
            self._fit(state, grad, ctx.live, ctx.step)
        cached = self.cfg.cache_preconditioner
        if cached:
            factors = [state[f"p.{i}"] if d else state[f"q.{i}"].square() for i, d in enumerate(self.dense)]
            out = self._apply(grad, factors)
        else:
            qs = [state[f"q.{i}"] for i in range(self.order)]
            out = self._apply(self._apply(grad, qs), qs, transpose=True)
        if self.cfg.max_update_rms is not None:
            rms = out.square().flatten(1).mean(1).sqrt()
            limit = self.cfg.max_update_rms
            out = out * per_block(torch.where(rms > limit, limit / rms, 1.0), out.ndim)
        return out

    # ---------------------------------------------------------------------------------- fit

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        if self.cfg.whiten_grad and self.update_due(ctx.step):
            self._fit(state, grad, ctx.live, ctx.step)

    def _noise(self, step: int, like: Tensor) -> Tensor:
        """``N(0, I)`` of the block shape from a generator seeded by the step, shared by every block:
        deterministic, identical on all ranks and bucket layouts, and reproduced by a resume."""
        gen = torch.Generator(device=like.device)
        gen.manual_seed((step * 0x9E3779B97F4A7C15 + 0x5EED) % (1 << 63))
        noise = torch.randn(self.block_shape, generator=gen, device=like.device, dtype=like.dtype)
        return noise.expand_as(like)

    def _initial_scale(self, x: Tensor) -> Tensor:
        """Per-block ``(mean x⁴ + damping⁴)^(-1/8)`` (``P₀·x`` has unit amplitude), computed from
        the max-normalised block so that huge gradients cannot overflow the fourth power."""
        flat = x.abs().flatten(1)
        peak = flat.amax(1)
        safe = torch.where(peak > 0, peak, 1.0)
        r = peak * stable_pow(stable_pow(flat / safe[:, None], 4).mean(1), 0.25)  # (mean x⁴)^(1/4)
        delta = torch.full_like(r, self.cfg.damping)
        big = torch.maximum(r, delta)
        return (big * stable_pow(stable_pow(r / big, 4) + stable_pow(delta / big, 4), 0.25)).rsqrt()

    def _fit(self, state: dict[str, Tensor], x: Tensor, live: Tensor, step: int) -> None:
        """One Q update of every live block from ``x`` (committed only where finite)."""
        cfg, order = self.cfg, self.order
        sdtype = state["q.0"].dtype
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(cd)
        qs = [state[f"q.{i}"].to(cd) for i in range(order)]
        ok = live > 0
        if cfg.init_scale is None:
            scale = self._initial_scale(x)
            fresh = ok & ~state["initialized"] & (x.flatten(1).abs().amax(1) > 0) & torch.isfinite(scale)
            root = stable_pow(scale, 1.0 / order)
            for i, q in enumerate(qs):
                d = self.block_shape[i]
                init = torch.diag_embed(root[:, None].expand(-1, d)) if self.dense[i] else root[:, None]
                qs[i] = torch.where(per_block(fresh, q.ndim), init.expand_as(q), q)
            ok = ok & (state["initialized"] | fresh)
        noise = self._noise(step, x)
        h = x + (cfg.damping + torch.finfo(sdtype).eps * x.abs()) * noise
        lr, beta, numel = cfg.preconditioner_lr, cfg.lipschitz_beta, self.numel
        lips = [state[f"lipschitz.{i}"].to(cd) for i in range(order)]
        new = []
        if cfg.mode == "EQ":
            a, b = self._apply(h, qs), self._solve_qt(noise, qs)
            for i, q in enumerate(qs):
                diag = not self.dense[i]
                ga, gb = self._gram(a, i), self._gram(b, i)
                new.append(update_eq(q, ga, gb, lips[i], lr=lr, beta=beta, diagonal=diag))
        else:
            fn = update_q0p5eq1p5 if cfg.mode == "Q0.5EQ1.5" else update_quad
            ph = self._apply(self._apply(h, qs), qs, transpose=True)
            for i, q in enumerate(qs):
                c = numel / self.block_shape[i]
                new.append(fn(q, self._gram(ph, i), c, lips[i], lr=lr, beta=beta, diagonal=not self.dense[i]))
        stored = [q.to(sdtype) for q in balance_factors([q for q, _ in new])]
        for t in [*stored, *(lip for _, lip in new)]:
            ok = ok & torch.isfinite(t).reshape(t.shape[0], -1).all(1)
        track = (self._decision[2] - 1) % cfg.health_interval == 0
        for i, q in enumerate(stored):
            commit_(state[f"q.{i}"], q, ok)
            commit_(state[f"lipschitz.{i}"], new[i][1], ok)
            if self.dense[i] and cfg.cache_preconditioner:
                commit_(state[f"p.{i}"], q.to(cd).mT @ q.to(cd), ok)
            if track:
                commit_(state[f"health.{i}"], self._factor_health(q.to(cd), i), ok)
        if cfg.init_scale is None:
            state["initialized"] |= ok

    def _factor_health(self, q: Tensor, i: int) -> Tensor:
        """``[n, 3]``: min/max eigenvalue and condition number of ``QᵢᵀQᵢ`` (estimates for dense
        factors, from a spectral-norm lower bound and a power-iteration ``σ_min``; no eigh)."""
        if not self.dense[i]:
            p = q.square()
            lo, hi = p.amin(-1), p.amax(-1)
        else:
            hi = spectral_norm_lower_bound(q.mT @ q)
            lo = smallest_singular_value_estimate(q, triangular=self.cfg.mode == "EQ").square()
            lo = torch.minimum(lo, hi)
        cond = torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(lo.dtype).tiny), torch.inf)
        return torch.stack([lo, hi, cond], dim=1).float()

    def health_stats(self, state: dict[str, Tensor]) -> tuple[SpectrumStats | None, ...]:
        return tuple(
            SpectrumStats(h[:, 0], h[:, 1], h[:, 2])
            for h in (state[f"health.{i}"] for i in range(self.order))
        )
