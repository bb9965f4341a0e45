"""Another optimizer's checkpoint → Shampoo's, and the marker that tells the two apart.

A project that adds ``ShampooCallback`` to a running training resumes from a checkpoint whose
optimizer state is a ``torch.optim`` optimizer's: ``{"state": {param id: {"step", "exp_avg",
"exp_avg_sq", …}}, "param_groups": [{"lr", "betas", "eps", …, "params": [ids]}]}``, param ids
running over the groups in order, exactly as Shampoo's own. ``convert`` maps it onto Shampoo's
per-block rows (``block_{b}.{section}.{name}``, see ``_checkpoint``) wherever the shapes allow:

=====================================  ==================================================
torch                                  Shampoo (every block of the parameter)
=====================================  ==================================================
``exp_avg_sq`` / ``square_avg`` /      the second moment of the grafting kernel
``sum`` (Adam / RMSprop / Adagrad)     (``graft.second_moment``), or of the kernel itself
                                       where it is diagonal (``precond.second_moment``:
                                       parameters left to the grafting config)
``exp_avg`` (Adam)                     ``moments.filtered_grad`` (the same β₁ EMA)
``momentum_buffer`` (SGD, RMSprop)     ``moments.momentum_buffer`` (started)
``step``                               ``status.step`` (bias corrections continue)
=====================================  ==================================================

The Kronecker statistics start fresh, so the groups' ``start_preconditioning_step`` moves on by
the resumed step: the next ``start_preconditioning_step`` steps are the wrapped optimizer's
exactly, as at the start of a run, and then preconditioning starts from statistics of its own.
Learning rates and scheduler keys (``initial_lr``, …) come from the checkpoint.

Shampoo's ``state_dict`` carries ``FORMAT_KEY`` (plain values: still ``weights_only``-loadable)
naming who built the optimizer, so a checkpoint loaded into a differently built one says why it
does not fit (``origin_hint``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._checkpoint import saved_groups
from .blocking import ParamLayout
from .plan import BlockPlan

__all__ = ["FORMAT_KEY", "Converted", "convert", "is_foreign", "marker", "origin_hint"]

FORMAT_KEY = "lightning_shampoo"
_VERSION = 1
#: torch state key → the Shampoo per-block entries it fills (where the block declares them).
_ROLES: dict[str, tuple[str, ...]] = {
    "exp_avg_sq": ("graft.second_moment", "precond.second_moment"),
    "square_avg": ("graft.second_moment", "precond.second_moment"),
    "sum": ("graft.second_moment", "precond.second_moment"),
    "exp_avg": ("moments.filtered_grad",),
    "momentum_buffer": ("moments.momentum_buffer",),
}
#: torch optimizers' own group options (not carried over: the translation decides them).
_TORCH_OPTIONS = frozenset(
    {
        "betas", "eps", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
        "decoupled_weight_decay", "momentum", "dampening", "nesterov", "alpha", "centered",
        "lr_decay", "initial_accumulator_value", "weight_decay", "params", "param_names",
    }
)  # fmt: skip


def marker(origin: str | None) -> dict[str, Any]:
    return {"version": _VERSION, "origin": origin or "Shampoo"}


def is_foreign(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is another optimizer's (a ``torch.optim`` one's), not Shampoo's
    (marked, or of a version older than the marker: block rows, Shampoo's group keys)."""
    if FORMAT_KEY in state_dict:
        return False
    groups = state_dict.get("param_groups", [])
    if any(isinstance(g, Mapping) and "precondition_frequency" in g for g in groups):
        return False
    entries = state_dict.get("state", {})
    return not any(
        isinstance(k, str) and k.startswith("block_")
        for e in entries.values()
        if isinstance(e, Mapping)
        for k in e
    )


def source_name(state_dict: Mapping[str, Any]) -> str:
    """A best guess at which ``torch.optim`` optimizer wrote ``state_dict`` (for messages)."""
    keys = {k for g in state_dict.get("param_groups", []) if isinstance(g, Mapping) for k in g}
    if "amsgrad" in keys:
        decoupled = any(g.get("decoupled_weight_decay") for g in state_dict["param_groups"])
        return "torch.optim.AdamW" if decoupled else "torch.optim.Adam(W)"
    for key, name in (("nesterov", "SGD"), ("centered", "RMSprop"), ("lr_decay", "Adagrad")):
        if key in keys:
            return f"torch.optim.{name}"
    return "another optimizer"


