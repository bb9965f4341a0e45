"""``Shampoo``: the step pipeline over buckets of same-shape blocks.

Per param group and bucket, one step is::

    grads → gather [n, *block] → non-finite guard → (L2 decay) → preconditioner.update
          → refresh (amortized, when due) → update_after_refresh → β₁ filter
          → precondition → graft → fallback → decoupled decay → momentum → param += -lr·P

Everything is batched over the bucket's ``n`` blocks; nothing on this path synchronises with the
device. Refreshes (eigendecompositions) may synchronise: they are amortized.
Argument names, defaults and semantics follow Meta's Distributed Shampoo.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from . import _checkpoint
from ._validation import validate_group
from .blocking import Bucket, build_buckets, gather, layout_param, scatter_add_
from .health import BlockHealth
from .preconditioners import (
    Context,
    Preconditioner,
    RootInvShampooPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
    make_preconditioner,
)
from .preconditioners.base import commit_, ema_, per_block

__all__ = ["FALLBACK_MODES", "Shampoo"]

#: Per-block fallback modes: what a block uses instead of its preconditioner.
FALLBACK_MODES = {None: 0, "sgd": 1, "grafting": 2}
_FALLBACK_NAMES = {v: k for k, v in FALLBACK_MODES.items()}


@dataclass
class BucketPlan:
    """A bucket with the kernels that serve it (the state lives in ``optimizer.state[bucket.key]``)."""

    bucket: Bucket
    kernel: Preconditioner
    graft: Preconditioner | None


@contextmanager
def _full_precision_matmul():
    """Factor statistics need IEEE fp32 matmuls: TF32 rounding wipes out small eigenvalues."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


