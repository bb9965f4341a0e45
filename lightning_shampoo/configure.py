"""``configure_shampoo``: param groups, preset defaults and an optional LR schedule in one call.

The presets (``preconditioner=`` name; a config object picks the preset of its family) and why
they are set as they are: ``lightning_shampoo.presets``.

Param groups: matrices and conv kernels (two or more dims of size > 1) get the preset's
preconditioner and ``weight_decay``; biases, norm weights, scalars and matrices with a size-1 dim
get Adam (``AdamPreconditionerConfig``) without weight decay; frozen parameters are skipped and
tied ones appear once. ``param_groups={pattern: options}`` overrides by parameter name.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ._checks import require_choice, require_float, require_int, require_pair
from ._validation import CONSTRUCTOR_ONLY, validate_constructor_options
from .optim import Shampoo
from .preconditioners import (
    AdamPreconditionerConfig,
    PreconditionerConfig,
)
from .presets import (
    EPSILON_RTOL,
    FACTOR_RATIO,
    PRESET_NAMES,
    SHAMPOO_BETAS,
    SHAMPOO_BLOCK_DIM,
    SOAP_FACTOR_RATIO,
    Preset,
    device_refresh_config,
    module_device_type,
    resolve_preset,
    with_epsilon_rtol,
)
from .schedules import WarmupConstant, WarmupCosine, WarmupLinear

__all__ = [
    "EPSILON_RTOL",
    "FACTOR_RATIO",
    "PRESET_NAMES",
    "SHAMPOO_BETAS",
    "SHAMPOO_BLOCK_DIM",
    "SOAP_FACTOR_RATIO",
    "Preset",
    "configure_shampoo",
    "device_refresh_config",
    "module_device_type",
    "resolve_preset",
    "with_epsilon_rtol",
]
SCHEDULES = {"cosine": WarmupCosine, "linear": WarmupLinear, "constant": WarmupConstant}
#: Shampoo param-group keys (everything ``Shampoo.__init__`` takes except ``params`` and the
#: constructor-only switches).
_CONSTRUCTOR_ONLY = CONSTRUCTOR_ONLY
GROUP_KEYS = tuple(
    name
    for name in inspect.signature(Shampoo.__init__).parameters
    if name not in ("self", "params", *_CONSTRUCTOR_ONLY)
)


def _is_matrix(p: torch.Tensor) -> bool:
    return sum(d > 1 for d in p.shape) >= 2


_HEAD_NAMES = {"head", "lm_head", "classifier", "fc_out", "output", "output_layer", "readout"}


def _embeddings_and_head(module: nn.Module) -> set[int]:
    """Muon keeps these on Adam: embedding tables, and the output head — a ``Linear`` whose own
    name is a usual head name, else the last ``Linear`` registered (override by pattern if the
    model registers its head elsewhere)."""
    ids: set[int] = set()
    named_heads, last_linear = [], None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag):
            ids.add(id(sub.weight))
        if isinstance(sub, nn.Linear):
            last_linear = sub
            if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
                named_heads.append(sub)
    for head in named_heads or ([last_linear] if last_linear is not None else []):
        ids.add(id(head.weight))
    return ids


def _matcher(pattern: str) -> Callable[[str], bool]:
    """``re:<regex>`` (``re.fullmatch``) or a glob (``fnmatch``, case-sensitive)."""
    if pattern.startswith("re:"):
        try:
            compiled = re.compile(pattern[3:])
        except re.error as error:
            raise ValueError(f"param_groups pattern {pattern!r} is not a valid regex: {error}") from None
        return lambda name: compiled.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _check_pair(name: str, value: Any) -> tuple[float, float]:
    b1, b2 = require_pair(name, value, lambda n, v: require_float(n, v), ("beta1", "beta2"))
    require_float(f"{name}[0]", b1, low=0.0, high=1.0, high_open=True)
    require_float(f"{name}[1]", b2, low=0.0, high=1.0, low_open=True)
    return float(b1), float(b2)


class _Layout:
    """The option dicts of each kind of parameter under one preset and the caller's arguments."""

    def __init__(self, preset: Preset, args: dict[str, Any], kwargs: dict[str, Any]) -> None:
        betas = args["betas"] if args["betas"] is not None else preset.betas
        self.betas = _check_pair("betas", betas)
        adam = args["adam_betas"]
        if adam is None:
            b1 = self.betas[0] if preset.tie_beta1 else preset.adam_betas[0]
            adam = (b1, preset.adam_betas[1])
        self.adam_betas = _check_pair("adam_betas", adam)
        eps = require_float("adam_epsilon", args["adam_epsilon"], low=0.0, low_open=True)
        self.adam = AdamPreconditionerConfig(beta2=self.adam_betas[1], epsilon=float(eps))
        self.args, self.kwargs = args, kwargs
        frequency = args.get("precondition_frequency")
        self.frequency = preset.precondition_frequency if frequency is None else frequency

    def preconditioned(self, preset: Preset, *, main: bool) -> dict[str, Any]:
        """Options of a parameter under ``preset``'s preconditioner (``main``: the caller's
        arguments apply; for a preset named in an override, its own defaults do)."""
        args = self.args if main else {}

        def pick(key: str, default: Any) -> Any:
            value = args.get(key)
            return default if value is None else value

        config = preset.config
        if preset.name == "adam" and config == AdamPreconditionerConfig():
            config = self.adam  # the Adam side's β₂ and epsilon
        opts = {
            "preconditioner_config": config,
            "grafting_config": self.adam if preset.graft else None,
            "betas": self.betas if main else (self.betas[0], preset.betas[1]),
            "epsilon": float(pick("epsilon", preset.epsilon)),
            "precondition_frequency": pick("precondition_frequency", preset.precondition_frequency),
            "start_preconditioning_step": pick(
                "start_preconditioning_step", preset.start_preconditioning_step
            ),
            "max_preconditioner_dim": pick("max_preconditioner_dim", preset.max_preconditioner_dim),
            "use_merge_dims": preset.use_merge_dims,
            "refresh_stagger": True,  # the same refreshes, spread over the interval
            "target_parameter_dimensionality": preset.target_parameter_dimensionality,
            "max_factor_dim": preset.max_factor_dim,
            "max_factor_ratio": preset.max_factor_ratio,
        }
        return {**opts, **self.kwargs}

    def diagonal(self) -> dict[str, Any]:
        """Adam on parameters a Kronecker factorisation does not serve."""
        common = {k: v for k, v in self.kwargs.items() if k not in ("grafting_config", "betas", "epsilon")}
        return {
            "refresh_stagger": True,  # moot for Adam (no refresh); the caller's value wins
            **common,
            "preconditioner_config": self.adam,
            "grafting_config": None,
            "betas": self.adam_betas,
            "precondition_frequency": self.frequency,
            "start_preconditioning_step": -1,
        }