def origin_hint(state_dict: Mapping[str, Any], origin: str | None) -> str:
    """A sentence for a load error when the checkpoint's optimizer was built differently."""
    saved = state_dict.get(FORMAT_KEY)
    saved_origin = saved.get("origin") if isinstance(saved, Mapping) else None
    mine = origin or "Shampoo"
    if saved_origin is None or saved_origin == mine:
        return ""
    return (
        f" — this checkpoint's optimizer was built by {saved_origin}, this one by {mine}: resume with "
        "the same setup (e.g. ShampooCallback back in the Trainer's callbacks)"
    )


@dataclass(frozen=True)
class Converted:
    """Another optimizer's state in Shampoo's format, and the sentence that says what was taken."""

    state_dict: dict[str, Any]
    note: str


def _blocks(layout: ParamLayout, value: Tensor) -> dict[int, Tensor]:
    """Block index → that block of a parameter-shaped tensor (a copy in the block's shape)."""
    shapes = layout.block_shapes()
    processed = layout.processed(value.detach())
    out = {}
    for region in layout.regions:
        shape = shapes[region.block_ids[0]]
        rows = region.view(processed).reshape(region.count, *shape)
        for j, block in enumerate(region.block_ids):
            out[block] = rows[j].clone()
    return out


def _step(entry: Mapping[str, Any]) -> int:
    step = entry.get("step", 0)
    return int(step.item()) if isinstance(step, Tensor) else int(step)


def convert(
    state_dict: Mapping[str, Any],
    param_groups: Sequence[Mapping[str, Any]],
    plan: BlockPlan,
) -> Converted:
    """``state_dict`` (a ``torch.optim`` optimizer's) as Shampoo's: see the module docstring.
    The groups must hold as many parameters as the checkpoint's, in the same order."""
    source = source_name(state_dict)
    theirs = state_dict.get("param_groups")
    if not isinstance(theirs, list) or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError("state_dict must have 'state' and 'param_groups' (a torch optimizer's state_dict)")
    counts = [len(g["params"]) for g in theirs]
    mine = [len(g["params"]) for g in param_groups]
    if counts != mine:
        raise ValueError(
            f"the state_dict is {source}'s with parameters per group {counts}; this Shampoo has {mine}: "
            "it cannot take that state (was the optimizer's param-group layout changed?)"
        )
    groups = saved_groups(param_groups)
    state: dict[int, dict[str, Tensor]] = {}
    mapped = with_state = 0
    index = 0
    for then, now in zip(theirs, groups):
        steps = []
        for saved_key in then["params"]:
            entry = state_dict["state"].get(saved_key)
            layout = plan.layout(index)
            if entry:
                with_state += 1
                steps.append(_step(entry))
            if entry and layout is not None:
                rows = _param_rows(entry, layout)
                if rows:
                    state[index] = rows
                    mapped += 1
            index += 1
        now.update({k: v for k, v in then.items() if k not in _TORCH_OPTIONS})  # lr, initial_lr, …
        step = max(steps, default=0)
        now["step"] = step
        start = now.get("start_preconditioning_step")
        if isinstance(start, int | float) and start != float("inf") and step:
            now["start_preconditioning_step"] = int(step + start)
    first = sorted({g["start_preconditioning_step"] for g in groups if "start_preconditioning_step" in g})
    when = (
        f"from step {first[0]}"
        if first and first[0] != float("inf")
        else "never (start_preconditioning_step)"
    )
    note = (
        f"Shampoo resumed from {source}'s optimizer state: the grafting state of {mapped}/{with_state} "
        "parameter(s) with state starts from its moments (second moment, first moment or momentum, step); "
        f"the preconditioner statistics start fresh (preconditioning {when})"
    )
    return Converted({"state": state, "param_groups": groups}, note)


def _param_rows(entry: Mapping[str, Any], layout: ParamLayout) -> dict[str, Tensor]:
    """One parameter's block rows from its torch state (empty when no shape fits)."""
    rows: dict[str, Tensor] = {}
    usable = {
        key: value
        for key, value in entry.items()
        if key in _ROLES and isinstance(value, Tensor) and tuple(value.shape) == tuple(layout.shape)
    }
    if not usable:
        return rows
    step = torch.tensor(_step(entry), dtype=torch.int64)
    for key, value in usable.items():
        for block, part in _blocks(layout, value).items():
            for target in _ROLES[key]:
                rows[f"block_{block}.{target}"] = part
    for block in range(layout.num_blocks):
        rows[f"block_{block}.status.step"] = step
        if "momentum_buffer" in usable:
            rows[f"block_{block}.status.momentum_started"] = torch.tensor(True)
    return rows