class Shampoo(torch.optim.Optimizer):
    """Batched Shampoo / SOAP / KL-Shampoo / diagonal optimizer (see the package README).

    Param groups may override every argument below and also set ``stacked=True``: the leading
    dim of each of their parameters indexes independent slices (layers, experts) that get
    separate preconditioners. ``use_bucketing=False`` runs one block at a time (the reference).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        beta3: float = -1.0,
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        dampening: float = 0.0,
        use_nesterov: bool = False,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int | float = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int | float = -1,
        use_bias_correction: bool = True,
        use_decoupled_weight_decay: bool = True,
        grafting_config: Any = None,
        preconditioner_config: Any = RootInvShampooPreconditionerConfig(),  # noqa: B008 (frozen)
        use_merge_dims: bool = True,
        use_bucketing: bool = True,
    ) -> None:
        self._plans: list[list[BucketPlan]] = []
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._use_bucketing = use_bucketing
        self._owns: Callable[[int, int], bool] | None = None
        self._fallback_buckets: set[str] = set()
        self._refresh_requests: set[str] = set()
        self.refresh_seconds: dict[int, float] = {}  # wall time of each group's last refresh
        self._refresh_clock = 0.0
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            beta3=beta3,
            epsilon=epsilon,
            momentum=momentum,
            dampening=dampening,
            use_nesterov=use_nesterov,
            weight_decay=weight_decay,
            max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            use_bias_correction=use_bias_correction,
            use_decoupled_weight_decay=use_decoupled_weight_decay,
            grafting_config=grafting_config,
            preconditioner_config=preconditioner_config,
            use_merge_dims=use_merge_dims,
            stacked=False,
        )
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------- set-up

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(group)
            self._plans.append(self._plan_group(len(self.param_groups) - 1, group))
        except Exception:
            self.param_groups.pop()
            raise

    def _plan_group(self, g: int, group: dict[str, Any]) -> list[BucketPlan]:
        names = group.get("param_names") or [None] * len(group["params"])
        layouts = []
        for p, name in zip(group["params"], names):
            index = len(self._params)
            self._params.append(p)
            self._names.append(name or f"param{index}")
            if p.numel() == 0:
                continue
            layout = layout_param(
                index,
                self._names[-1],
                p.shape,
                group["max_preconditioner_dim"],
                merge=group["use_merge_dims"] and p.is_contiguous(),
                stacked=group["stacked"],
                min_order=2
                if isinstance(group["preconditioner_config"], SpectralDescentPreconditionerConfig)
                else 1,
            )
            layouts.append((layout, p.dtype, p.device))
        return self._make_plans(g, group, layouts)

    def _make_plans(self, g: int, group: dict[str, Any], layouts: list) -> list[BucketPlan]:
        plans = []
        for bucket in build_buckets(g, layouts, bucketing=self._use_bucketing, owns=self._owns):
            where = "parameter(s) " + ", ".join(dict.fromkeys(m.param.name for m in bucket.members))
            kernel = make_preconditioner(group["preconditioner_config"], bucket.block_shape, where)
            graft = group["grafting_config"]
            graft_kernel = None if graft is None else make_preconditioner(graft, bucket.block_shape, where)
            plans.append(BucketPlan(bucket, kernel, graft_kernel))
        return plans

    @property
    def plans(self) -> list[BucketPlan]:
        return [plan for plans in self._plans for plan in plans]

    def _ensure_state(self) -> None:
        """Allocate bucket state lazily (after the model has reached its device), as torch.optim does."""
        for plan in self.plans:
            if plan.bucket.key in self.state:
                continue
            first = self._params[plan.bucket.members[0].param.index]
            n, device = plan.bucket.size, first.device
            dtype = torch.promote_types(first.dtype, torch.float32)
            opt: dict[str, Tensor] = {
                "refresh_step": torch.full((n,), -1, dtype=torch.int64, device=device),
                "failures": torch.zeros(n, dtype=torch.int32, device=device),
                "nonfinite": torch.zeros(n, dtype=torch.int32, device=device),
                "fallback": torch.zeros(n, dtype=torch.int8, device=device),
                "epsilon_scale": torch.ones(n, dtype=torch.float32, device=device),
                "refresh_request": torch.zeros(n, dtype=torch.bool, device=device),
            }
            for i in plan.kernel.factor_dims:
                for name in ("condition_number", "min_eigenvalue", "max_eigenvalue"):
                    opt[f"{name}.{i}"] = torch.full((n,), math.nan, dtype=torch.float32, device=device)
            self.state[plan.bucket.key] = {  # type: ignore[index]
                "precond": plan.kernel.init_state(n, device, dtype),
                "graft": plan.graft.init_state(n, device, dtype) if plan.graft else {},
                "opt": opt,
            }

    # ------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` (as Lightning passes) runs under ``enable_grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_state()
        with _full_precision_matmul():
            for g, group in enumerate(self.param_groups):
                self._step_group(g, group)
        return loss

    def _step_group(self, g: int, group: dict[str, Any]) -> None:
        step = group["step"] = int(group.get("step", 0)) + 1
        frequency, start = group["precondition_frequency"], group["start_preconditioning_step"]
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"precondition_frequency must be a positive int, got {frequency!r}")
        due = (step % frequency == 0 and step > start) or step == start
        self._refresh_clock = 0.0
        for plan in self._plans[g]:
            state = self.state[plan.bucket.key]  # type: ignore[index]
            direction = self._direction(plan, state, group, step, start, due)
            self._refresh_requests.discard(plan.bucket.key)
            if direction is not None:
                self._apply(plan, direction, group["lr"])
        if self._refresh_clock:
            self.refresh_seconds[g] = self._refresh_clock

    def _apply(self, plan: BucketPlan, direction: Tensor, lr: float | Tensor) -> None:
        """Write ``-lr · P`` into the parameters (the distributed strategy replaces this)."""
        params = {m.param.index: self._params[m.param.index] for m in plan.bucket.members}
        scatter_add_(plan.bucket, params, direction, -lr)

    def _direction(
        self, plan: BucketPlan, state: dict, group: dict[str, Any], step: int, start: float, due: bool
    ) -> Tensor | None:
        """The search direction ``P`` of one bucket (zero rows for skipped blocks)."""
        bucket, opt = plan.bucket, state["opt"]
        grads = {m.param.index: self._params[m.param.index].grad for m in bucket.members}
        if all(g is None for g in grads.values()):
            return None
        first = self._params[bucket.members[0].param.index]
        dtype = torch.promote_types(first.dtype, torch.float32)
        grad = gather(bucket, grads, dtype=dtype, device=first.device)
        present = torch.ones(bucket.size, dtype=torch.bool, device=first.device)
        for m in bucket.members:
            if grads[m.param.index] is None:
                present[m.offset : m.offset + m.region.count] = False
        finite = torch.isfinite(grad).flatten(1).all(1)
        opt["nonfinite"] += (present & ~finite).to(torch.int32)
        alive = present & finite
        grad = torch.where(per_block(alive, grad.ndim), grad, 0.0)
        wd = group["weight_decay"]
        needs_params = wd != 0.0
        params = (
            gather(bucket, self._param_map(bucket), dtype=dtype, device=first.device)
            if needs_params
            else None
        )
        if params is not None and not group["use_decoupled_weight_decay"]:
            grad = torch.where(per_block(alive, grad.ndim), grad + wd * params, 0.0)
        beta2 = group["betas"][1]
        ctx = Context(
            step=step,
            beta2=beta2,
            epsilon=group["epsilon"],
            use_bias_correction=group["use_bias_correction"],
            live=alive.to(dtype),
            epsilon_scale=opt["epsilon_scale"],
        )
        kernel, graft = plan.kernel, plan.graft
        precond, graft_state = state["precond"], state["graft"]
        kernel.update(precond, grad, ctx)
        if graft is not None:
            graft.update(graft_state, grad, ctx)
        requested = bucket.key in self._refresh_requests
        if kernel.amortized and (due or requested):
            commit = torch.ones_like(alive) if due else opt["refresh_request"].clone()
            self._refresh(plan, state, replace(ctx, warm=bool((opt["refresh_step"] >= 0).all())), commit)
        kernel.update_after_refresh(precond, grad, ctx)

        filtered = self._filtered_gradient(opt, grad, ctx, group, step)
        use_grafting_method = step < start and graft is not None
        if use_grafting_method:
            assert graft is not None
            direction = graft.precondition(graft_state, filtered, ctx).to(dtype)
        else:
            direction = kernel.precondition(precond, filtered, ctx).to(dtype)
            graft_direction = None
            if graft is not None:
                graft_direction = graft.precondition(graft_state, filtered, ctx).to(dtype)
                ratio = _block_norm(graft_direction) / (_block_norm(direction) + 1e-16)
                direction = direction * per_block(ratio, direction.ndim)
            if bucket.key in self._fallback_buckets:
                mode = per_block(opt["fallback"], direction.ndim)
                alternative = (
                    filtered
                    if graft_direction is None
                    else torch.where(mode == FALLBACK_MODES["grafting"], graft_direction, filtered)
                )
                direction = torch.where(mode > 0, alternative, direction)
        ok = alive & torch.isfinite(direction).flatten(1).all(1)
        opt["failures"] += (alive & ~ok).to(torch.int32)
        direction = torch.where(per_block(ok, direction.ndim), direction, 0.0)
        if params is not None and group["use_decoupled_weight_decay"]:
            direction = direction + wd * params
        direction = self._momentum(opt, direction, ok, group, step)
        return torch.where(per_block(ok, direction.ndim), direction, 0.0)

    def _param_map(self, bucket: Bucket) -> dict[int, Tensor | None]:
        return {m.param.index: self._params[m.param.index] for m in bucket.members}

    @staticmethod
    def _filtered_gradient(opt: dict, grad: Tensor, ctx: Context, group: dict[str, Any], step: int) -> Tensor:
        """β₁-EMA of the gradient (``beta3`` for the current step, bias-corrected), or the gradient."""
        beta1 = group["betas"][0]
        if beta1 == 0.0:
            return grad
        beta3 = beta1 if group["beta3"] < 0 else group["beta3"]
        buffer = opt.setdefault("filtered_grad", torch.zeros_like(grad))
        current = None
        if beta3 != beta1:
            current = buffer.lerp(grad, per_block(ctx.live, grad.ndim) * (1.0 - beta3))
        ema_(buffer, grad, beta1, ctx.live)
        filtered = buffer if current is None else current
        if group["use_bias_correction"]:
            filtered = filtered / (1.0 - beta3 * beta1 ** (step - 1))
        return filtered

    @staticmethod
    def _momentum(opt: dict, direction: Tensor, ok: Tensor, group: dict[str, Any], step: int) -> Tensor:
        """Heavy-ball / Nesterov momentum as ``torch.optim.SGD`` (first step: buffer = direction)."""
        mu = group["momentum"]
        if mu == 0.0:
            return direction
        if "momentum_buffer" not in opt:
            opt["momentum_buffer"] = direction.clone()
        else:
            buffer = opt["momentum_buffer"]
            new = buffer * mu + direction * (1.0 - group["dampening"])
            commit_(buffer, new, ok)
        buffer = opt["momentum_buffer"]
        return direction + mu * buffer if group["use_nesterov"] else buffer

    def _refresh(self, plan: BucketPlan, state: dict, ctx: Context, commit: Tensor) -> None:
        opt = state["opt"]
        began = time.perf_counter()
        result = plan.kernel.refresh(state["precond"], ctx, commit)
        self._refresh_clock += time.perf_counter() - began
        ok = commit & ~result.failed
        opt["refresh_step"].copy_(torch.where(ok, ctx.step, opt["refresh_step"]))
        opt["failures"] += result.failed.to(torch.int32)
        opt["refresh_request"] &= ~commit
        for i, stats in zip(plan.kernel.factor_dims, result.stats):
            if stats is None:
                continue
            commit_(opt[f"condition_number.{i}"], stats.condition_number.float(), ok)
            commit_(opt[f"min_eigenvalue.{i}"], stats.min_eigenvalue.float(), ok)
            commit_(opt[f"max_eigenvalue.{i}"], stats.max_eigenvalue.float(), ok)

    # --------------------------------------------------------------------- block-level controls

    def _locate(self, blocks: Iterable[tuple[int, int]]) -> dict[str, list[int]]:
        rows: dict[tuple[int, int], tuple[str, int]] = {}
        for plan in self.plans:
            for row, block_key in enumerate(plan.bucket.rows()):
                rows[block_key] = (plan.bucket.key, row)
        out: dict[str, list[int]] = {}
        for param_index, block_index in blocks:
            if (param_index, block_index) not in rows:
                raise KeyError(f"no block ({param_index}, {block_index}) (param_index, block_index) here")
            bucket_key, row = rows[(param_index, block_index)]
            out.setdefault(bucket_key, []).append(row)
        return out

    def set_fallback(self, blocks: Iterable[tuple[int, int]], mode: str | None) -> None:
        """Make blocks use ``"sgd"`` (the filtered gradient) or ``"grafting"`` instead of their
        preconditioner; ``None`` returns them to preconditioning. Statistics keep updating."""
        if mode not in FALLBACK_MODES:
            raise ValueError(f"mode must be one of {list(FALLBACK_MODES)}, got {mode!r}")
        self._ensure_state()
        for key, rows in self._locate(blocks).items():
            fallback = self.state[key]["opt"]["fallback"]  # type: ignore[index]
            fallback[rows] = FALLBACK_MODES[mode]
        self._sync_fallback_flags()

    def request_refresh(self, blocks: Iterable[tuple[int, int]], epsilon_scale: float | None = None) -> None:
        """Refresh these blocks at the next step (off schedule), optionally with a larger damping
        ``epsilon · epsilon_scale`` from then on."""
        self._ensure_state()
        for key, rows in self._locate(blocks).items():
            opt = self.state[key]["opt"]  # type: ignore[index]
            opt["refresh_request"][rows] = True
            if epsilon_scale is not None:
                opt["epsilon_scale"][rows] = float(epsilon_scale)
            self._refresh_requests.add(key)

    def _sync_fallback_flags(self) -> None:
        self._fallback_buckets = {
            plan.bucket.key
            for plan in self.plans
            if plan.bucket.key in self.state and bool(self.state[plan.bucket.key]["opt"]["fallback"].any())  # type: ignore[index]
        }
        self._refresh_requests = {
            plan.bucket.key
            for plan in self.plans
            if plan.bucket.key in self.state
            and bool(self.state[plan.bucket.key]["opt"]["refresh_request"].any())  # type: ignore[index]
        }

    # ------------------------------------------------------------------------------------ health

    def health(self) -> list[BlockHealth]:
        """Per-block records of what the last refreshes computed (reads state; no recomputation)."""
        records = []
        for plan in self.plans:
            if plan.bucket.key not in self.state:
                continue
            opt = {k: v.detach().cpu() for k, v in self.state[plan.bucket.key]["opt"].items()}  # type: ignore[index]
            step = int(self.param_groups[plan.bucket.group].get("step", 0))
            dims = plan.kernel.factor_dims
            for row, (pidx, bidx) in enumerate(plan.bucket.rows()):
                fallback = _FALLBACK_NAMES[int(opt["fallback"][row])]
                records.append(
                    BlockHealth(
                        param_index=pidx,
                        param_name=self._names[pidx],
                        block_index=bidx,
                        shape=plan.bucket.block_shape,
                        group=plan.bucket.group,
                        preconditioner=plan.kernel.kind,
                        step=step,
                        last_refresh_step=int(opt["refresh_step"][row]),
                        condition_numbers=tuple(float(opt[f"condition_number.{i}"][row]) for i in dims),
                        min_eigenvalues=tuple(float(opt[f"min_eigenvalue.{i}"][row]) for i in dims),
                        max_eigenvalues=tuple(float(opt[f"max_eigenvalue.{i}"][row]) for i in dims),
                        failure_count=int(opt["failures"][row]),
                        nonfinite_count=int(opt["nonfinite"][row]),
                        fallback=fallback,
                        epsilon_scale=float(opt["epsilon_scale"][row]),
                    )
                )
        return records

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Keyed by (parameter, block), independent of bucketing and of ranks; tensors and plain
        values only, so ``torch.load(..., weights_only=True)`` reads it."""
        return _checkpoint.to_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _checkpoint.load_state_dict(self, state_dict)
        self._sync_fallback_flags()


def _block_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)
