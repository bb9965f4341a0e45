"""What ``Shampoo`` accepts: param groups (values and keys), parameters, gradients.

Every refusal is a ``ValueError`` naming the argument (and, for parameters, the parameter), raised
when the group is added — never later, inside a step.

Unknown group keys. torch lets param groups carry any key, and real projects rely on it: LR
schedulers write ``initial_lr`` / ``max_lr`` / ``base_momentum``, Lightning's fine-tuning restores
whole saved groups, libraries keep per-group metadata (``name``, ``lr_scale``, ``layer_id``), and
``ShampooCallback`` carries all of them over from the optimizer it wraps. Refusing every key we do
not read would break those projects, so the rule is: a key is refused when it is

* another optimizer's spelling of one of our settings (``eps``, ``nesterov``, ``beta1``,
  ``beta2``, ``maximize``, …) — silently ignoring it would run with our default instead; or
* a near-miss of one of our keys (``weight_decya``, ``Lr``, ``momentun``): a case-insensitive
  similarity of at least 0.8 to a Shampoo key, and not a known scheduler or Lightning key;

the message names the key and lists Shampoo's group keys. Any other key is kept as metadata,
unread, as torch does.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import describe, require_bool, require_float, require_int, require_pair
from .compat import DS_ONLY_KEYS, translate_group
from .preconditioners import GRAFTING_CONFIGS, PreconditionerConfig, PSGDKronPreconditionerConfig
from .pt2 import as_compile_config

__all__ = [
    "CONSTRUCTOR_ONLY",
    "GROUP_CHECKS",
    "check_grad",
    "check_group_values",
    "check_lr",
    "validate_constructor_options",
    "validate_group",
    "validate_params",
]

#: ``Shampoo`` arguments that configure the optimizer as a whole, not a param group.
CONSTRUCTOR_ONLY = ("use_bucketing", "max_bucket_numel", "shampoo_pt2_compile_config")

#: Keys that schedulers and Lightning write into param groups (never near-misses, whatever they
#: resemble: ``max_momentum`` is OneCycleLR's, not a misspelt ``momentum``).
METADATA_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum", "swa_lr", "name"}
)
#: Other optimizers' names for our settings (``None``: no equivalent).
FOREIGN_KEYS: dict[str, str | None] = {
    "eps": "epsilon",
    "nesterov": "use_nesterov",
    "beta1": "betas",
    "beta2": "betas",
    "decoupled_weight_decay": "use_decoupled_weight_decay",
    "maximize": None,
    "amsgrad": None,
}
_SIMILARITY = 0.8


def check_lr(name: str, lr: Any) -> None:
    """A finite real ``>= 0`` or a one-element tensor holding one (read once, at construction)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_complex():
            raise ValueError(
                f"{name} must be a number or a one-element real tensor, got a {lr.dtype} tensor of "
                f"shape {tuple(lr.shape)}"
            )
        require_float(name, float(lr.detach().item()), low=0.0)
        return
    require_float(name, lr, low=0.0)


