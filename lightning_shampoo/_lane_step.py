"""One lane's step: the stages of ``_stages`` in order, run eagerly or through ``torch.compile``.

With a ``ShampooPT2CompileConfig`` (``pt2``), a *plain* step of a lane (no refresh due, every
gradient present, every kernel ``compilable``, not sharded) runs as one compiled graph; a step
with a refresh due as two (the stages before the refresh, and after it) around the eager
refresh; everything else runs the same stages eagerly. The graph must not change from step to step, so:

* the learning rate is read from a lane tensor (``write_rates`` fills it on the host, and only
  when it changed), never baked in as a constant; the step count and the bias corrections are
  already tensors (the lane's status and EMA table);
* the host facts the stages branch on (``warm_key``) are first met by an eager step, which fills
  the lane's caches (plans, masks, views): the graph then only reads them, and a new set of facts
  (grafting phase over, a fallback set) is one recompilation, not one per step;
* each lane compiles its own copy of ``lane_step`` (a fresh code object), so that optimizers and
  lanes do not share, and exhaust, one function's recompilation budget.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _stages
from ._workspace import Lane, param_view, shaped
from .pt2 import ShampooPT2CompileConfig

__all__ = [
    "LaneStepper",
    "after_refresh",
    "before_refresh",
    "lane_step",
    "learning_rate_tensor",
    "warm_key",
    "write_rates",
]

Refresh = Callable[[Tensor, bool], None]


def lane_step(
    lane: Lane,
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    steps: Sequence[_stages.GroupStep],
    fallback: frozenset[str],
    persistent: bool,
    apply: bool,
    tensor_rates: bool,
    refresh: Refresh | None = None,
) -> None:
    """gather → L2 decay → guard → EMA table → statistics → [refresh] → after-refresh → filter
    → direction → weight decay → momentum → learning rate → apply (``apply``: else the
    distributor applies). ``tensor_rates``: the learning rate from ``write_rates``' tensor."""
    present, all_present = before_refresh(lane, grads, params, steps, persistent)
    if refresh is not None:
        refresh(present, all_present)
    after_refresh(lane, params, steps, fallback, persistent, apply, tensor_rates)


def before_refresh(
    lane: Lane,
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    steps: Sequence[_stages.GroupStep],
    persistent: bool,
) -> tuple[Tensor, bool]:
    """The stages up to the statistics; returns the ``present`` mask and whether all were."""

    def views(link: Any) -> Tensor:
        return param_view(lane, link, params, persistent)

    present, all_present = _stages.gather(lane, grads)
    _stages.l2_decay(lane, steps, views)
    _stages.guard(lane, present, all_present)
    _stages.ema_table(lane)
    _stages.statistics(lane)
    return present, all_present


def after_refresh(
    lane: Lane,
    params: Sequence[Tensor],
    steps: Sequence[_stages.GroupStep],
    fallback: frozenset[str],
    persistent: bool,
    apply: bool,
    tensor_rates: bool,
) -> None:
    """The stages from the statistics kept in a refreshed basis to the update."""

    def views(link: Any) -> Tensor:
        return param_view(lane, link, params, persistent)

    _stages.after_refresh(lane)
    _stages.filter_moments(lane)
    _stages.direction(lane, steps, fallback)
    _stages.weight_decay(lane, steps, views)
    _stages.momentum(lane, steps)
    if tensor_rates:
        learning_rate_tensor(lane)
    else:
        _stages.learning_rate(lane, steps)
    _stages.averaging(lane, steps, views)
    if apply:
        _stages.apply_updates(lane, views)


def _group_rows(lane: Lane) -> Tensor:
    rows = [slot.bucket.group for slot in lane.slots for _ in range(slot.n)]
    return torch.tensor(rows, dtype=torch.long, device=lane.device)


def write_rates(lane: Lane, steps: Sequence[_stages.GroupStep]) -> None:
    """``-lr`` of every group into the lane's rate tensor (host side; a float is written only when
    it changed, a tensor ``lr`` every step, device to device, with a non-finite or negative value
    read as 0: the update is skipped without a sync)."""
    rates = lane.cache.get("rates")
    if rates is None or rates.numel() != len(steps):
        rates = lane.cache["rates"] = torch.zeros(len(steps), dtype=lane.dtype, device=lane.device)
        lane.cache["rate_values"] = [None] * len(steps)
        lane.cache["rate_rows"] = _group_rows(lane)
        lane.cache["rate_vector"] = torch.zeros(lane.size, dtype=lane.dtype, device=lane.device)
        vector = lane.cache["rate_vector"]
        lane.cache["rate_views"] = [shaped(vector, slot, slot.out.ndim) for slot in lane.slots]
        lane.cache["rate_groups"] = sorted({slot.bucket.group for slot in lane.slots})
    written = lane.cache["rate_values"]
    for g in lane.cache["rate_groups"]:
        lr = steps[g].lr
        if isinstance(lr, Tensor):
            rates[g].fill_(torch.where(torch.isfinite(lr) & (lr >= 0), lr, 0.0).neg())
            written[g] = None
        elif written[g] != lr:
            rates[g].fill_(-float(lr))
            written[g] = lr


