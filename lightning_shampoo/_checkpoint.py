"""Optimizer state ↔ a checkpoint keyed by (parameter, block), independent of buckets and ranks.

``state[param_index]["block_{b}.{section}.{name}"]`` holds block ``b``'s row of a bucket tensor,
for the sections of ``_workspace.SECTIONS`` (``precond``, ``graft``, ``moments``, ``status``).
Saving and loading are mechanical row stacking over the declared schema. Param groups keep their
plain hyperparameters (and the step count); config objects are not saved, so a checkpoint holds
only tensors and plain Python values and loads with ``torch.load(weights_only=True)``.

Checkpoints of earlier versions (one ``opt`` section holding both the moments and the per-block
bookkeeping, no per-block step count) are read by renaming; what they lack starts from its
declared initial value (the step count from the group's).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._state_checks import check_loaded_groups, nonfinite_entries
from ._workspace import bucket_schema, compute_dtype
from .linalg.packing import pack, unpack
from .plan import Bucket

__all__ = [
    "LAYOUT_KEYS",
    "check_groups",
    "check_loadable",
    "load_into",
    "load_rows",
    "saved_groups",
    "state_rows",
]

_NOT_SAVED = {"params", "param_names", "preconditioner_config", "grafting_config"}
#: Group options that decide the blocks: they cannot change on load.
LAYOUT_KEYS = (
    "max_preconditioner_dim",
    "use_merge_dims",
    "stacked",
    "skip_preconditioning_rank_lt",
    "target_parameter_dimensionality",
    "max_factor_dim",
    "max_factor_ratio",
)
#: What a checkpoint older than a layout key implies for it.
_LAYOUT_DEFAULTS: dict[str, Any] = {
    "skip_preconditioning_rank_lt": 0,
    "target_parameter_dimensionality": 1,
    "max_factor_dim": math.inf,
    "max_factor_ratio": math.inf,
}
#: Legacy ``opt.*`` entries that moved to the ``moments`` section.
_MOMENTS = ("filtered_grad", "momentum_buffer")


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str | Tensor):
        return True
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return False


def state_rows(buckets: Iterable[Bucket], state: Mapping[str, Any]) -> dict[int, dict[str, Tensor]]:
    """Every bucket row as ``{param_index: {"block_{b}.{section}.{name}": row}}`` (views)."""
    out: dict[int, dict[str, Tensor]] = {}
    for bucket in buckets:
        sections = state.get(bucket.key)
        if sections is None:
            continue
        for row, (pidx, bidx) in enumerate(bucket.rows()):
            entry = out.setdefault(pidx, {})
            for section, tensors in sections.items():
                for name, tensor in tensors.items():
                    entry[f"block_{bidx}.{section}.{name}"] = tensor[row]
    return out


def saved_groups(param_groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The param groups as saved: plain values only, ``params`` as running indices."""
    groups, start = [], 0
    for group in param_groups:
        saved = {k: v for k, v in group.items() if k not in _NOT_SAVED and _plain(v)}
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return groups


def check_groups(saved: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]) -> dict[int, Any]:
    """Refuse a checkpoint whose groups or blocks cannot match; returns ``param index → saved key``."""
    if len(saved) != len(current):
        raise ValueError(f"state_dict has {len(saved)} param groups, this optimizer has {len(current)}")
    saved_id: dict[int, Any] = {}
    index = 0
    for g, (now, then) in enumerate(zip(current, saved)):
        if len(then["params"]) != len(now["params"]):
            raise ValueError(
                f"param group {g}: state_dict has {len(then['params'])} params, "
                f"this optimizer has {len(now['params'])}"
            )
        for key in LAYOUT_KEYS:  # they decide the blocks, so they cannot change on load
            value = then.get(key, _LAYOUT_DEFAULTS.get(key, now.get(key)))
            if value != now.get(key):
                raise ValueError(
                    f"param group {g}: state_dict has {key}={value!r}, this optimizer has "
                    f"{key}={now.get(key)!r}; the preconditioner blocks would not match"
                )
        for saved_key in then["params"]:
            saved_id[index] = saved_key
            index += 1
    return saved_id


