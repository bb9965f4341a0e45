"""``Shampoo``: param groups → one block plan → a workspace → the step's stages.

One step, for every lane (buckets of one dtype and device) of this rank's buckets::

    gather → L2 decay → guard → EMA table → statistics → refresh (when due) → after-refresh
           → filter → direction (precondition, graft, fallback) → weight decay → momentum
           → learning rate → apply (or hand the updates to the distributor)

Everything is batched over buckets (elementwise work: one foreach call per lane); nothing on this
path synchronises with the device. Refreshes (eigendecompositions) may synchronise: they are
amortized. Argument names, defaults and semantics follow Meta's Distributed Shampoo.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checkpoint, _stages, compat
from ._checks import clamp_epsilon_scale
from ._refresh import refresh_lane
from ._validation import check_grad, validate_constructor_options, validate_group, validate_params
from ._workspace import Lane, Workspace, param_view
from .blocking import layout_param
from .health import FALLBACK_CODES, BlockHealth, collect_health, factor_spectra
from .plan import BlockPlan, Bucket, CostModel, GroupBlocks, build_plan
from .preconditioners import RootInvShampooPreconditionerConfig

__all__ = ["FALLBACK_MODES", "Shampoo"]

#: Per-block fallback modes: what a block uses instead of its preconditioner.
FALLBACK_MODES = {name: code for name, code in FALLBACK_CODES.items()}


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
    ``max_bucket_numel`` caps the size of a bucket's batched tensors (see ``plan.build_plan``).
    ``skip_preconditioning_rank_lt``: parameters with fewer dims of size > 1 (1 for biases and
    norm scales) are stepped by ``grafting_config`` alone, with no Kronecker factors; 0 (the
    default, as Distributed Shampoo) preconditions every parameter.
    ``target_parameter_dimensionality`` (Distributed Shampoo's): dims are merged only while more
    than this many remain (``math.inf``: never merged); 2 keeps a matrix a matrix.
    ``max_factor_dim`` / ``max_factor_ratio``: a block dim larger than ``max_factor_dim``, or whose
    factor would hold more than ``max_factor_ratio`` times the block's numbers (``d² > ratio·numel``:
    a vocabulary side), gets no Kronecker factor — identity along it for Shampoo, the original
    basis for SOAP (``factoring.py``); ``math.inf`` (the default, Distributed Shampoo's): every dim.
    ``use_torch_momentum``: momentum and dampening as ``torch.optim.SGD`` (the first step
    undamped) instead of Distributed Shampoo's zero-started buffer; they agree without dampening.
    Distributed Shampoo's newer names (``weight_decay_type``, ``iterate_averaging_config``,
    ``use_pin_memory``, ``shampoo_pt2_compile_config``, ``distributed_config``) are translated
    into ours or refused, per group (``lightning_shampoo.compat``).
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
        target_parameter_dimensionality: int | float = 1,
        use_torch_momentum: bool = False,
        max_factor_dim: int | float = math.inf,
        max_factor_ratio: float = math.inf,
        weight_decay_type: Any = None,
        iterate_averaging_config: Any = None,
        use_pin_memory: bool = False,
        shampoo_pt2_compile_config: Any = None,
        distributed_config: Any = None,
    ) -> None:
        validate_constructor_options(use_bucketing, max_bucket_numel)
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._groups: list[GroupBlocks] = []
        self._use_bucketing = use_bucketing
        self._max_bucket_numel = max_bucket_numel
        self._plan: BlockPlan | None = None
        self._rank = 0
        self.sharded = False
        self._distributor: Any = None
        self._workspace: Workspace | None = None
        self._fallback: set[str] = set()  # host mirrors of per-block flags (no sync to read them)
        self._requests: set[str] = set()
        self._missed: set[str] = set()
        self.refresh_seconds: dict[int, float] = {}  # wall time of each group's last refresh
        self.skipped_updates: dict[int, int] = {}  # steps whose lr was not a finite number >= 0
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, tuple | list) else betas,
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
            target_parameter_dimensionality=target_parameter_dimensionality,
            use_torch_momentum=use_torch_momentum,
            max_factor_dim=max_factor_dim,
            max_factor_ratio=max_factor_ratio,
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
        param_group = validate_params(param_group, self.defaults, self._params, self._names)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(group)
            self._groups.append(self._group_blocks(len(self.param_groups) - 1, group))
            self._set_plan(self.build_plan(world_size=self._world_size(), owners=self._owners()), self._rank)
        except Exception:
            self.param_groups.pop()
            del self._params[len(self._params) - len(group["params"]) :]
            del self._names[len(self._names) - len(group["params"]) :]
            if len(self._groups) > len(self.param_groups):
                self._groups.pop()
            raise

    def _group_blocks(self, g: int, group: dict[str, Any]) -> GroupBlocks:
        names = group.get("param_names") or [None] * len(group["params"])
        target = group["target_parameter_dimensionality"]
        config = group["preconditioner_config"]
        layouts, dtypes, devices = [], [], []
        for p, name in zip(group["params"], names):
            index = len(self._params)
            self._params.append(p)
            self._names.append(name or f"param{index}")
            if p.numel() == 0:
                continue
            layouts.append(
                layout_param(
                    index,
                    self._names[-1],
                    p.shape,
                    group["max_preconditioner_dim"],
                    merge=group["use_merge_dims"] and p.is_contiguous() and target != math.inf,
                    stacked=group["stacked"],
                    min_order=max(config.min_block_order, 1 if target == math.inf else int(target)),
                )
            )
            dtypes.append(p.dtype)
            devices.append(str(p.device))
        return GroupBlocks(
            index=g,
            layouts=tuple(layouts),
            dtypes=tuple(dtypes),
            devices=tuple(devices),
            preconditioner_config=config,
            grafting_config=group["grafting_config"],
            skip_preconditioning_rank_lt=group["skip_preconditioning_rank_lt"],
            precondition_frequency=group["precondition_frequency"],
            max_factor_dim=group["max_factor_dim"],
            max_factor_ratio=group["max_factor_ratio"],
        )

    def build_plan(
        self,
        world_size: int = 1,
        cost_model: CostModel | None = None,
        owners: Mapping[tuple[int, int], int] | None = None,
    ) -> BlockPlan:
        """The block plan of this optimizer's groups over ``world_size`` ranks (``owners`` keeps
        earlier assignments). Pure: every rank builds the same one."""
        return build_plan(
            self._groups,
            world_size=world_size,
            bucketing=self._use_bucketing,
            max_bucket_numel=self._max_bucket_numel,
            cost_model=cost_model,
            owners=owners,
        )

    def use_plan(self, plan: BlockPlan, rank: int = 0) -> None:
        """Hold state for, and step, only ``rank``'s buckets of ``plan`` (existing state moves to
        its new buckets; other ranks' blocks are dropped). ``shard()`` does this with a process
        group; without a distributor, updates of other ranks' blocks are simply not applied,
        which emulates a rank (tests) or leaves communication to the caller."""
        saved = self.state_dict() if len(self.state) else None
        self._set_plan(plan, rank)
        self.state.clear()
        self._workspace = None
        if saved is not None:
            self.load_state_dict(saved)

    def _set_plan(self, plan: BlockPlan, rank: int) -> None:
        self._plan, self._rank, self._workspace = plan, rank, None
        self.sharded = plan.world_size > 1  # blocks are split across ranks (each holds its own)
        if self._distributor is not None:
            self._distributor.plan = plan

    def _world_size(self) -> int:
        return 1 if self._plan is None else self._plan.world_size

    def _owners(self) -> dict[tuple[int, int], int] | None:
        return None if self._plan is None or self._plan.world_size == 1 else dict(self._plan.ownership.owners)

    @property
    def plan(self) -> BlockPlan:
        assert self._plan is not None, "an optimizer with no param group has no plan"
        return self._plan

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """The buckets this process holds state for (all of them unless sharded)."""
        return () if self._plan is None else self._plan.local(self._rank)

    @property
    def distributor(self) -> Any:
        """The distributor when sharded over a process group (``shard()``), else ``None``."""
        return self._distributor

    def block_keys(self) -> list[tuple[int, int]]:
        """Every block of every parameter, ``(param_index, block_index)``, in a fixed order that is
        the same on every rank (sharded or not)."""
        return [] if self._plan is None else self._plan.block_keys()

    def param_name(self, index: int) -> str:
        return self._names[index]

    def _ensure_workspace(self) -> Workspace:
        """Allocate the declared state (on the parameters' devices, as torch.optim does, at the
        first step or load) and the step's buffers; rebuilt only when stale (host checks)."""
        ws = self._workspace
        if ws is None or not ws.valid_for(self.state, self.param_groups):  # type: ignore[arg-type]
            params = self._distributor.parameters() if self._distributor is not None else self._params
            ws = self._workspace = Workspace(self.buckets, self.state, params, self.param_groups)  # type: ignore[arg-type]
        return ws

    # ------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` (as Lightning passes) runs under ``enable_grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = [self._group_step(g, group) for g, group in enumerate(self.param_groups)]
        if self._distributor is not None:
            grads = self._distributor.gradients()
            params = self._distributor.parameters()
        else:
            grads = [check_grad(name, p.grad) for name, p in zip(self._names, self._params)]
            params = self._params
        ws = self._ensure_workspace()
        seconds = dict.fromkeys(range(len(steps)), 0.0)
        with _full_precision_matmul():
            for lane in ws.lanes:
                self._step_lane(lane, grads, params, steps, seconds)
        for g, spent in seconds.items():
            if spent:
                self.refresh_seconds[g] = spent
        if self._distributor is not None:
            device = ws.lanes[0].device if ws.lanes else self._params[0].device
            self._distributor.finish(ws.lanes, device)
        return loss

    def _group_step(self, g: int, group: dict[str, Any]) -> _stages.GroupStep:
        step = group["step"] = int(group.get("step", 0)) + 1
        lr = group["lr"]
        if not isinstance(lr, Tensor) and not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0):
            # Written into param_groups after construction (a scheduler, a user): this group's
            # parameters are not updated this step; counted, and said once.
            self.skipped_updates[g] = self.skipped_updates.get(g, 0) + 1
            if self.skipped_updates[g] == 1:
                warnings.warn(
                    f"param group {g}: lr={lr!r} is not a finite number >= 0; its update is skipped",
                    stacklevel=3,
                )
            lr = 0.0
        return _stages.GroupStep(
            step=step,
            lr=lr,
            grafting_only=step < group["start_preconditioning_step"],
            weight_decay=group["weight_decay"],
            decoupled=group["use_decoupled_weight_decay"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["use_nesterov"],
            torch_momentum=group["use_torch_momentum"],
        )

    def _step_lane(
        self,
        lane: Lane,
        grads: list[Tensor | None],
        params: list[Tensor],
        steps: list[_stages.GroupStep],
        seconds: dict[int, float],
    ) -> None:
        persistent = params is self._params

        def views(link: Any) -> Tensor:
            return param_view(lane, link, params, persistent)

        present, all_present = _stages.gather(lane, grads)
        _stages.l2_decay(lane, steps, views)
        _stages.guard(lane, present, all_present)
        _stages.ema_table(lane)
        for slot in lane.slots:
            slot.ctx.step = slot.graft_ctx.step = steps[slot.bucket.group].step
        _stages.statistics(lane)
        refresh_lane(
            lane, self.param_groups, steps, present, all_present, self._requests, self._missed, seconds
        )
        _stages.after_refresh(lane)
        _stages.filter_moments(lane)
        _stages.direction(lane, steps, frozenset(self._fallback))
        _stages.weight_decay(lane, steps, views)
        _stages.momentum(lane, steps)
        _stages.learning_rate(lane, steps)
        if self._distributor is None:
            _stages.apply_updates(lane, views)

    # --------------------------------------------------------------------- block-level controls

    def _locate(self, blocks: Iterable[tuple[int, int]]) -> dict[str, list[int]]:
        rows: dict[tuple[int, int], tuple[str, int]] = {}
        for bucket in self.buckets:
            for row, block_key in enumerate(bucket.rows()):
                rows[block_key] = (bucket.key, row)
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
        self._ensure_workspace()
        for key, rows in self._locate(blocks).items():
            self.state[key]["status"]["fallback"][rows] = FALLBACK_MODES[mode]  # type: ignore[index]
        self._sync_host_flags()

    def request_refresh(self, blocks: Iterable[tuple[int, int]], epsilon_scale: float | None = None) -> None:
        """Refresh these blocks at the next step (off schedule), optionally with a larger damping
        ``epsilon · epsilon_scale`` from then on."""
        self._ensure_workspace()
        for key, rows in self._locate(blocks).items():
            status = self.state[key]["status"]  # type: ignore[index]
            status["refresh_request"][rows] = True
            if epsilon_scale is not None:
                status["epsilon_scale"][rows] = clamp_epsilon_scale(epsilon_scale)
            self._requests.add(key)

    def _sync_host_flags(self) -> None:
        """Read the per-block flags into their host mirrors (a device read: off the step)."""
        held = [(b.key, self.state[b.key]["status"]) for b in self.buckets if b.key in self.state]  # type: ignore[index]
        self._fallback = {k for k, s in held if bool(s["fallback"].any())}
        self._requests = {k for k, s in held if bool(s["refresh_request"].any())}
        self._missed = {k for k, s in held if bool(s["refresh_missed"].any())}

    # ------------------------------------------------------------------------ health and state

    def _steps(self) -> list[int]:
        return [int(group.get("step", 0)) for group in self.param_groups]

    def health(self) -> list[BlockHealth]:
        """Per-block records of what the last refreshes computed (reads state; no recomputation)."""
        return collect_health(self.buckets, self.state, self._names, self._steps())  # type: ignore[arg-type]

    def factor_spectra(self) -> dict[tuple[str, int], Tensor]:
        """Eigenvalues of each layer's bias-corrected factors (this rank's blocks)."""
        return factor_spectra(self.buckets, self.state, self._names, self.param_groups)  # type: ignore[arg-type]

    def refresh_counts(self) -> tuple[int, int]:
        """Block refreshes done and skipped (by ``refresh_tolerance``) on this rank so far."""
        done = skipped = 0
        for bucket in self.buckets:
            status = self.state.get(bucket.key, {}).get("status")  # type: ignore[call-overload]
            if status is not None:
                done += int(status["refreshes"].sum())
                skipped += int(status["refreshes_skipped"].sum())
        return done, skipped

    def block_state(self, key: tuple[int, int]) -> dict[str, Tensor]:
        """One block's state ``{"section.name": tensor}`` (views of its bucket rows)."""
        self._ensure_workspace()
        ((bucket_key, (row,)),) = self._locate([key]).items()
        return {
            f"{section}.{name}": tensor[row]
            for section, tensors in self.state[bucket_key].items()  # type: ignore[index]
            for name, tensor in tensors.items()
        }

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (every declared tensor, each counted once;
        the step's reusable buffers are not state and not counted)."""
        return sum(self.state_bytes_by_section().values())

    def state_bytes_by_section(self) -> dict[str, int]:
        """``state_bytes()`` per state section (``precond``, ``graft``, ``moments``, ``status``);
        a storage shared by several entries (the per-block ``status`` vectors of a lane) counts
        once, in the first section that holds it."""
        seen: set[int] = set()
        out: dict[str, int] = {}
        for sections in self.state.values():
            for section, tensors in sections.items():
                for tensor in tensors.values():
                    base = tensor if tensor._base is None else tensor._base
                    out.setdefault(section, 0)
                    if id(base) not in seen:
                        seen.add(id(base))
                        out[section] += base.numel() * base.element_size()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Keyed by (parameter, block), independent of bucketing and of ranks; tensors and plain
        values only, so ``torch.load(..., weights_only=True)`` reads it."""
        return {
            "state": _checkpoint.state_rows(self.buckets, self.state),  # type: ignore[arg-type]
            "param_groups": _checkpoint.saved_groups(self.param_groups),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check everything first, then write: a rejected checkpoint leaves the optimizer untouched.
        A block whose saved statistics are not finite starts them afresh (with a warning)."""
        saved_id = _checkpoint.check_loadable(state_dict, self.param_groups)
        self._ensure_workspace()
        _checkpoint.load_into(
            state_dict,
            saved_id,
            self.buckets,
            self.state,  # type: ignore[arg-type]
            self._names,
            self.param_groups,
            self._params,
            partial=self.sharded,
        )
        self._workspace = None  # group values may have changed the workspace's constants
        self._sync_host_flags()

    # ---------------------------------------------------------------------------- distribution

    def shard(
        self,
        process_group: Any = None,
        communication_dtype: torch.dtype = torch.float32,
        *,
        cost_model: CostModel | None = None,
    ) -> Any:
        """Split the preconditioner blocks across the ranks of ``process_group`` (a
        ``ProcessGroup``, ``None`` for the default group, a 1-D ``DeviceMesh`` or a Lightning
        strategy): each rank keeps state for and computes only its blocks, and one all-gather in
        ``communication_dtype`` (fp32 keeps sharded == single device bitwise; bf16 halves the
        traffic) shares the updates. Existing state follows its blocks. With one rank and no
        ``DTensor`` parameters there is nothing to do and ``None`` is returned. Every rank must
        call it; it first checks (one collective) that every rank built the same plan."""
        from .distributed import (
            COMMUNICATION_DTYPES,
            check_same_plan,
            is_dtensor,
            make_distributor,
            resolve_group,
        )

        if communication_dtype not in COMMUNICATION_DTYPES:
            raise ValueError(f"communication_dtype must be a floating dtype, got {communication_dtype}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("shard() needs an initialised torch.distributed process group")
        group = resolve_group(process_group)
        if self._distributor is not None:
            if self._distributor.group is group:
                return self._distributor
            raise RuntimeError("the optimizer is already sharded over another process group")
        fsdp = any(is_dtensor(p) for p in self._params)
        world_size = dist.get_world_size(group)
        if world_size == 1 and not fsdp:
            return None
        plan = self.build_plan(world_size=world_size, cost_model=cost_model)
        check_same_plan(plan, group)
        decayed = {i for g in self.param_groups if g["weight_decay"] != 0.0 for i in self._indices(g)}
        distributor = make_distributor(self._params, plan, group, communication_dtype, decayed)
        self.use_plan(plan, dist.get_rank(group))
        self._distributor = distributor
        self._workspace = None
        return distributor

    def _indices(self, group: dict[str, Any]) -> list[int]:
        ids = {id(p) for p in group["params"]}
        return [i for i, p in enumerate(self._params) if id(p) in ids]
