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

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _averaging_stage, _checkpoint, _controls, _foreign, _stages, compat
from ._lane_step import LaneStepper
from ._planned import PlannedOptimizer
from ._refresh import refresh_lane, refresh_pending
from ._validation import check_grad, validate_constructor_options
from ._workspace import Lane
from .health import FALLBACK_CODES, BlockHealth, collect_health, factor_spectra
from .plan import CostModel
from .preconditioners import RootInvShampooPreconditionerConfig

__all__ = ["FALLBACK_MODES", "Shampoo"]

log = logging.getLogger(__name__)

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


class Shampoo(PlannedOptimizer):
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
    ``shampoo_pt2_compile_config`` (a ``ShampooPT2CompileConfig``, as Distributed Shampoo's):
    plain steps run as one ``torch.compile``d graph per lane, refresh steps as two around the
    eager refresh (``pt2``, ``_lane_step``).
    ``refresh_stagger``: spread the refreshes over the ``precondition_frequency`` interval —
    block ``b`` refreshes on the steps ``≡ φ_b (mod frequency)`` after ``start_preconditioning_step``
    (where every block refreshes), phases balanced by refresh cost (``_refresh.block_phases``) —
    so no step pays for every block's refresh; the same number of refreshes. Off (Distributed
    Shampoo's schedule) by default; ``configure_shampoo``'s presets and ``ShampooCallback`` set it.
    Distributed Shampoo's newer names (``weight_decay_type``, ``iterate_averaging_config``,
    ``use_pin_memory``, ``distributed_config``) are translated into ours or refused, per group
    (``lightning_shampoo.compat``).
    ``iterate_averaging_config``: ``GeneralizedPrimalAveragingConfig`` or ``ScheduleFreeConfig``
    keep the base iterates ``z`` per block and hold the gradient point ``y`` in the parameters;
    ``eval()`` puts the averaged ``x`` there (evaluation, checkpoints) and ``train()`` puts
    ``y`` back bitwise (``ShampooCallback`` calls them from Lightning's hooks).
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
        refresh_stagger: bool = False,
        max_factor_dim: int | float = math.inf,
        max_factor_ratio: float = math.inf,
        weight_decay_type: Any = None,
        iterate_averaging_config: Any = None,
        use_pin_memory: bool = False,
        shampoo_pt2_compile_config: Any = None,
        distributed_config: Any = None,
    ) -> None:
        compile_config = validate_constructor_options(
            use_bucketing, max_bucket_numel, shampoo_pt2_compile_config
        )
        self._stepper = LaneStepper(compile_config)
        self._fallback: set[str] = set()  # host mirrors of per-block flags (no sync to read them)
        self._requests: set[str] = set()
        self._missed: set[str] = set()
        self.refresh_seconds: dict[int, float] = {}  # wall time of each group's last refresh
        self.skipped_updates: dict[int, int] = {}  # steps whose lr was not a finite number >= 0
        #: Who built this optimizer (``ShampooCallback``, ``configure_shampoo``): saved with its
        #: checkpoints, so that loading one into a differently built optimizer says so.
        self.origin: str | None = None
        #: Set when ``load_state_dict`` took another optimizer's state (``_foreign``): what it did.
        self.resume_note: str | None = None
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
            refresh_stagger=refresh_stagger,
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
                distributed_config=distributed_config,
            )
        )
        super().__init__(params, defaults, use_bucketing=use_bucketing, max_bucket_numel=max_bucket_numel)

    # ------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` (as Lightning passes) runs under ``enable_grad``."""
        loss = None
        self._sync_groups()
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
        averaging = group.get("iterate_averaging_config")
        if averaging is not None and not group.get("train_mode", True):
            raise RuntimeError(
                f"param group {g}: step() while the parameters hold the averaged weights "
                "(optimizer.eval()); call optimizer.train() before training"
            )
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
            averaging=averaging,
        )

    def _step_lane(
        self,
        lane: Lane,
        grads: list[Tensor | None],
        params: list[Tensor],
        steps: list[_stages.GroupStep],
        seconds: dict[int, float],
    ) -> None:
        for slot in lane.slots:
            slot.ctx.step = slot.graft_ctx.step = steps[slot.bucket.group].step

        def refresh(present: torch.Tensor, all_present: bool) -> None:
            refresh_lane(
                lane,
                self.param_groups,
                steps,
                present,
                all_present,
                self._requests,
                self._missed,
                seconds,
                self._schedule,
            )

        def pending() -> bool:
            return refresh_pending(
                lane, self.param_groups, steps, self._requests, self._missed, self._schedule
            )

        self._stepper.run(
            lane,
            grads,
            params,
            steps,
            frozenset(self._fallback),
            params is self._params,
            self._distributor is None,
            refresh,
            pending,
        )

    @property
    def compile_config(self) -> Any:
        """The ``ShampooPT2CompileConfig`` plain steps are compiled with (``None``: eager)."""
        return self._stepper.config

    @property
    def compiled_steps(self) -> int:
        """Lane steps run by a compiled graph so far (refreshes and warm-up steps are eager)."""
        return self._stepper.compiled_steps

    # ---------------------------------------------------------------------- iterate averaging

    @property
    def averaging(self) -> bool:
        """Whether any param group runs iterate averaging (GPA or Schedule-Free)."""
        return any(g.get("iterate_averaging_config") is not None for g in self.param_groups)

    @property
    def training(self) -> bool:
        """False while some averaging group's parameters hold the averaged weights (``eval()``)."""
        return all(g.get("train_mode", True) for g in self.param_groups)

    @torch.no_grad()
    def eval(self) -> None:
        """Averaging groups' parameters ← the averaged weights ``x`` (their train point ``y`` is
        saved in the state). No-op for groups without averaging or already in eval mode. Under
        a distributor every rank must call it (one all-gather)."""
        self._swap(to_eval=True)

    @torch.no_grad()
    def train(self) -> None:
        """Averaging groups' parameters ← the train point ``y`` saved by ``eval()``, bitwise."""
        self._swap(to_eval=False)

    def _swap(self, to_eval: bool) -> None:
        if all(g.get("train_mode", True) != to_eval for g in self.param_groups if "train_mode" in g):
            return  # nothing to move (a host check: the Lightning hooks call this every batch)
        ws = self._ensure_workspace()
        params = self._distributor.parameters() if self._distributor is not None else self._params
        _averaging_stage.swap(
            ws.lanes, self.param_groups, params, params is self._params, self._distributor, to_eval
        )

    # --------------------------------------------------------------------- block-level controls

    def _locate(self, blocks: Iterable[tuple[int, int]]) -> dict[str, list[int]]:
        self._ensure_workspace()
        return _controls.locate(self.buckets, blocks)

    def set_fallback(self, blocks: Iterable[tuple[int, int]], mode: str | None) -> None:
        """Make blocks use ``"sgd"`` (the filtered gradient) or ``"grafting"`` instead of their
        preconditioner; ``None`` returns them to preconditioning. Statistics keep updating."""
        if mode not in FALLBACK_MODES:
            raise ValueError(f"mode must be one of {list(FALLBACK_MODES)}, got {mode!r}")
        _controls.mark_fallback(self.state, self._locate(blocks), FALLBACK_MODES[mode])  # type: ignore[arg-type]
        self._sync_host_flags()

    def request_refresh(self, blocks: Iterable[tuple[int, int]], epsilon_scale: float | None = None) -> None:
        """Refresh these blocks at the next step (off schedule), optionally with a larger damping
        ``epsilon · epsilon_scale`` from then on."""
        located = self._locate(blocks)
        _controls.mark_refresh(self.state, located, epsilon_scale)  # type: ignore[arg-type]
        self._requests.update(located)

    def refresh_phases(self, group: int = 0) -> dict[tuple[int, int], int]:
        """Each amortized block's refresh phase in param group ``group`` at its current
        ``precondition_frequency`` (all 0 unless ``refresh_stagger``): block ``b`` refreshes on
        the steps ``≡ phase (mod frequency)`` past ``start_preconditioning_step``."""
        frequency = self.param_groups[group]["precondition_frequency"]
        phases = self._schedule.phases(group, frequency)
        if not self.param_groups[group].get("refresh_stagger", False) or frequency == 1:
            return dict.fromkeys(phases, 0)
        return phases

    def _sync_host_flags(self) -> None:
        """Read the per-block flags into their host mirrors (a device read: off the step)."""
        self._fallback, self._requests, self._missed = _controls.host_flags(self.buckets, self.state)  # type: ignore[arg-type]

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
        return _controls.refresh_counts(self.buckets, self.state)  # type: ignore[arg-type]

    def block_state(self, key: tuple[int, int]) -> dict[str, Tensor]:
        """One block's state ``{"section.name": tensor}`` (views of its bucket rows)."""
        ((bucket_key, (row,)),) = self._locate([key]).items()
        return _controls.block_state(self.state, bucket_key, row)  # type: ignore[arg-type]

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (every declared tensor, each counted once;
        the step's reusable buffers are not state and not counted)."""
        return sum(self.state_bytes_by_section().values())

    def state_bytes_by_section(self) -> dict[str, int]:
        """``state_bytes()`` per state section (``precond``, ``graft``, ``moments``, ``status``)."""
        return _controls.state_bytes_by_section(self.state)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """Keyed by (parameter, block), independent of bucketing and of ranks; tensors and plain
        values only, so ``torch.load(..., weights_only=True)`` reads it. ``FORMAT_KEY`` marks it
        as Shampoo's and names its ``origin``."""
        self._sync_groups()
        return {
            "state": _checkpoint.state_rows(self.buckets, self.state),  # type: ignore[arg-type]
            "param_groups": _checkpoint.saved_groups(self.param_groups),
            _foreign.FORMAT_KEY: _foreign.marker(self.origin),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check everything first, then write: a rejected checkpoint leaves the optimizer untouched.
        A block whose saved statistics are not finite starts them afresh (with a warning). A
        ``torch.optim`` optimizer's state (AdamW, Adam, SGD, RMSprop, Adagrad: a project that
        added ``ShampooCallback`` to resume) is taken where it maps (``_foreign``): the grafting
        state from its moments, the preconditioner statistics fresh; ``resume_note`` says so."""
        self._sync_groups()
        fresh = _foreign.is_foreign(state_dict)
        if fresh:
            converted = _foreign.convert(state_dict, self.param_groups, self.plan)
            state_dict = converted.state_dict
        try:
            saved_id = _checkpoint.check_loadable(state_dict, self.param_groups)
            if fresh:
                self.state.clear()  # what the foreign state does not give starts from its initial value
                self._workspace = None
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
                fresh=fresh,
            )
        except ValueError as error:
            hint = _foreign.origin_hint(state_dict, self.origin)
            if hint:
                raise ValueError(f"{error}{hint}") from error
            raise
        self._workspace = None  # group values may have changed the workspace's constants
        self._sync_host_flags()
        if fresh:
            self.resume_note = converted.note
            log.info(converted.note)

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
        if fsdp and self.averaging:
            raise ValueError(
                "iterate_averaging_config (GPA / Schedule-Free) is not supported with FSDP parameters yet; "
                "use strategy='shampoo_ddp' or ClassicMomentumConfig"
            )
        world_size = dist.get_world_size(group)
        if world_size == 1 and not fsdp:
            return None
        plan = self.build_plan(world_size=world_size, cost_model=cost_model)
        check_same_plan(plan, group)
        distributor = make_distributor(self._params, plan, group, communication_dtype, self._decayed())
        self.use_plan(plan, dist.get_rank(group))
        self._distributor = distributor
        self._workspace = None
        return distributor