def _lr_scheduler(
    module: nn.Module,
    optimizer: Shampoo,
    schedule: str,
    warmup_steps: int | float,
    total_steps: int | None,
    min_lr_ratio: float,
) -> dict[str, Any]:
    if total_steps is None:
        try:
            trainer: Any = getattr(module, "trainer", None)
        except RuntimeError:  # a LightningModule not attached to a Trainer
            trainer = None
        if trainer is None:
            raise ValueError(
                "total_steps is required for an LR schedule when the module is not attached to a Trainer"
            )
        estimated = trainer.estimated_stepping_batches
        if not math.isfinite(estimated):
            raise ValueError(
                "total_steps is required: the Trainer's estimated_stepping_batches is infinite "
                "(set max_steps or max_epochs)"
            )
        total_steps = int(estimated)
    require_int("total_steps", total_steps, low=1)
    if isinstance(warmup_steps, float):
        warmup_steps = round(warmup_steps * total_steps)
    multiplier = SCHEDULES[schedule](total_steps, min(warmup_steps, total_steps), float(min_lr_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}


def _check_schedule_arguments(schedule: Any, warmup_steps: Any, total_steps: Any, min_lr_ratio: Any) -> None:
    """Checked whether or not a schedule is asked for: a bad value is a mistake either way."""
    require_choice("schedule", schedule, (*SCHEDULES, None))
    if isinstance(warmup_steps, float):
        require_float("warmup_steps", warmup_steps, low=0.0, high=1.0, high_open=True)
    else:
        require_int("warmup_steps", warmup_steps, low=0)
    require_int("total_steps", total_steps, low=1, allow_none=True)
    require_float("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)


def configure_shampoo(
    module: nn.Module,
    preconditioner: str | PreconditionerConfig = "shampoo",
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    epsilon: float | None = None,
    adam_betas: tuple[float, float] | None = None,
    adam_epsilon: float = 1e-8,
    precondition_frequency: int | None = None,
    start_preconditioning_step: int | float | None = None,
    max_preconditioner_dim: int | float | None = None,
    param_groups: Mapping[str, Mapping[str, Any]] | None = None,
    schedule: str | None = None,
    warmup_steps: int | float = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    **shampoo_kwargs: Any,
) -> Shampoo | dict[str, Any]:
    """What ``configure_optimizers`` returns for a Shampoo-family optimizer over ``module``.

    Args:
        preconditioner: a preset name (module docstring) or a preconditioner config.
        lr, weight_decay: as for AdamW (decay is decoupled, on matrices only).
        betas: ``(β₁, factor β₂)`` of the preconditioned groups; ``None``: the preset's.
        epsilon, precondition_frequency, start_preconditioning_step, max_preconditioner_dim:
            Shampoo's; ``None``: the preset's.
        adam_betas, adam_epsilon: the Adam side (non-matrix parameters and Adam grafting);
            ``adam_betas=None``: ``(betas[0], preset β₂)`` (Muon: ``(0.9, 0.95)``).
        param_groups: ``{pattern: options}``, first match wins. Patterns are globs on parameter
            names (``"encoder.*.bias"``) or ``"re:<regex>"``; options are Shampoo group keys
            (``lr``, ``weight_decay``, ``preconditioner_config``, …) and ``preconditioner`` (a
            preset name or config; ``"adam"`` gives the diagonal Adam treatment).
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after ``warmup_steps`` (an int, or a
            fraction of the total); ``None`` with ``warmup_steps > 0`` means ``"constant"``.
        total_steps: default ``module.trainer.estimated_stepping_batches``.
        min_lr_ratio: final LR of the decay as a fraction of ``lr``.
        shampoo_kwargs: further ``Shampoo`` arguments (``momentum``, ``beta3``, ``use_bucketing``…).

    Returns:
        the ``Shampoo``, or ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval":
        "step"}}`` when a schedule is asked for. Every bad argument raises ``ValueError`` naming it.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    preset = resolve_preset(preconditioner)
    device_type = module_device_type(module)
    if isinstance(preconditioner, str):  # a preset's refresh follows the device; a config is kept
        preset = replace(preset, config=device_refresh_config(preset.config, device_type))
    for key in shampoo_kwargs:
        if key in ("preconditioner_config", "params"):
            raise ValueError(f"{key} is not an argument of configure_shampoo; use preconditioner=...")
        if key not in GROUP_KEYS and key not in _CONSTRUCTOR_ONLY:
            raise ValueError(f"unknown argument {key!r} (not a configure_shampoo or Shampoo argument)")
    _check_schedule_arguments(schedule, warmup_steps, total_steps, min_lr_ratio)
    require_float("epsilon", epsilon, low=0.0, allow_none=True)
    if schedule is None and warmup_steps:
        schedule = "constant"
    constructor = {k: shampoo_kwargs.pop(k) for k in _CONSTRUCTOR_ONLY if k in shampoo_kwargs}
    validate_constructor_options(**{"use_bucketing": True, "max_bucket_numel": 2**21, **constructor})
    args = {
        "betas": betas,
        "adam_betas": adam_betas,
        "adam_epsilon": adam_epsilon,
        "epsilon": epsilon,
        "precondition_frequency": precondition_frequency,
        "start_preconditioning_step": start_preconditioning_step,
        "max_preconditioner_dim": max_preconditioner_dim,
    }
    layout = _Layout(preset, args, shampoo_kwargs)
    overrides = _parse_overrides(param_groups)
    adam_matrices = _embeddings_and_head(module) if preset.adam_embeddings_and_head else set()

    groups: dict[str, dict[str, Any]] = {}
    used = [False] * len(overrides)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        matrix = _is_matrix(p)
        if matrix and id(p) not in adam_matrices:
            label, opts = preset.name, layout.preconditioned(preset, main=True)
        else:  # Adam; Muon's embeddings and head keep their weight decay
            label, opts = ("adam" if matrix else "adam_no_decay"), layout.diagonal()
        opts["weight_decay"] = weight_decay if matrix else 0.0
        opts["lr"] = lr
        hits = [i for i, (_, match, _) in enumerate(overrides) if match(name)]
        for i in hits:
            used[i] = True
        for pattern, _, override in (overrides[i] for i in hits[:1]):  # the first match wins
            override = dict(override)
            chosen = override.pop("preconditioner", None)
            if chosen is not None:
                chosen_preset = resolve_preset(chosen)
                if isinstance(chosen, str):
                    config = device_refresh_config(chosen_preset.config, device_type)
                    chosen_preset = replace(chosen_preset, config=config)
                if isinstance(chosen_preset.config, AdamPreconditionerConfig):
                    base = layout.diagonal()
                    if chosen_preset.config != AdamPreconditionerConfig():  # a config object
                        base["preconditioner_config"] = chosen_preset.config
                else:
                    base = layout.preconditioned(chosen_preset, main=chosen_preset.name == preset.name)
                opts.update(base)
            opts.update(override)
            label = f"{pattern} ({label})"
        group = groups.setdefault(label, {**opts, "name": label, "params": []})
        group["params"].append((name, p))
    for (pattern, _, _), hit in zip(overrides, used):
        if not hit:
            raise ValueError(f"param_groups pattern {pattern!r} matches no trainable parameter")
    if not groups:
        raise ValueError("module has no trainable parameters")
    optimizer = Shampoo(list(groups.values()), **constructor)
    optimizer.configure_new_groups(
        _new_group_defaults(preset, layout, lr, weight_decay),
        names={id(p): name for name, p in module.named_parameters(remove_duplicate=False)},
    )
    optimizer.origin = f"configure_shampoo(preconditioner={preset.name!r})"
    if schedule is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": _lr_scheduler(module, optimizer, schedule, warmup_steps, total_steps, min_lr_ratio),
    }


def _new_group_defaults(preset: Preset, layout: _Layout, lr: float, weight_decay: float) -> dict[str, Any]:
    """What a group added later (``add_param_group``: a fine-tuning callback unfreezing a
    backbone) gets for the keys it leaves out: the preset's matrix options, ``lr`` and
    ``weight_decay``; where the preset grafts, its vectors (biases, norm scales) are left to the
    Adam grafting alone (``skip_preconditioning_rank_lt=2``), as the preset's own Adam group
    steps them. One added group stays one group (its LR schedule and the callback's bookkeeping
    are per group), so its weight decay applies to all its parameters, as torch's does."""
    defaults = {**layout.preconditioned(preset, main=True), "lr": lr, "weight_decay": weight_decay}
    if defaults.get("grafting_config") is not None:
        defaults["skip_preconditioning_rank_lt"] = 2
    return defaults


def _parse_overrides(
    param_groups: Mapping[str, Mapping[str, Any]] | None,
) -> list[tuple[str, Callable[[str], bool], Mapping[str, Any]]]:
    if param_groups is None:
        return []
    if not isinstance(param_groups, Mapping):
        raise ValueError(
            f"param_groups must be a mapping {{pattern: options}}, got {type(param_groups).__name__}"
        )
    out = []
    for pattern, options in param_groups.items():
        if not isinstance(pattern, str) or not isinstance(options, Mapping):
            raise ValueError(
                f"param_groups must map str patterns to option dicts, got {pattern!r}: {options!r}"
            )
        for key in options:
            if key not in GROUP_KEYS and key != "preconditioner":
                raise ValueError(f"param_groups[{pattern!r}]: unknown option {key!r}")
        out.append((pattern, _matcher(pattern), options))
    return out
