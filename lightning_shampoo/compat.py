"""Distributed Shampoo's newer argument names, accepted or refused with a message naming ours.

``translate_group`` rewrites a param group (or the optimizer's defaults) in place: each of these
keys is removed and, where it has a counterpart, our option is set from it. The Distributed
Shampoo name wins over ours in the same group (``constructor_keys`` refuses a constructor call
that gives both with different values). See ``docs/migrating-from-distributed-shampoo.md``.

=============================  ================================================================
``weight_decay_type``          ``L2`` → ``use_decoupled_weight_decay=False``; ``DECOUPLED`` → True;
                               ``INDEPENDENT`` → decoupled with ``weight_decay / peak_lr``
                               (``peak_lr``: the group's, else its ``lr``); ``CORRECTED`` refused
``iterate_averaging_config``   ``ClassicMomentumConfig`` → ``momentum``, ``dampening``,
                               ``use_nesterov``; ``GeneralizedPrimalAveragingConfig`` /
                               ``ScheduleFreeConfig`` kept in the group (ours, or Distributed
                               Shampoo's converted by field), with ``train_mode``; refused with
                               momentum > 0 (averaging replaces it)
``use_pin_memory``             accepted, no effect (our step reads ``lr`` without a copy)
``shampoo_pt2_compile_config`` the constructor's (``pt2.ShampooPT2CompileConfig``; Distributed
                               Shampoo's is read by its field names); refused in a param group
``distributed_config``         refused: ``Shampoo.shard()`` or the Lightning strategies
=============================  ================================================================
"""

from __future__ import annotations

import enum
from typing import Any

from torch import Tensor

from .averaging import (
    ClassicMomentumConfig,
    GeneralizedPrimalAveragingConfig,
    IterateAveragingConfig,
    ScheduleFreeConfig,
)

__all__ = ["DS_ONLY_KEYS", "WeightDecayType", "constructor_keys", "translate_group"]


@enum.unique
class WeightDecayType(enum.Enum):
    """Distributed Shampoo's ``weight_decay_type`` values (strings with these names work too)."""

    L2 = "L2"
    DECOUPLED = "DECOUPLED"
    CORRECTED = "CORRECTED"
    INDEPENDENT = "INDEPENDENT"


#: Keys of Distributed Shampoo's that ``translate_group`` consumes.
DS_ONLY_KEYS = (
    "weight_decay_type",
    "iterate_averaging_config",
    "use_pin_memory",
    "shampoo_pt2_compile_config",
    "distributed_config",
    "peak_lr",
)


def _weight_decay_type(value: Any) -> WeightDecayType:
    """Ours, Distributed Shampoo's enum (by member name) or a string."""
    name = value.name if isinstance(value, enum.Enum) else value
    if isinstance(name, str) and name.upper() in WeightDecayType.__members__:
        return WeightDecayType[name.upper()]
    raise ValueError(
        f"weight_decay_type must be one of {[m.name for m in WeightDecayType]} (a WeightDecayType or its "
        f"name), got {value!r}; ours is use_decoupled_weight_decay (True: DECOUPLED, False: L2)"
    )


def _translate_weight_decay(group: dict[str, Any], value: Any) -> None:
    kind = _weight_decay_type(value)
    if kind is WeightDecayType.CORRECTED:
        raise ValueError(
            "weight_decay_type=CORRECTED (decay scaled by lr / peak_lr each step) has no counterpart here; "
            "use_decoupled_weight_decay=True with a schedule that also scales weight_decay, or DECOUPLED"
        )
    group["use_decoupled_weight_decay"] = kind is not WeightDecayType.L2
    if kind is WeightDecayType.INDEPENDENT:
        peak = group.get("peak_lr", group["lr"])
        peak = float(peak.item()) if isinstance(peak, Tensor) else float(peak)
        if not peak > 0.0:
            raise ValueError(f"weight_decay_type=INDEPENDENT needs a peak_lr (or lr) > 0, got {peak}")
        group["weight_decay"] = float(group["weight_decay"]) / peak


_AVERAGING_FIELDS = {
    "GeneralizedPrimalAveragingConfig": (
        GeneralizedPrimalAveragingConfig,
        ("eval_interp_coeff", "train_interp_coeff"),
    ),
    "ScheduleFreeConfig": (ScheduleFreeConfig, ("train_interp_coeff", "eval_coeff_lr_power")),
    "ClassicMomentumConfig": (ClassicMomentumConfig, ("momentum", "dampening", "use_nesterov")),
}


