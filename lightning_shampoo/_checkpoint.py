"""Optimizer state ↔ a checkpoint keyed by (parameter, block), independent of buckets and ranks.

``state[param_index]["block_{b}.{section}.{name}"]`` holds block ``b``'s row of a bucket tensor,
where ``section`` is ``precond`` (the preconditioner's statistics), ``graft`` (the grafting
preconditioner's) or ``opt`` (filtered gradient, momentum, health counters). Param groups keep
their plain hyperparameters (and the step count); config objects are not saved, so a checkpoint
holds only tensors and plain Python values and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .optim import Shampoo

__all__ = ["SECTIONS", "load_state_dict", "to_state_dict"]

SECTIONS = ("precond", "graft", "opt")
_NOT_SAVED = {"params", "param_names", "preconditioner_config", "grafting_config"}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str | Tensor):
        return True
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return False


def to_state_dict(optimizer: Shampoo) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for plan in optimizer.plans:
        bucket_state = optimizer.state.get(plan.bucket.key)  # type: ignore[call-overload]
        if bucket_state is None:
            continue
        for row, (pidx, bidx) in enumerate(plan.bucket.rows()):
            entry = state.setdefault(pidx, {})
            for section in SECTIONS:
                for name, tensor in bucket_state[section].items():
                    entry[f"block_{bidx}.{section}.{name}"] = tensor[row]
    groups = []
    start = 0
    for group in optimizer.param_groups:
        saved = {k: v for k, v in group.items() if k not in _NOT_SAVED and _plain(v)}
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def load_state_dict(optimizer: Shampoo, state_dict: dict[str, Any]) -> None:
    groups = state_dict["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"state_dict has {len(groups)} param groups, this optimizer has {len(optimizer.param_groups)}"
        )
    saved_id: dict[int, Any] = {}
    index = 0
    for g, (current, saved) in enumerate(zip(optimizer.param_groups, groups)):
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(
                f"param group {g}: state_dict has {len(saved['params'])} params, "
                f"this optimizer has {len(current['params'])}"
            )
        for key, value in saved.items():
            if key not in _NOT_SAVED:
                current[key] = tuple(value) if key == "betas" else value
        for saved_key in saved["params"]:
            saved_id[index] = saved_key
            index += 1
    optimizer._ensure_state()
    saved_state = state_dict["state"]
    for plan in optimizer.plans:
        bucket_state = optimizer.state[plan.bucket.key]  # type: ignore[index]
        n = plan.bucket.size
        for row, (pidx, bidx) in enumerate(plan.bucket.rows()):
            entry = saved_state.get(saved_id[pidx])
            if not entry:
                continue
            prefix = f"block_{bidx}."
            found = {k[len(prefix) :]: v for k, v in entry.items() if k.startswith(prefix)}
            for section in SECTIONS:
                tensors = bucket_state[section]
                for name, value in found.items():
                    sec, _, key = name.partition(".")
                    if sec == section and key not in tensors:  # created lazily by the saving run
                        device = next(iter(bucket_state["opt"].values())).device
                        tensors[key] = torch.zeros((n, *value.shape), dtype=value.dtype, device=device)
                for key, tensor in tensors.items():
                    value = found.get(f"{section}.{key}")
                    where = f"parameter {optimizer._names[pidx]!r} block {bidx} state {section}.{key}"
                    if value is None:
                        if section == "opt":
                            continue
                        raise ValueError(
                            f"{where} is missing from the state_dict (was the preconditioner config changed?)"
                        )
                    if tuple(value.shape) != tuple(tensor.shape[1:]):
                        raise ValueError(
                            f"{where}: saved shape {tuple(value.shape)} != "
                            f"expected {tuple(tensor.shape[1:])} "
                            "(was max_preconditioner_dim or the preconditioner config changed?)"
                        )
                    tensor[row].copy_(value)
