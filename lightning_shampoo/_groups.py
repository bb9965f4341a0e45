"""Param groups that arrive after construction: their parameters' names, and a replaced list.

torch lets a group be added at any time (``add_param_group``: fine-tuning callbacks unfreezing
a backbone) and lets anyone assign ``optimizer.param_groups`` (Lightning's ``BaseFinetuning``
puts back, on resume, the groups it added before the checkpoint). Shampoo's blocks, plan and
state follow its groups, so both routes end in ``Shampoo.add_param_group``: this module gives a
new group's parameters names consistently with the existing groups (torch refuses a mix of named
and unnamed groups) and reconciles a replaced list with the groups the plan was built from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .blocking import layout_param
from .plan import GroupBlocks

__all__ = ["STRUCTURAL_KEYS", "group_blocks", "name_params", "reconcile"]

#: Group options that decide a group's blocks and kernels (``plan.GroupBlocks``): a replaced
#: group dict must keep them.
STRUCTURAL_KEYS = (
    "max_preconditioner_dim",
    "use_merge_dims",
    "stacked",
    "skip_preconditioning_rank_lt",
    "target_parameter_dimensionality",
    "preconditioner_config",
    "grafting_config",
    "max_factor_dim",
    "max_factor_ratio",
)


def name_params(
    group: dict[str, Any], lookup: Mapping[int, str], start: int, named: bool | None
) -> list[str]:
    """Names of ``group``'s parameters — from ``(name, tensor)`` pairs, ``param_names``,
    ``lookup`` (``id(param) -> name``) or ``param{index}`` — with ``group`` rewritten in place to
    hold plain tensors and, when ``named`` (the existing groups carry names; ``None``: no group
    yet, keep what was given), ``param_names``; without, none (torch refuses a mix)."""
    params = group["params"]
    if not isinstance(params, list):
        return []  # torch refuses it with its own message
    given = group.get("param_names")
    names, tensors = [], []
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            p = item
            name = given[i] if given and i < len(given) else None
        was_named = name is not None
        if name is None:
            name = lookup.get(id(p), f"param{start + i}") if isinstance(p, Tensor) else f"param{start + i}"
        names.append(name)
        tensors.append(p)
        if named is None:
            named = was_named
    group["params"] = tensors
    if named:
        group["param_names"] = names
    else:
        group.pop("param_names", None)
    return names


def reconcile(
    groups: list[dict[str, Any]], held: Sequence[dict[str, Any]], keys: Sequence[str]
) -> list[dict[str, Any]]:
    """``groups`` (an assigned ``param_groups`` list) against ``held`` (the groups Shampoo's plan
    was built from). The first ``len(held)`` must hold the same parameters in the same order: a
    replacement dict that carries every Shampoo key (``keys``) is used if its blocks would not
    change; one written in another optimizer's terms is replaced by the held dict (its values
    come back with the checkpoint). The groups beyond are removed from ``groups`` (in place) and
    returned, to be added through ``add_param_group``."""
    if len(groups) < len(held):
        raise ValueError(
            f"param_groups was replaced by {len(groups)} group(s), but this Shampoo holds {len(held)}: "
            "groups cannot be removed (their blocks hold state)"
        )
    for i, old in enumerate(held):
        new = groups[i]
        if new is old:
            continue
        if not isinstance(new, dict) or [id(p) for p in new.get("params", ())] != [
            id(p) for p in old["params"]
        ]:
            raise ValueError(
                f"param_groups was replaced and group {i} no longer holds the same parameters in the same "
                "order; Shampoo's blocks cannot follow that: add new parameters with add_param_group"
            )
        if not all(k in new for k in keys):
            groups[i] = old  # another optimizer's group for these parameters: keep Shampoo's
            continue
        for key in STRUCTURAL_KEYS:
            if key in old and new.get(key) != old[key]:
                raise ValueError(
                    f"param_groups was replaced and group {i} changes {key} ({old[key]!r} -> {new[key]!r}); "
                    "the preconditioner blocks would not match"
                )
        new["params"] = old["params"]
        if "param_names" in old:
            new["param_names"] = old["param_names"]
        else:
            new.pop("param_names", None)
    extra = groups[len(held) :]
    del groups[len(held) :]
    return extra


def group_blocks(g: int, group: Mapping[str, Any], names: Sequence[str], first_index: int) -> GroupBlocks:
    """Param group ``g``'s blocks (``plan.GroupBlocks``): each non-empty parameter's layout, its
    dtype and device, and the group's kernel options; its parameters get indices from
    ``first_index`` on (the optimizer's flat parameter list)."""
    target = group["target_parameter_dimensionality"]
    config = group["preconditioner_config"]
    layouts, dtypes, devices = [], [], []
    for offset, (p, name) in enumerate(zip(group["params"], names)):
        if p.numel() == 0:
            continue
        layouts.append(
            layout_param(
                first_index + offset,
                name,
                p.shape,
                group["max_preconditioner_dim"],
                merge=group["use_merge_dims"] and p.is_contiguous() and target != math.inf,
                stacked=group["stacked"],
                squeeze=target != math.inf,  # Distributed Shampoo keeps size-1 dims then
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