def _unit(name: str, value: Any, *, low_open: bool, high_open: bool) -> Any:
    return require_float(name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def _betas(name: str, value: Any) -> None:
    beta1, beta2 = require_pair(name, value, lambda n, v: require_float(n, v), ("beta1", "beta2"))
    _unit(f"{name}[0]", beta1, low_open=False, high_open=True)
    _unit(f"{name}[1]", beta2, low_open=True, high_open=False)


def _beta3(name: str, value: Any) -> None:
    require_float(name, value)
    if value != -1 and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be -1 (use betas[0]) or in [0, 1), got {value!r}")


def _start(name: str, value: Any) -> None:
    require_int(name, value, low=-1, allow_inf=True)
    if value == 0:
        raise ValueError(f"{name} must be -1 (precondition_frequency), an int >= 1 or math.inf, got 0")


#: Per-key checks of a group's values, shared by construction and ``load_state_dict``. Only
#: single-value rules live here: cross-key rules (epsilon > 0 without pseudo-inverse, start >=
#: frequency, Nesterov needs momentum) hold at construction only, since a frequency scheduler
#: legitimately moves ``precondition_frequency`` past ``start_preconditioning_step`` later.
GROUP_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "lr": check_lr,
    "betas": _betas,
    "beta3": _beta3,
    "epsilon": lambda n, v: require_float(n, v, low=0.0),
    "momentum": lambda n, v: _unit(n, v, low_open=False, high_open=True),
    "dampening": lambda n, v: _unit(n, v, low_open=False, high_open=True),
    "weight_decay": lambda n, v: require_float(n, v, low=0.0),
    "max_preconditioner_dim": lambda n, v: require_int(n, v, low=1, allow_inf=True),
    "precondition_frequency": lambda n, v: require_int(n, v, low=1),
    "start_preconditioning_step": _start,
    "refresh_tolerance": lambda n, v: require_float(n, v, low=0.0, allow_inf=True, allow_none=True),
    "skip_preconditioning_rank_lt": lambda n, v: require_int(n, v, low=0),
    "target_parameter_dimensionality": lambda n, v: require_int(n, v, low=1, allow_inf=True),
    "max_factor_dim": lambda n, v: require_int(n, v, low=1, allow_inf=True),
    "max_factor_ratio": lambda n, v: require_float(n, v, low=1.0, allow_inf=True),
    "use_bias_correction": require_bool,
    "use_decoupled_weight_decay": require_bool,
    "use_nesterov": require_bool,
    "use_torch_momentum": require_bool,
    "use_merge_dims": require_bool,
    "refresh_stagger": require_bool,
    "stacked": require_bool,
    "step": lambda n, v: require_int(n, v, low=0),
}


def check_group_values(group: Mapping[str, Any], where: str = "") -> None:
    """Run :data:`GROUP_CHECKS` on the keys ``group`` has; ``where`` prefixes the argument name."""
    for key, check in GROUP_CHECKS.items():
        if key in group:
            check(f"{where}{key}", group[key])


def validate_constructor_options(
    use_bucketing: Any, max_bucket_numel: Any, shampoo_pt2_compile_config: Any = None
) -> Any:
    """The :data:`CONSTRUCTOR_ONLY` arguments of ``Shampoo``; returns the compile config as ours."""
    require_bool("use_bucketing", use_bucketing)
    require_int("max_bucket_numel", max_bucket_numel, low=1, allow_none=True)
    return as_compile_config(shampoo_pt2_compile_config)


def _pseudo_inverse(config: Any) -> bool:
    return bool(getattr(getattr(config, "amortized_computation_config", None), "pseudo_inverse", False))


def validate_group(group: dict[str, Any]) -> None:
    """Validate ``group`` in place (resolving ``start_preconditioning_step=-1`` and translating
    Distributed Shampoo's newer names, ``compat.translate_group``)."""
    translate_group(group)
    check_group_values(group)
    group["betas"] = (float(group["betas"][0]), float(group["betas"][1]))
    beta1 = group["betas"][0]
    config = group["preconditioner_config"]
    if not isinstance(config, PreconditionerConfig):
        raise ValueError(
            f"preconditioner_config must be a preconditioner config instance, got {type(config).__name__}"
        )
    if isinstance(config, PSGDKronPreconditionerConfig) and not config.whiten_grad and beta1 == 0.0:
        raise ValueError(
            "PSGDKronPreconditionerConfig(whiten_grad=False) fits the preconditioner on the momentum, "
            "which needs betas[0] > 0; got betas[0] = 0.0 (set betas[0] or use whiten_grad=True)"
        )
    if not _pseudo_inverse(config) and not group["epsilon"] > 0.0:
        raise ValueError(f"epsilon must be > 0 (or use pseudo_inverse=True), got {group['epsilon']!r}")
    if group["use_nesterov"] and group["momentum"] == 0.0:
        raise ValueError("use_nesterov requires momentum > 0")
    if group["use_nesterov"] and group.get("use_torch_momentum") and group["dampening"] != 0.0:
        raise ValueError("use_nesterov with use_torch_momentum requires dampening = 0, as torch.optim.SGD")
    frequency = group["precondition_frequency"]
    if group["start_preconditioning_step"] == -1:
        group["start_preconditioning_step"] = frequency
    start = group["start_preconditioning_step"]
    if start < frequency:
        raise ValueError(
            f"start_preconditioning_step ({start}) must be >= precondition_frequency ({frequency}) or -1"
        )
    graft = group["grafting_config"]
    if graft is not None and not isinstance(graft, GRAFTING_CONFIGS):
        raise ValueError(
            "grafting_config must be None or one of "
            f"{[c.__name__ for c in GRAFTING_CONFIGS]}, got {type(graft).__name__}"
        )
    if group.get("skip_preconditioning_rank_lt", 0) > 0 and graft is None:
        raise ValueError(
            "skip_preconditioning_rank_lt > 0 needs a grafting_config: it steps the skipped parameters"
        )