def _ours(value: Any) -> Any:
    """Distributed Shampoo's averaging config (same class name and fields) as ours."""
    entry = _AVERAGING_FIELDS.get(type(value).__name__)
    if entry is None or isinstance(value, entry[0]):
        return value
    cls, fields = entry
    missing = [f for f in fields if not hasattr(value, f)]
    if missing:
        raise ValueError(f"iterate_averaging_config={type(value).__name__}(...) lacks {missing}")
    return cls(**{f: getattr(value, f) for f in fields})


def _translate_averaging(group: dict[str, Any], value: Any) -> None:
    value = _ours(value)
    if isinstance(value, GeneralizedPrimalAveragingConfig | ScheduleFreeConfig):
        if group.get("momentum", 0.0) != 0.0:
            raise ValueError(
                f"iterate_averaging_config={type(value).__name__}(...) replaces momentum; got momentum="
                f"{group['momentum']} too (set momentum=0, or use ClassicMomentumConfig)"
            )
        group["iterate_averaging_config"] = value
        group.setdefault("train_mode", True)
        return
    if not isinstance(value, ClassicMomentumConfig):
        kind = (
            "an IterateAveragingConfig" if isinstance(value, IterateAveragingConfig) else type(value).__name__
        )
        raise ValueError(
            "iterate_averaging_config must be None, ClassicMomentumConfig, GeneralizedPrimalAveragingConfig "
            f"or ScheduleFreeConfig (from lightning_shampoo), got {kind}; ClassicMomentumConfig's "
            "counterparts are the momentum, dampening and use_nesterov options"
        )
    group["momentum"] = value.momentum
    group["dampening"] = value.dampening
    group["use_nesterov"] = value.use_nesterov


def translate_group(group: dict[str, Any]) -> None:
    """Replace Distributed Shampoo's keys in ``group`` by ours, in place (module docstring).
    A key whose value is ``None`` (Distributed Shampoo's "not set") is simply removed."""
    if group.get("distributed_config") is not None:
        raise ValueError(
            "distributed_config has no counterpart here: shard a Shampoo with Shampoo.shard(process_group) "
            "or train with strategy='shampoo_ddp' / 'shampoo_fsdp' (its target_parameter_dimensionality: "
            "use_merge_dims=False keeps dims unmerged)"
        )
    weight_decay_type = group.pop("weight_decay_type", None)
    if weight_decay_type is not None:
        _translate_weight_decay(group, weight_decay_type)
    averaging = group.pop("iterate_averaging_config", None)
    if averaging is not None:
        _translate_averaging(group, averaging)
    pin = group.pop("use_pin_memory", False)
    if not isinstance(pin, bool):
        raise ValueError(f"use_pin_memory must be a bool, got {pin!r}")
    if group.pop("shampoo_pt2_compile_config", None) is not None:
        raise ValueError(
            "shampoo_pt2_compile_config applies to the whole optimizer, not to a param group: "
            "Shampoo(params, shampoo_pt2_compile_config=ShampooPT2CompileConfig(...))"
        )
    group.pop("distributed_config", None)
    group.pop("peak_lr", None)


def constructor_keys(defaults: dict[str, Any], **given: Any) -> dict[str, Any]:
    """The Distributed Shampoo keys given to ``Shampoo(...)`` (those not ``None`` / ``False``), to
    join its defaults — every param group then translates them with its own values, as Distributed
    Shampoo applies them per group (``peak_lr`` is the constructor's ``lr``, as there). Refuses
    a call that also sets the options they map to, to a different value."""
    keys = {k: v for k, v in given.items() if v is not None and v is not False}
    averaging = keys.get("iterate_averaging_config")
    if averaging is not None and type(averaging).__name__ == "ClassicMomentumConfig":
        ours = {k: defaults[k] for k in ("momentum", "dampening", "use_nesterov")}
        if ours != {"momentum": 0.0, "dampening": 0.0, "use_nesterov": False}:
            raise ValueError(
                f"iterate_averaging_config and {ours} both set momentum; give one of them "
                "(ClassicMomentumConfig maps to momentum, dampening and use_nesterov)"
            )
    if keys.get("weight_decay_type") is not None:
        kind = _weight_decay_type(keys["weight_decay_type"])
        if not defaults["use_decoupled_weight_decay"] and kind is not WeightDecayType.L2:
            raise ValueError(
                f"weight_decay_type={kind.name} contradicts use_decoupled_weight_decay=False; "
                "give one of them"
            )
        if kind is WeightDecayType.INDEPENDENT:
            keys["peak_lr"] = defaults["lr"]
    return keys
