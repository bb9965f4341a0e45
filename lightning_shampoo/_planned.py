"""The param-group → block-plan half of ``Shampoo``: groups added at any time (named or not,
completed like their siblings), the one block plan built from them, which buckets this rank
holds, and the workspace allocated for them. ``optim.Shampoo`` adds the step, the state's
controls, checkpoints and sharding on top."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import _groups, compat
from ._refresh import RefreshSchedule
from ._validation import validate_group, validate_params
from ._workspace import Workspace
from .plan import BlockPlan, Bucket, CostModel, GroupBlocks, build_plan

__all__ = ["PlannedOptimizer"]


class PlannedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose param groups are cut into blocks and planned once
    (``plan.build_plan``); the plan is extended, never rebuilt, when a group is added."""

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        use_bucketing: bool,
        max_bucket_numel: int | None,
    ) -> None:
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._groups: list[GroupBlocks] = []
        self._use_bucketing = use_bucketing
        self._max_bucket_numel = max_bucket_numel
        self._plan: BlockPlan | None = None
        self._schedule = RefreshSchedule(None)
        self._rank = 0
        self.sharded = False
        self._distributor: Any = None
        self._workspace: Workspace | None = None
        self._translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self._lookup: Mapping[int, str] = {}
        self._held: list[dict[str, Any]] = []  # the group dicts the plan was built from
        self._held_list: list[Any] | None = None  # the param_groups list they were read from
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, named or not whatever the existing groups are (names are
        made up from ``configure_new_groups``' lookup); missing keys come from ``defaults`` (the
        builder's, see ``configure_new_groups``). The plan is extended: existing blocks keep their
        bucket, owner and state."""
        self._sync_groups()
        if self._translate is not None and isinstance(param_group, Mapping):
            param_group = self._translate(dict(param_group))
        param_group = validate_params(param_group, self.defaults, self._params, self._names)
        named = None if not self.param_groups else "param_names" in self.param_groups[0]
        names = _groups.name_params(param_group, self._lookup, len(self._params), named)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(group)
            self._groups.append(self._group_blocks(len(self.param_groups) - 1, group, names))
            self._set_plan(self.build_plan(world_size=self._world_size(), owners=self._owners()), self._rank)
            if self._distributor is not None:
                from .distributed import check_same_plan

                check_same_plan(self.plan, self._distributor.group)
                self._distributor.replan(self._params, self.plan, self._decayed())
        except Exception:
            self.param_groups.pop()
            del self._params[len(self._params) - len(group["params"]) :]
            del self._names[len(self._names) - len(group["params"]) :]
            if len(self._groups) > len(self.param_groups):
                self._groups.pop()
            raise
        self._held.append(group)
        self._held_list = self.param_groups

    def configure_new_groups(
        self,
        defaults: Mapping[str, Any] | None = None,
        translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        names: Mapping[int, str] | None = None,
    ) -> None:
        """How groups added later (``add_param_group``; fine-tuning callbacks) are completed:
        missing keys from ``defaults`` (as torch fills them from the constructor's — here the
        builder's, so a new group is set up like its siblings), a group first passed through
        ``translate`` (the drop-in: a group in the wrapped optimizer's terms), and unnamed
        parameters named from ``names`` (``id(param) -> name``)."""
        if defaults is not None:
            unknown = set(defaults) - set(self.defaults) - set(compat.DS_ONLY_KEYS)
            if unknown:
                raise ValueError(f"defaults: unknown Shampoo keys {sorted(unknown)}")
            self.defaults.update(defaults)
        self._translate = translate
        if names is not None:
            self._lookup = dict(names)

    def _sync_groups(self) -> None:
        """Follow an assigned or appended ``param_groups`` list (host checks; ``_groups``)."""
        groups = self.param_groups
        if groups is self._held_list and len(groups) == len(self._held):
            return
        added = _groups.reconcile(groups, self._held, list(self.defaults))
        for group in groups:
            validate_group(group)
        self._held = list(groups)
        self._held_list = groups
        self._workspace = None
        for group in added:
            self.add_param_group(group)

    def _decayed(self) -> set[int]:
        return {i for g in self.param_groups if g["weight_decay"] != 0.0 for i in self._indices(g)}

    def _group_blocks(self, g: int, group: dict[str, Any], names: list[str]) -> GroupBlocks:
        blocks = _groups.group_blocks(g, group, names, len(self._params))
        self._params.extend(group["params"])
        self._names.extend(names)
        return blocks

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
        self._schedule = RefreshSchedule(plan)  # staggered phases follow the plan (never stored)
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

    def _indices(self, group: dict[str, Any]) -> list[int]:
        ids = {id(p) for p in group["params"]}
        return [i for i, p in enumerate(self._params) if id(p) in ids]