def _modernise(found: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a legacy block entry set (``opt.*``) into the current sections."""
    out = {}
    for name, value in found.items():
        section, _, key = name.partition(".")
        if section == "opt":
            section = "moments" if key in _MOMENTS else "status"
        out[f"{section}.{key}"] = value
    return out


_SYMMETRIC = ("factor.", "root.", "reference.")


def _repack(value: Tensor, shape: tuple[int, ...], key: str) -> Tensor:
    """A symmetric matrix saved full loads packed (upper triangle) and the reverse, so a
    checkpoint crosses ``use_symmetric_packing`` either way."""
    if not key.startswith(_SYMMETRIC) or tuple(value.shape) == shape:
        return value
    d = value.shape[0]
    if len(shape) == 1 and value.ndim == 2 and value.shape[1] == d and d * (d + 1) // 2 == shape[0]:
        return pack(value)
    if (
        len(shape) == 2
        and value.ndim == 1
        and shape[0] == shape[1]
        and value.shape[0] == shape[0] * (shape[0] + 1) // 2
    ):
        return unpack(value)
    return value


def load_rows(
    saved_state: Mapping[Any, Mapping[str, Tensor]],
    saved_id: Mapping[int, Any],
    buckets: Sequence[Bucket],
    state: Mapping[str, Any],
    names: Sequence[str],
    group_steps: Sequence[int],
    *,
    partial: bool,
    fresh: bool = False,
) -> list[tuple[Tensor, int, Tensor, tuple[int, int], str]]:
    """Check a checkpoint's block rows against the declared state (shapes, presence, the block
    set of every parameter) and return the ``(tensor, row, value)`` copies to make. ``partial``:
    this optimizer holds only some blocks (sharded), so saved blocks it lacks are fine. ``fresh``:
    entries the state_dict lacks keep their initial values (another optimizer's state, translated
    by ``_foreign``). Each copy also names its block ``(param index, block index)`` and section."""
    copies: list[tuple[Tensor, int, Tensor, tuple[int, int], str]] = []
    blocks: dict[int, set[int]] = {}
    for bucket in buckets:
        sections = state[bucket.key]
        for row, (pidx, bidx) in enumerate(bucket.rows()):
            blocks.setdefault(pidx, set()).add(bidx)
            entry = saved_state.get(saved_id[pidx])
            if not entry:
                continue
            prefix = f"block_{bidx}."
            found = _modernise({k[len(prefix) :]: v for k, v in entry.items() if k.startswith(prefix)})
            bucket.kernel.adopt_legacy(found)
            if "status.step" not in found:  # older than per-block step counts
                found["status.step"] = torch.tensor(group_steps[bucket.group])
            for section, tensors in sections.items():
                for key, tensor in tensors.items():
                    value = found.get(f"{section}.{key}")
                    where = f"parameter {names[pidx]!r} block {bidx} state {section}.{key}"
                    if value is None:
                        if fresh or section in ("moments", "status"):
                            continue  # starts from its declared initial value
                        raise ValueError(
                            f"{where} is missing from the state_dict (was the preconditioner config changed?)"
                        )
                    value = _repack(value, tuple(tensor.shape[1:]), key)
                    if tuple(value.shape) != tuple(tensor.shape[1:]):
                        raise ValueError(
                            f"{where}: saved shape {tuple(value.shape)} != expected "
                            f"{tuple(tensor.shape[1:])} (was max_preconditioner_dim or the preconditioner "
                            "config changed?)"
                        )
                    copies.append((tensor, row, value, (pidx, bidx), section))
    for pidx, current in blocks.items():
        entry = saved_state.get(saved_id[pidx])
        saved_blocks = {int(k.split(".", 1)[0][len("block_") :]) for k in entry} if entry else current
        extra = set() if partial else saved_blocks - current
        if current - saved_blocks or extra:
            raise ValueError(
                f"parameter {names[pidx]!r}: the state_dict has blocks {sorted(saved_blocks)}, "
                f"this optimizer has {sorted(current)} (was max_preconditioner_dim changed?)"
            )
    return copies


def check_loadable(
    state_dict: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]
) -> dict[int, Any]:
    """The checks that need no allocated state (hyperparameters, groups, layout keys); returns
    ``param index → saved key``."""
    check_loaded_groups(state_dict["param_groups"], param_groups)
    return check_groups(state_dict["param_groups"], param_groups)


def load_into(
    state_dict: Mapping[str, Any],
    saved_id: Mapping[int, Any],
    buckets: Sequence[Bucket],
    state: Mapping[str, Any],
    names: Sequence[str],
    param_groups: list[dict[str, Any]],
    params: Sequence[Tensor],
    *,
    partial: bool,
    fresh: bool = False,
) -> None:
    """Load a checkpoint (``check_loadable`` passed) into allocated state: check its rows before
    writing anything; then copy the rows, reset the blocks whose saved statistics are not
    finite (a warning names each), and take the saved group values."""
    groups = state_dict["param_groups"]
    steps = [int(g.get("step", 0)) for g in groups]
    copies = load_rows(
        state_dict["state"], saved_id, buckets, state, names, steps, partial=partial, fresh=fresh
    )
    broken = _broken_blocks(state_dict, saved_id, buckets, names)
    for current, saved in zip(param_groups, groups):
        for key, value in saved.items():
            if key != "params":
                current[key] = tuple(value) if key == "betas" else value
    for tensor, row, value, block, section in copies:
        if block not in broken or section == "status":
            tensor[row].copy_(value)
    for bucket in buckets:
        rows = [row for row, key in enumerate(bucket.rows()) if key in broken]
        if rows:
            _reset_rows(bucket, state[bucket.key], rows, params, param_groups[bucket.group])


def _broken_blocks(
    state_dict: Mapping[str, Any],
    saved_id: Mapping[int, Any],
    buckets: Sequence[Bucket],
    names: Sequence[str],
) -> set[tuple[int, int]]:
    """Blocks this optimizer holds whose saved statistics hold a non-finite value (warned about)."""
    current = {saved: index for index, saved in saved_id.items()}
    held = {key for bucket in buckets for key in bucket.rows()}
    broken: set[tuple[int, int]] = set()
    for saved, block, key in nonfinite_entries(state_dict):
        index = current.get(saved)
        if index is None or (index, block) not in held:
            continue
        broken.add((index, block))
        warnings.warn(
            f"the state_dict's {key} of parameter {names[index]!r} block {block} is not finite: "
            "that block's statistics start afresh",
            stacklevel=4,
        )
    return broken


def _reset_rows(
    bucket: Bucket,
    sections: Mapping[str, dict[str, Tensor]],
    rows: list[int],
    params: Sequence[Tensor],
    options: Mapping[str, Any],
) -> None:
    """Put rows' statistics and moments back to their declared initial values."""
    dtype = compute_dtype(params[bucket.members[0].param.index].dtype)
    schema = bucket_schema(bucket, dtype, options)
    device = sections["status"]["step"].device
    for section in ("precond", "graft", "moments"):
        for name, spec in schema[section].items():
            target = sections[section][name]
            target[rows] = spec.allocate(len(rows), device).to(target.dtype)
    for name in ("averaging_z", "averaging_y"):  # iterate averaging restarts at the parameters
        if name in schema["moments"]:
            target = sections["moments"][name]
            values = torch.empty_like(target)
            numel = values[0].numel()
            for m in bucket.members:
                p = params[m.param.index]
                m.region.rows_view(values.view(-1)[m.offset * numel :], 0).copy_(
                    m.region.split_view(m.param.processed(p))
                )
            target[rows] = values[rows]
