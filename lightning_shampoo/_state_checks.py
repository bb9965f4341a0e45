"""Checks of a loaded checkpoint: its param groups' hyperparameters and its per-block state.

Policy (issue 16), applied once, at ``load_state_dict`` — never on the step's hot path:

* Hyperparameters: a loaded group value that construction would refuse on its own (a non-finite
  or negative ``lr`` / ``weight_decay`` / ``epsilon``, ``betas`` outside their ranges, a
  non-integer frequency, …) refuses the whole checkpoint with a ``ValueError`` naming the group
  index and the key (:func:`check_loaded_groups`). Nothing was written yet, so the optimizer is
  untouched. Rules that tie two keys together (``start_preconditioning_step >=
  precondition_frequency``) are construction-time only: a frequency scheduler legitimately
  moves one past the other during training.
* Statistics: a non-finite entry in a block's saved state (a factor, an eigenbasis, ``Q``, a
  moment, …) is found by :func:`nonfinite_entries`; that block's statistics are reset — as if it
  had never seen a gradient — with a warning naming the parameter, block and key. Refusing the
  checkpoint would leave the user no way to resume at all, and one block's fresh statistics cost
  a few steps of preconditioning quality, not the run. Health figures that are ``nan`` / ``inf``
  by design (condition numbers and eigenvalue ranges before a first refresh or of a singular
  factor, drift against a zero reference, PSGD-Kron's health before a first fit) are not state
  and are not reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._validation import check_group_values

__all__ = ["HEALTH_KEYS", "check_loaded_groups", "nonfinite_entries"]

#: ``section.name`` prefixes of saved per-block entries that are health figures, not state.
HEALTH_KEYS = (
    "status.condition_number.",
    "status.min_eigenvalue.",
    "status.max_eigenvalue.",
    "status.drift",
    "opt.condition_number.",  # checkpoints of earlier versions
    "opt.min_eigenvalue.",
    "opt.max_eigenvalue.",
    "opt.drift",
    "precond.health.",
)


def _pseudo_inverse(group: Mapping[str, Any] | None) -> bool:
    config = None if group is None else group.get("preconditioner_config")
    return bool(getattr(getattr(config, "amortized_computation_config", None), "pseudo_inverse", False))


def check_loaded_groups(
    saved_groups: Sequence[Mapping[str, Any]], current_groups: Sequence[Mapping[str, Any]] | None = None
) -> None:
    """Refuse a checkpoint whose param groups hold values construction would refuse, naming the
    group index and the key. ``current_groups`` (the loading optimizer's) decide whether
    ``epsilon = 0`` is allowed (pseudo-inverse configs only)."""
    for g, saved in enumerate(saved_groups):
        if not isinstance(saved, Mapping):
            raise ValueError(f"state_dict param group {g} must be a dict, got {type(saved).__name__}")
        where = f"state_dict param group {g}: "
        check_group_values(saved, where)
        current = current_groups[g] if current_groups is not None and g < len(current_groups) else None
        epsilon = saved.get("epsilon")
        if epsilon is not None and epsilon == 0 and current is not None and not _pseudo_inverse(current):
            raise ValueError(f"{where}epsilon must be > 0 (or use pseudo_inverse=True), got {epsilon!r}")


def _is_health(key: str) -> bool:
    return key.startswith(HEALTH_KEYS)


def nonfinite_entries(state_dict: Mapping[str, Any]) -> list[tuple[int, int, str]]:
    """``(param_index, block_index, "section.name")`` of every saved per-block state tensor with a
    non-finite value (health figures excepted: module docstring), sorted. ``param_index`` is the
    checkpoint's key of the parameter (its index in the saving optimizer)."""
    found = []
    for param_index, entry in state_dict.get("state", {}).items():
        if not isinstance(entry, Mapping):
            continue
        for name, value in entry.items():
            if not (isinstance(name, str) and name.startswith("block_") and isinstance(value, Tensor)):
                continue
            block, _, key = name.partition(".")
            if _is_health(key) or not (value.is_floating_point() or value.is_complex()):
                continue
            if not bool(torch.isfinite(value).all()):
                found.append((int(param_index), int(block[len("block_") :]), key))
    return sorted(found)
