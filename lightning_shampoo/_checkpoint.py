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

from ._state_checks import check_loaded_groups

if TYPE_CHECKING:
    from .optim import Shampoo

__all__ = ["SECTIONS", "load_state_dict", "to_state_dict"]

SECTIONS = ("precond", "graft", "opt")
_NOT_SAVED = {"params", "param_names", "preconditioner_config", "grafting_config"}
_LAYOUT_KEYS = ("max_preconditioner_dim", "use_merge_dims", "stacked", "skip_preconditioning_rank_lt")
#: What a checkpoint older than a layout key implies for it.
_LAYOUT_DEFAULTS = {"skip_preconditioning_rank_lt": 0}


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


def _block_ids(entry: dict[str, Any]) -> set[int]:
    return {int(key.split(".", 1)[0][len("block_") :]) for key in entry}


def load_state_dict(optimizer: Shampoo, state_dict: dict[str, Any]) -> None:
    """Check everything first, then write: a rejected checkpoint leaves the optimizer untouched."""
    check_loaded_groups(state_dict["param_groups"], optimizer.param_groups)
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
        for key in _LAYOUT_KEYS:  # they decide the blocks, so they cannot change on load
            value = saved.get(key, _LAYOUT_DEFAULTS.get(key, current[key]))
            if value != current[key]:
                raise ValueError(
                    f"param group {g}: state_dict has {key}={value!r}, this optimizer has "
                    f"{key}={current[key]!r}; the preconditioner blocks would not match"
                )
        for saved_key in saved["params"]:
            saved_id[index] = saved_key
            index += 1
    optimizer._ensure_state()
    saved_state = state_dict["state"]
    created: dict[tuple[int, str], tuple[dict[str, Tensor], tuple[int, ...], Tensor, torch.device]] = {}
    copies: list[tuple[dict[str, Tensor], str, int, Tensor]] = []
    blocks: dict[int, set[int]] = {}
    for plan in optimizer.plans:
        bucket_state = optimizer.state[plan.bucket.key]  # type: ignore[index]
        device = next(iter(bucket_state["opt"].values())).device
        for row, (pidx, bidx) in enumerate(plan.bucket.rows()):
            blocks.setdefault(pidx, set()).add(bidx)
            entry = saved_state.get(saved_id[pidx])
            if not entry:
                continue
            prefix = f"block_{bidx}."
            found = {k[len(prefix) :]: v for k, v in entry.items() if k.startswith(prefix)}
            for section in SECTIONS:
                tensors = bucket_state[section]
                shapes = {key: tensor.shape[1:] for key, tensor in tensors.items()}
                for name, value in found.items():
                    sec, _, key = name.partition(".")
                    if sec == section and key not in tensors:  # created lazily by the saving run
                        shape = (plan.bucket.size, *value.shape)
                        created.setdefault((id(tensors), key), (tensors, shape, value, device))
                        shapes[key] = torch.Size(created[(id(tensors), key)][1][1:])
                for key, shape in shapes.items():
                    value = found.get(f"{section}.{key}")
                    where = f"parameter {optimizer._names[pidx]!r} block {bidx} state {section}.{key}"
                    if value is None:
                        if section == "opt":
                            continue
                        raise ValueError(
                            f"{where} is missing from the state_dict (was the preconditioner config changed?)"
                        )
                    if tuple(value.shape) != tuple(shape):
                        raise ValueError(
                            f"{where}: saved shape {tuple(value.shape)} != expected {tuple(shape)} "
                            "(was max_preconditioner_dim or the preconditioner config changed?)"
                        )
                    copies.append((tensors, key, row, value))
    for pidx, current_blocks in blocks.items():
        entry = saved_state.get(saved_id[pidx])
        saved_blocks = _block_ids(entry) if entry else current_blocks
        extra = saved_blocks - current_blocks if optimizer._owns is None else set()
        if current_blocks - saved_blocks or extra:
            raise ValueError(
                f"parameter {optimizer._names[pidx]!r}: the state_dict has blocks {sorted(saved_blocks)}, "
                f"this optimizer has {sorted(current_blocks)} (was max_preconditioner_dim changed?)"
            )
    for current, saved in zip(optimizer.param_groups, groups):
        for key, value in saved.items():
            if key not in _NOT_SAVED:
                current[key] = tuple(value) if key == "betas" else value
    for (_, key), (tensors, shape, value, device) in created.items():
        tensors[key] = torch.zeros(shape, dtype=value.dtype, device=device)
    for tensors, key, row, value in copies:
        tensors[key][row].copy_(value)
