"""What a kernel knows about one bucket at one step (``Context``, ``Ema``) and how it declares its
state (``StateSpec``). Built by the optimizer's workspace; kernels only read them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from ..linalg.packing import pack, unpacked_dim

__all__ = ["Context", "Ema", "StateSpec", "identity", "outer_operands", "per_block"]


def per_block(values: Tensor, ndim: int) -> Tensor:
    """Reshape per-block values ``[n]`` to broadcast against ``[n, *block]`` of total ``ndim``."""
    return values.view(values.shape[0], *([1] * (ndim - 1)))


def identity(n: int, d: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(d, dtype=dtype, device=device).expand(n, d, d).clone()


def outer_operands(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(X₍dim₎, X₍dim₎ᵀ)`` of every block of ``x: [n, *block]`` as batched matrices (views for
    2-D blocks)."""
    if x.ndim == 3:
        return (x, x.mT) if dim == 0 else (x.mT, x)
    moved = x.movedim(dim + 1, 1).reshape(x.shape[0], x.shape[dim + 1], -1)
    return moved, moved.mT


@dataclass(frozen=True)
class StateSpec:
    """One state tensor per block: its per-block ``shape``, ``dtype`` and initial value (a
    number, or ``"identity"`` for square matrices)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | Literal["identity"] = 0.0
    scale: float = 1.0  # of the identity

    def allocate(self, n: int, device: torch.device | str) -> Tensor:
        if self.fill == "identity":  # [d, d], or packed [d(d+1)/2]
            d = self.shape[-1] if len(self.shape) == 2 else unpacked_dim(self.shape[-1])
            eye = identity(n, d, dtype=self.dtype, device=torch.device(device))
            eye = eye if self.scale == 1.0 else eye.mul_(self.scale)
            return eye if len(self.shape) == 2 else pack(eye)
        return torch.full((n, *self.shape), self.fill, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class Ema:
    """Per-block views (``[n]``) that drive one exponential moving average with factor ``beta``:
    ``keep`` (β on live blocks, 1 on dead ones), ``weight`` (1 − β on live blocks, 0 on dead
    ones) and ``correction`` (``1 − βᵗ`` with ``t`` the block's own step count, or 1 where there
    is no bias correction). Their values are recomputed every step; the views stay, and so do
    their broadcastable shapes (``shaped``), so a plain step creates no views."""

    beta: float
    keep: Tensor
    weight: Tensor
    correction: Tensor
    root: Tensor | None = None  # sqrt(correction), where a kernel asks for it (Adam's denominator)
    _shaped: dict[tuple[str, int], Tensor] = field(default_factory=dict, compare=False, repr=False)

    def shaped(self, name: Literal["keep", "weight", "correction", "root"], ndim: int) -> Tensor:
        """``keep``/``weight``/``correction`` as ``[n, 1, …]`` broadcasting against ``ndim`` dims."""
        view = self._shaped.get((name, ndim))
        if view is None:
            view = self._shaped[(name, ndim)] = per_block(getattr(self, name), ndim)
        return view


@dataclass
class Context:
    """What a kernel needs to know about the current step for one bucket.

    Built once per bucket by the optimizer's workspace (the tensors are views of per-block
    vectors it refreshes every step); ``step`` and ``warm`` are set each step. ``live`` is
    ``1.0`` for blocks that take part in this step and ``0.0`` for blocks whose gradient is
    missing or non-finite: their statistics must stay exactly unchanged.
    """

    step: int
    beta2: float
    epsilon: float
    use_bias_correction: bool
    live: Tensor
    block_step: Tensor  # [n] int64: steps each block took part in (its bias corrections' t)
    ema2: Ema  # the group's betas[1] (Kronecker factors, SOAP's second moment)
    ema1: Ema  # betas[0] (the filtered gradient); correction = 1 − β₃·β₁ᵗ⁻¹
    diagonal: Ema  # the diagonal kernel's β₂ (as main preconditioner or grafting)
    epsilon_scale: Tensor | None = None
    warm: bool = False  # on refresh: every block of the bucket was refreshed before
    #: How the filtered gradient follows the gradients: ``m ← lerp(m, g, (1-β₁)·live)``;
    #: ``beta1 = None`` when the current step uses β₃ ≠ β₁ instead.
    beta1: float | None = 0.0
    beta3: float = 0.0
    #: The optimizer's gradient buffer of this bucket and its outer-product operands per dim
    #: (views made once, so factor updates create no views per step).
    grad_buffer: Tensor | None = None
    grad_operands: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    #: Views of this bucket's state a kernel makes once (e.g. transposed bases); see ``view``.
    views: dict[Any, Tensor] = field(default_factory=dict, repr=False)
    #: Scratch tensors shared by every bucket of a lane (used one bucket at a time), by key.
    buffers: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def buffer(self, key: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A reusable scratch tensor of ``shape`` (contents undefined), made once per lane."""
        full = (key, shape, dtype, device)
        tensor = self.buffers.get(full)
        if tensor is None:
            tensor = self.buffers[full] = torch.empty(shape, dtype=dtype, device=device)
        return tensor

    def view(self, key: Any, make: Callable[[], Tensor]) -> Tensor:
        """A cached view of persistent state (valid while the workspace that built this context
        is: state tensors are updated in place, never replaced, while it lives)."""
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = make()
        return view

    def operands(self, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``outer_operands(x, dim)``, from the cache when ``x`` is the gradient buffer."""
        if x is self.grad_buffer and dim in self.grad_operands:
            return self.grad_operands[dim]
        return outer_operands(x, dim)

    @property
    def bias_correction2(self) -> Tensor:
        """``1 - β₂ᵗ`` per block for EMA statistics; 1 for sums (β₂ = 1) or without correction."""
        return self.ema2.correction

    def previous_bias_correction2(self) -> Tensor | float:
        """``bias_correction2`` one step earlier (at least step 1): what statistics computed
        before this step's update were normalised with."""
        if not (self.use_bias_correction and self.beta2 < 1.0):
            return 1.0
        t = (self.block_step - 1).clamp_min(1).to(self.live.dtype)
        return 1.0 - torch.pow(self.beta2, t)

    def block_epsilon(self, dtype: torch.dtype | None = None) -> Tensor | float:
        """Per-block damping for refreshes: ``epsilon`` times the block's retry scale, formed in
        ``dtype`` (the statistics' precision: a float32 product would round a float64 epsilon)."""
        if self.epsilon_scale is None:
            return self.epsilon
        scale = self.epsilon_scale if dtype is None else self.epsilon_scale.to(dtype)
        return self.epsilon * scale

    @classmethod
    def uniform(
        cls,
        step: int,
        beta2: float,
        epsilon: float,
        use_bias_correction: bool,
        live: Tensor,
        *,
        beta1: float = 0.0,
        epsilon_scale: Tensor | None = None,
        warm: bool = False,
    ) -> Context:
        """A context for ``n = len(live)`` blocks that all took every step so far (for using a
        kernel on its own, e.g. in tests; the optimizer builds its contexts from its workspace)."""
        n = live.shape[0]

        def ema(beta: float, corrected: bool) -> Ema:
            keep = torch.where(live > 0, beta, 1.0).to(live.dtype)
            correction = torch.full((n,), 1.0 - beta**step if corrected else 1.0, dtype=live.dtype)
            return Ema(beta, keep, (1.0 - keep), correction, correction.sqrt())

        return cls(
            step=step,
            beta2=beta2,
            epsilon=epsilon,
            use_bias_correction=use_bias_correction,
            live=live,
            block_step=torch.full((n,), step, dtype=torch.int64),
            ema2=ema(beta2, use_bias_correction and beta2 < 1.0),
            ema1=ema(beta1, use_bias_correction and 0.0 < beta1 < 1.0),
            diagonal=ema(1.0, False),
            epsilon_scale=epsilon_scale,
            warm=warm,
            beta1=beta1,
            beta3=beta1,
        )

    def rows(self, rows: Tensor) -> Context:
        """The context of a subset of the bucket's blocks (a partial refresh)."""

        def pick(ema: Ema) -> Ema:
            root = None if ema.root is None else ema.root[rows]
            return Ema(ema.beta, ema.keep[rows], ema.weight[rows], ema.correction[rows], root)

        scale = None if self.epsilon_scale is None else self.epsilon_scale[rows]
        return replace(
            self,
            grad_buffer=None,
            grad_operands={},
            views={},
            live=self.live[rows],
            block_step=self.block_step[rows],
            ema2=pick(self.ema2),
            ema1=pick(self.ema1),
            diagonal=pick(self.diagonal),
            epsilon_scale=scale,
        )
