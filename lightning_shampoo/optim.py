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
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _checkpoint, compat
from ._moments import filter_description, filtered_gradient, momentum_
from ._refresh import due_blocks, refresh_bucket
from ._validation import validate_group
from .blocking import (
    Bucket,
    ParamLayout,
    block_configs,
    build_buckets,
    gather,
    layout_param,
    scatter_add_,
    skips_preconditioning,
)
from .health import FALLBACK_NAMES, BlockHealth, collect_health
from .preconditioners import (
    Context,
    Preconditioner,
    PSGDKronPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
    make_preconditioner,
)
from .preconditioners.base import per_block, row_norms

__all__ = ["FALLBACK_MODES", "Shampoo"]

#: Per-block fallback modes: what a block uses instead of its preconditioner.
FALLBACK_MODES = {name: code for code, name in FALLBACK_NAMES.items()}


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
    ``refresh_tolerance``: on scheduled refreshes, refresh only blocks whose factors drifted by
    more than this (relative) since their last refresh — see ``Preconditioner.drift``.
    ``max_bucket_numel`` caps the size of a bucket's batched tensors (see ``build_buckets``).
    ``skip_preconditioning_rank_lt``: parameters with fewer dims of size > 1 (1 for biases and
    norm scales) are stepped by ``grafting_config`` alone, with no Kronecker factors; 0 (the
    default, as Distributed Shampoo) preconditions every parameter. ``use_torch_momentum``:
    momentum and dampening as ``torch.optim.SGD`` (the first step undamped) instead of Distributed
    Shampoo's zero-started buffer; they agree without dampening. Distributed Shampoo's newer names
    (``weight_decay_type``, ``iterate_averaging_config``, ``use_pin_memory``,
    ``shampoo_pt2_compile_config``, ``distributed_config``) are translated into ours or refused,
    per group (``lightning_shampoo.compat``).
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
        refresh_tolerance: float | None = None,
        max_bucket_numel: int | None = 2**21,
        skip_preconditioning_rank_lt: int = 0,
        use_torch_momentum: bool = False,
        weight_decay_type: Any = None,
        iterate_averaging_config: Any = None,
        use_pin_memory: bool = False,
        shampoo_pt2_compile_config: Any = None,
        distributed_config: Any = None,
    ) -> None:
        self._plans: list[list[BucketPlan]] = []
        self._layouts: list[list[tuple[ParamLayout, torch.dtype, torch.device]]] = []
        self.sharded = False  # True once blocks are split across ranks (each rank holds its own)
        self._distributor: Any = None  # set by lightning_shampoo.distributed.shard_optimizer
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._use_bucketing = use_bucketing
        if max_bucket_numel is not None and max_bucket_numel < 1:
            raise ValueError(f"max_bucket_numel must be None or >= 1, got {max_bucket_numel}")
        self._max_bucket_numel = max_bucket_numel
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
            refresh_tolerance=refresh_tolerance,
            skip_preconditioning_rank_lt=skip_preconditioning_rank_lt,
            use_torch_momentum=use_torch_momentum,
            stacked=False,
        )
        defaults.update(
            compat.constructor_keys(
                defaults,
                weight_decay_type=weight_decay_type,
                iterate_averaging_config=iterate_averaging_config,
                use_pin_memory=use_pin_memory,
                shampoo_pt2_compile_config=shampoo_pt2_compile_config,
                distributed_config=distributed_config,
            )
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
                if isinstance(
                    group["preconditioner_config"],
                    SpectralDescentPreconditionerConfig | PSGDKronPreconditionerConfig,
                )
                else 1,
            )
            layouts.append((layout, p.dtype, p.device))
        self._layouts.append(layouts)
        return self._make_plans(g, group, layouts)

    def _make_plans(self, g: int, group: dict[str, Any], layouts: list) -> list[BucketPlan]:
        plans = []
        for bucket in build_buckets(
            g,
            layouts,
            bucketing=self._use_bucketing,
            owns=self._owns,
            max_numel=self._max_bucket_numel,
            tag=lambda layout: skips_preconditioning(group, layout),
        ):
            where = "parameter(s) " + ", ".join(dict.fromkeys(m.param.name for m in bucket.members))
            config, graft = block_configs(group, bucket.members[0].param)
            kernel = make_preconditioner(config, bucket.block_shape, where)
            graft_kernel = None if graft is None else make_preconditioner(graft, bucket.block_shape, where)
            plans.append(BucketPlan(bucket, kernel, graft_kernel))
        return plans

    @property
    def plans(self) -> list[BucketPlan]:
        """The buckets this process holds state for (all of them unless sharded)."""
        return [plan for plans in self._plans for plan in plans]

    def block_keys(self) -> list[tuple[int, int]]:
        """Every block of every parameter, ``(param_index, block_index)``, in a fixed order that is
        the same on every rank (sharded or not)."""
        return [
            (layout.index, block)
            for layouts in self._layouts
            for layout, _, _ in layouts
            for block in range(layout.num_blocks)
        ]

    def param_name(self, index: int) -> str:
        return self._names[index]

    def _ensure_state(self) -> None:
        """Allocate bucket state lazily (after the model has reached its device), as torch.optim does."""
        for plan in self.plans:
            if plan.bucket.key in self.state:
                continue
            first = self._param(plan.bucket.members[0].param.index)
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
        if self._distributor is not None:
            self._distributor.begin_step()
        with _full_precision_matmul():
            for g, group in enumerate(self.param_groups):
                self._step_group(g, group)
        if self._distributor is not None:
            self._distributor.finish_step()
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
            if direction is not None:  # without gradients, pending refresh requests wait
                self._refresh_requests.discard(plan.bucket.key)
                self._apply(plan, direction, group["lr"])
        if self._refresh_clock:
            self.refresh_seconds[g] = self._refresh_clock

    def _apply(self, plan: BucketPlan, direction: Tensor, lr: float | Tensor) -> None:
        """Add the update ``U = -lr · P`` to the parameters. ``U`` is formed first (not fused into
        the add) so a sharded run, which communicates ``U``, applies bitwise the same values."""
        update = direction.mul_(-lr)
        if self._distributor is not None:
            self._distributor.stage(plan, update)
        else:
            scatter_add_(plan.bucket, self._param_map(plan.bucket), update, 1.0)

    def _grad(self, index: int) -> Tensor | None:
        """Gradient of parameter ``index`` as the pipeline sees it (a distributor may substitute
        a gathered full tensor for a sharded one)."""
        if self._distributor is not None:
            return self._distributor.grad(index)
        return self._params[index].grad

    def _param(self, index: int) -> Tensor:
        if self._distributor is not None:
            return self._distributor.param(index)
        return self._params[index]

    def shard(self, process_group: Any = None, **options: Any) -> None:
        """Split the preconditioner blocks across the ranks of ``process_group``: each rank keeps
        state for and computes only its blocks, and one all-gather shares the updates. See
        :func:`lightning_shampoo.distributed.shard_optimizer` for the options."""
        from .distributed import shard_optimizer

        shard_optimizer(self, process_group, **options)

    def _replan(self) -> None:
        """Rebuild every group's buckets (after ``_owns`` or layout options changed)."""
        for g, group in enumerate(self.param_groups):
            self._plans[g] = self._make_plans(g, group, self._layouts[g])

    def _direction(
        self, plan: BucketPlan, state: dict, group: dict[str, Any], step: int, start: float, due: bool
    ) -> Tensor | None:
        """The search direction ``P`` of one bucket (zero rows for skipped blocks)."""
        bucket, opt = plan.bucket, state["opt"]
        grads = {m.param.index: self._grad(m.param.index) for m in bucket.members}
        if all(g is None for g in grads.values()):
            return None
        first = self._param(bucket.members[0].param.index)
        dtype = torch.promote_types(first.dtype, torch.float32)
        grad = gather(bucket, grads, dtype=dtype, device=first.device)
        present = torch.ones(bucket.size, dtype=torch.bool, device=first.device)
        for m in bucket.members:
            if grads[m.param.index] is None:
                present[m.offset : m.offset + m.region.count] = False
        finite = torch.isfinite(row_norms(grad))
        opt["nonfinite"] += (present & ~finite).to(torch.int32)
        alive = present & finite
        grad.masked_fill_(per_block(~alive, grad.ndim), 0.0)
        wd = group["weight_decay"]
        needs_params = wd != 0.0
        params = (
            gather(bucket, self._param_map(bucket), dtype=dtype, device=first.device)
            if needs_params
            else None
        )
        if params is not None and not group["use_decoupled_weight_decay"]:
            grad.add_(params * per_block(alive.to(dtype), grad.ndim), alpha=wd)
        beta2 = group["betas"][1]
        ctx = Context(
            step=step,
            beta2=beta2,
            epsilon=group["epsilon"],
            use_bias_correction=group["use_bias_correction"],
            live=alive.to(dtype),
            epsilon_scale=opt["epsilon_scale"],
            **filter_description(group, step),
        )
        kernel, graft = plan.kernel, plan.graft
        precond, graft_state = state["precond"], state["graft"]
        kernel.update(precond, grad, ctx)
        if graft is not None:
            graft.update(graft_state, grad, ctx)
        requested = bucket.key in self._refresh_requests
        if kernel.amortized and (due or requested):
            commit = opt["refresh_request"].clone()
            if due:
                commit |= due_blocks(plan, state, ctx, group.get("refresh_tolerance"))
            self._refresh_clock += refresh_bucket(plan, state, ctx, commit)
        kernel.update_after_refresh(precond, grad, ctx)

        filtered = filtered_gradient(opt, grad, ctx, group)
        use_grafting_method = step < start and graft is not None
        if use_grafting_method:
            assert graft is not None
            direction = graft.precondition(graft_state, filtered, ctx).to(dtype)
        else:
            direction = kernel.precondition(precond, filtered, ctx).to(dtype)
            graft_direction = None
            if graft is not None:
                graft_direction = graft.precondition(graft_state, filtered, ctx).to(dtype)
                ratio = row_norms(graft_direction) / (row_norms(direction) + 1e-16)
                direction = _owned(direction, filtered).mul_(per_block(ratio, direction.ndim))
            if bucket.key in self._fallback_buckets:
                mode = per_block(opt["fallback"], direction.ndim)
                alternative = (
                    filtered
                    if graft_direction is None
                    else torch.where(mode == FALLBACK_MODES["grafting"], graft_direction, filtered)
                )
                direction = torch.where(mode > 0, alternative, direction)
        ok = alive & torch.isfinite(row_norms(direction))
        opt["failures"] += (alive & ~ok).to(torch.int32)
        skipped = per_block(~ok, direction.ndim)
        direction = _owned(direction, filtered)
        if params is not None and group["use_decoupled_weight_decay"]:
            direction.add_(params, alpha=wd)
        direction.masked_fill_(skipped, 0.0)  # before momentum: skipped rows leave it unchanged
        if group["momentum"] != 0.0:
            direction = momentum_(opt, direction, ok, group, step)
            direction.masked_fill_(skipped, 0.0)
        return direction

    def _param_map(self, bucket: Bucket) -> dict[int, Tensor]:
        return {m.param.index: self._param(m.param.index) for m in bucket.members}

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
        return collect_health(self)

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Keyed by (parameter, block), independent of bucketing and of ranks; tensors and plain
        values only, so ``torch.load(..., weights_only=True)`` reads it."""
        return _checkpoint.to_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _checkpoint.load_state_dict(self, state_dict)
        self._sync_fallback_flags()


def _owned(direction: Tensor, filtered: Tensor) -> Tensor:
    """``direction`` safe to modify in place: a kernel may return its input (SGD), which can be
    the filtered-gradient buffer in the optimizer state."""
    return direction.clone() if direction is filtered else direction