def learning_rate_tensor(lane: Lane) -> None:
    """``U = -lr · d`` with ``lr`` from the lane's rate tensor (``write_rates``): two ops."""
    vector = lane.cache["rate_vector"]
    torch.index_select(lane.cache["rates"], 0, lane.cache["rate_rows"], out=vector)
    torch._foreach_mul_([slot.out for slot in lane.slots], lane.cache["rate_views"])


def warm_key(steps: Sequence[_stages.GroupStep], fallback: frozenset[str]) -> tuple[Any, ...]:
    """The host facts the stages branch on (everything of ``GroupStep`` but ``step`` and ``lr``)."""
    facts = tuple(
        (s.grafting_only, s.weight_decay, s.decoupled, s.momentum, s.dampening, s.nesterov, s.torch_momentum)
        for s in steps
    )
    return ("warm", facts, tuple(sorted(fallback)))


def _fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object: ``torch.compile``'s cache (and its recompilation limit)
    lives on the code object, so every lane gets its own."""
    assert isinstance(fn, types.FunctionType)
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class LaneStepper:
    """Runs a lane's step eagerly, or its plain steps compiled (module docstring)."""

    def __init__(self, config: ShampooPT2CompileConfig | None) -> None:
        self.config = config
        self.compiled_steps = 0  # lane steps run by compiled graphs (tests, benchmarks)

    def compilable(self, lane: Lane) -> bool:
        return all(
            slot.kernel.compilable and (slot.bucket.graft is None or slot.bucket.graft.compilable)
            for slot in lane.slots
        )

    def _compiled(self, lane: Lane, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled for ``lane`` (made once per lane and function)."""
        key = ("compiled", fn.__name__)
        compiled = lane.cache.get(key)
        if compiled is None:
            cfg = self.config
            assert cfg is not None
            compiled = lane.cache[key] = torch.compile(
                _fresh_copy(fn),
                backend=cfg.backend,
                mode=cfg.mode,
                fullgraph=cfg.fullgraph,
                dynamic=cfg.dynamic,
            )
        return compiled

    def run(
        self,
        lane: Lane,
        grads: Sequence[Tensor | None],
        params: Sequence[Tensor],
        steps: Sequence[_stages.GroupStep],
        fallback: frozenset[str],
        persistent: bool,
        apply: bool,
        refresh: Refresh,
        refresh_pending: Callable[[], bool],
    ) -> None:
        """One step of ``lane``; ``refresh_pending()``: whether ``refresh`` would do anything.

        Compiled: a plain step is one graph (``lane_step``); a step with a refresh due (with
        staggered refreshes, most steps of a lane with many blocks) is two graphs around the
        eager refresh (``before_refresh``, ``after_refresh``)."""
        if self.config is None:
            lane_step(lane, grads, params, steps, fallback, persistent, apply, False, refresh)
            return
        write_rates(lane, steps)
        key = warm_key(steps, fallback)
        traceable = (
            apply  # sharded (a distributor applies the updates): eager, not yet traced
            and all(s.averaging is None for s in steps)  # its coefficients are host values per step
            and self.compilable(lane)
            and all(grads[i] is not None for i in _param_indices(lane))
        )
        if not traceable or key not in lane.cache:
            lane_step(lane, grads, params, steps, fallback, persistent, apply, True, refresh)
            if traceable:
                lane.cache[key] = True  # its caches are filled: the graphs only read them
            return
        # Views of the parameters are made inside the graph (free there): views cached under
        # no_grad of a parameter updated in place cannot be handed to the tracer.
        if refresh_pending():
            before = self._compiled(lane, before_refresh)
            present, all_present = before(lane, grads, params, steps, False)
            refresh(present, all_present)
            self._compiled(lane, after_refresh)(lane, params, steps, fallback, False, apply, True)
        else:
            self._compiled(lane, lane_step)(lane, grads, params, steps, fallback, False, apply, True, None)
        self.compiled_steps += 1


def _param_indices(lane: Lane) -> list[int]:
    indices = lane.cache.get("param_indices")
    if indices is None:
        indices = lane.cache["param_indices"] = sorted(
            {link.layout.index for slot in lane.slots for link in slot.links}
        )
    return indices