def _check_keys(group: Mapping[str, Any], known: Sequence[str]) -> None:
    names, lowered = set(known), {k.lower(): k for k in known}
    listing = f"Shampoo's param-group keys are {sorted(known)}"
    for key in group:
        if not isinstance(key, str):
            raise ValueError(f"param group keys must be str, got {describe(key)}")
        if key in names or key in METADATA_KEYS:
            continue
        if key in CONSTRUCTOR_ONLY:
            raise ValueError(
                f"{key} is an argument of Shampoo(...) for the whole optimizer, not a param-group option"
            )
        if key in FOREIGN_KEYS:
            ours = FOREIGN_KEYS[key]
            hint = f"Shampoo calls it {ours!r}" if ours else "Shampoo has no such option"
            raise ValueError(f"param group key {key!r} is not a Shampoo option ({hint}); {listing}")
        close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=_SIMILARITY)
        if close:
            raise ValueError(
                f"unknown param group key {key!r} (did you mean {lowered[close[0]]!r}?); {listing}; "
                "other keys are kept as metadata"
            )


def validate_params(
    group: Mapping[str, Any], defaults: Mapping[str, Any], seen: Sequence[Tensor], seen_names: Sequence[str]
) -> dict[str, Any]:
    """``group`` (a copy, its ``params`` materialised as a list) if its keys and parameters are
    acceptable: no misspelt or foreign key (module docstring), no complex or sparse parameter,
    no parameter twice (within the group, or already in ``seen``, the optimizer's parameters,
    named ``seen_names``). Called before torch's own ``add_param_group`` checks, so that these
    refusals name the parameter."""
    if not isinstance(group, Mapping):
        raise ValueError(f"a param group must be a dict, got {describe(group)}")
    if "params" not in group:
        raise ValueError("a param group must have a 'params' key")
    out = dict(group)
    _check_keys(out, [*defaults, "params", "param_names", "step", "train_mode", *DS_ONLY_KEYS])
    params = out["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        return out  # torch refuses sets (their order is undefined) with its own message
    out["params"] = params = list(params)
    given = out.get("param_names")
    ids = {id(p): i for i, p in enumerate(seen)}
    mine: dict[int, str] = {}
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2:
            name, p = item
        else:
            p = item
            name = given[i] if given and i < len(given) else f"param{len(seen) + i}"
        if not isinstance(p, Tensor):
            continue  # torch refuses it with its own message
        if p.is_complex():
            raise ValueError(
                f"parameter {name!r} is complex ({p.dtype}); Shampoo optimizes real tensors only. Keep it "
                "as a real parameter in torch.view_as_real layout (a trailing dim of 2) and use "
                "torch.view_as_complex(p) in forward"
            )
        if p.layout != torch.strided:
            raise ValueError(f"parameter {name!r} has layout {p.layout}; only dense (strided) tensors")
        if id(p) in mine:
            raise ValueError(f"parameter {name!r} appears twice in its param group (as {mine[id(p)]!r})")
        if id(p) in ids:
            raise ValueError(
                f"parameter {name!r} is already in this optimizer (as {seen_names[ids[id(p)]]!r}); "
                "a parameter may appear in one param group only"
            )
        mine[id(p)] = name
    return out


def check_grad(name: str, grad: Tensor | None) -> Tensor | None:
    """``grad`` if the step can use it; sparse gradients (``nn.Embedding(sparse=True)``) are
    refused naming the parameter, before they fail somewhere inside a reshape."""
    if grad is not None and grad.layout != torch.strided:
        raise ValueError(
            f"parameter {name!r}: sparse gradients are not supported (got a {grad.layout} gradient); "
            "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
        )
    return grad
