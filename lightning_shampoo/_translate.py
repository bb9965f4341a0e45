"""torch.optim optimizer → a ``Shampoo`` that grafts from exactly that optimizer.

The translated optimizer keeps every param group (same order, same parameters, same lr and weight
decay, and every extra key an LR scheduler put there such as ``initial_lr``), so the schedulers
returned next to the original can be re-pointed at it and produce the same learning rates. Before
``start_preconditioning_step`` a ``Shampoo`` steps with its grafting direction alone, which the
mapping below makes equal to the source optimizer's update:

=========================  ==========================================================================
``Adam(betas=(b1, b2))``   ``betas=(b1, β)``, ``grafting_config=AdamPreconditionerConfig(b2, eps)``,
                           L2 weight decay (``decoupled_weight_decay=True`` / ``AdamW``: decoupled)
``SGD``                    ``betas=(0, β)``, SGD grafting, ``momentum``, ``dampening``, ``use_nesterov``,
                           ``use_torch_momentum=True`` (torch's undamped first step), L2
``RMSprop(alpha)``         ``betas=(0, β)``, ``RMSpropPreconditionerConfig(alpha, eps)``, ``momentum``, L2
``Adagrad``                ``betas=(0, β)``, ``AdaGradPreconditionerConfig(eps)``, L2
=========================  ==========================================================================

``β`` (the factor EMA) and the preconditioner settings come from the caller; with
``skip_preconditioning_rank_lt`` among them, the parameters it skips take the grafting direction
alone — the source optimizer's update — for the whole run.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._validation import CONSTRUCTOR_ONLY
from .optim import Shampoo
from .preconditioners import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    RMSpropPreconditionerConfig,
    SGDPreconditionerConfig,
)

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "GroupTranslator",
    "rebind_scheduler",
    "translate_optimizer",
    "translate_output",
]

#: Shampoo's param-group keys (its constructor's arguments but ``params``).
SHAMPOO_GROUP_KEYS = tuple(
    p for p in inspect.signature(Shampoo.__init__).parameters if p not in ("self", "params")
)

#: Source optimizers, matched by exact type: a subclass may change the update in ways a
#: translation would silently drop.
SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.AdamW,
    torch.optim.Adam,
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)

# Options that change the update and have no Shampoo equivalent: (key, value that is fine).
_UNSUPPORTED: dict[type, tuple[tuple[str, Any], ...]] = {
    torch.optim.Adam: (("amsgrad", False), ("maximize", False), ("differentiable", False)),
    torch.optim.AdamW: (("amsgrad", False), ("maximize", False), ("differentiable", False)),
    torch.optim.SGD: (("maximize", False), ("differentiable", False)),
    torch.optim.RMSprop: (("centered", False), ("maximize", False), ("differentiable", False)),
    torch.optim.Adagrad: (
        ("lr_decay", 0),
        ("initial_accumulator_value", 0),
        ("maximize", False),
        ("differentiable", False),
    ),
}


def _float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _translate_group(kind: type, group: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The Shampoo keys that reproduce ``kind``'s update for one param group."""
    for key, fine in _UNSUPPORTED[kind]:
        if key in group and group[key] != fine:
            raise ValueError(
                f"{where}: {key}={group[key]!r} has no Shampoo equivalent; remove it, or return a "
                "Shampoo from configure_optimizers yourself"
            )
    wd = _float(group.get("weight_decay", 0.0))
    out: dict[str, Any] = {"lr": group["lr"], "weight_decay": wd, "use_bias_correction": True}
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        b1, b2 = (_float(b) for b in group["betas"])
        out["beta1"] = b1
        out["grafting_config"] = AdamPreconditionerConfig(beta2=b2, epsilon=_float(group["eps"]))
        out["use_decoupled_weight_decay"] = bool(
            group.get("decoupled_weight_decay", kind is torch.optim.AdamW)
        )
        out["momentum"] = 0.0
        return out
    out["beta1"] = 0.0
    out["use_decoupled_weight_decay"] = False  # torch's SGD / RMSprop / Adagrad decay is L2
    if kind is torch.optim.SGD:
        out["grafting_config"] = SGDPreconditionerConfig()
        out["momentum"] = _float(group["momentum"])
        out["dampening"] = _float(group["dampening"])
        out["use_nesterov"] = bool(group["nesterov"])
        out["use_torch_momentum"] = True  # SGD's first step is undamped (Shampoo's default damps it)
    elif kind is torch.optim.RMSprop:
        out["grafting_config"] = RMSpropPreconditionerConfig(
            beta2=_float(group["alpha"]), epsilon=_float(group["eps"])
        )
        out["momentum"] = _float(group["momentum"])
    else:
        out["grafting_config"] = AdaGradPreconditionerConfig(epsilon=_float(group["eps"]))
        out["momentum"] = 0.0
    return out


@dataclass(frozen=True)
class GroupTranslator:
    """One source optimizer's param group → the Shampoo group that reproduces it (see the module
    docstring), for the groups at translation and for groups added later (``add_param_group``:
    missing keys from the source's defaults, as torch fills them)."""

    kind: type
    source_defaults: Mapping[str, Any] = field(compare=False)
    options: Mapping[str, Any] = field(compare=False)
    factor_beta: float | None
    default_factor_beta: float
    shampoo_only: frozenset[str]  # Shampoo keys the source does not have: such a group is ours

    def translate(self, group: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The Shampoo group (``params`` and ``param_names`` as given) for a source group."""
        try:
            translated = _translate_group(self.kind, group, where)
        except ValueError as error:
            raise _from_source(error, self.kind, where) from error
        beta1 = translated.pop("beta1")
        beta = self.factor_beta
        if beta is None:
            beta = getattr(translated["grafting_config"], "beta2", self.default_factor_beta)
        extra = {k: v for k, v in group.items() if k not in self.source_defaults and k != "param_names"}
        out = {**extra, **self.options, **translated, "betas": (beta1, beta)}
        if "param_names" in group:
            out["param_names"] = group["param_names"]
        return out

    def defaults(self) -> dict[str, Any]:
        """Shampoo's defaults for new groups: the source's defaults, translated."""
        out = self.translate(dict(self.source_defaults), f"{self.kind.__name__} defaults")
        out.pop("params", None)
        return out

    def __call__(self, group: dict[str, Any]) -> dict[str, Any]:
        """A group added later: translated from the source's terms (missing keys from its
        defaults); a group already in Shampoo's terms is left as it is."""
        if any(k in self.shampoo_only for k in group):
            return group
        return self.translate(
            {**self.source_defaults, **group}, f"{self.kind.__name__} param group added later"
        )


def translate_optimizer(
    optimizer: torch.optim.Optimizer,
    options: Mapping[str, Any],
    names: Mapping[int, str] | None = None,
    factor_beta: float | None = None,
    default_factor_beta: float = 1.0,
) -> Shampoo:
    """A ``Shampoo`` over ``optimizer``'s param groups that grafts from ``optimizer``.

    ``options``: Shampoo group keys applied to every group (preconditioner_config,
    precondition_frequency, start_preconditioning_step, max_preconditioner_dim, epsilon, …) and
    the constructor's ``use_bucketing`` / ``max_bucket_numel``; ``factor_beta``: ``betas[1]``
    (``None``: the source's second-moment β where it has one — Adam's β₂, RMSprop's α — else
    ``default_factor_beta``). ``names``:
    ``id(param) -> name``, so that health records carry names. Groups added to the result later
    (``add_param_group``, e.g. by ``BackboneFinetuning``) are translated the same way, with the
    source's defaults for what they leave out.
    """
    kind = type(optimizer)
    if kind not in SUPPORTED_OPTIMIZERS:
        supported = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
        raise ValueError(
            f"cannot translate {kind.__module__}.{kind.__qualname__} into Shampoo; supported: {supported} "
            "(or return a Shampoo from configure_optimizers yourself)"
        )
    if any(_float(state.get("step", 0)) > 0 for state in optimizer.state.values()):
        warnings.warn(
            f"{kind.__name__} already holds state; the Shampoo that replaces it starts fresh", stacklevel=2
        )
    options = dict(options)
    constructor = {k: options.pop(k) for k in CONSTRUCTOR_ONLY if k in options}
    names = names or {}
    translator = GroupTranslator(
        kind,
        dict(optimizer.defaults),
        options,
        factor_beta,
        default_factor_beta,
        frozenset(SHAMPOO_GROUP_KEYS) - frozenset(optimizer.defaults),
    )
    groups = []
    counter = 0
    for g, group in enumerate(optimizer.param_groups):
        given = group.get("param_names")
        params = []
        for i, p in enumerate(group["params"]):
            name = given[i] if given else names.get(id(p), f"param{counter}")
            params.append((name, p))
            counter += 1
        source = {k: v for k, v in group.items() if k != "param_names"}
        groups.append({**translator.translate(source, f"{kind.__name__} param group {g}"), "params": params})
    try:
        shampoo = Shampoo(groups, **constructor)
    except ValueError as error:
        failing = _failing_group(groups)
        failed_at = None if failing is None else f"{kind.__name__} param group {failing}"
        raise _from_source(error, kind, failed_at) from error
    shampoo.configure_new_groups(translator.defaults(), translator, names)
    shampoo.origin = f"ShampooCallback (from torch.optim.{kind.__name__})"
    return shampoo


def _from_source(error: ValueError, kind: type, where: str | None) -> ValueError:
    """``error`` said to come from the wrapped optimizer's values (which group, when known)."""
    message = str(error)
    if where is not None and not message.startswith(where):
        message = f"{where}: {message}"
    return ValueError(
        f"{message} — from the wrapped torch.optim.{kind.__name__}'s values, translated into Shampoo "
        "by ShampooCallback; fix them where configure_optimizers builds that optimizer"
    )


def _failing_group(groups: list[dict[str, Any]]) -> int | None:
    """Index of the first translated group that Shampoo's checks refuse on its own."""
    for g, group in enumerate(groups):
        try:
            Shampoo([group])
        except ValueError:
            return g
    return None


def _track_step_called(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` the way an LR scheduler does at construction, so the scheduler's
    "``lr_scheduler.step()`` before ``optimizer.step()``" check sees the new optimizer's steps."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__  # type: ignore[attr-defined]
    ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def rebind_scheduler(scheduler: Any, replaced: Mapping[int, torch.optim.Optimizer]) -> None:
    """Point ``scheduler`` (and the schedulers it chains) at the replacement of its optimizer.

    Its state (``last_epoch``, ``base_lrs``, ``_last_lr``, lambdas, …) is untouched and the new
    param groups carry the old ones' ``lr`` and ``initial_lr``, so it continues exactly as it would
    have on the original optimizer.
    """
    old = getattr(scheduler, "optimizer", None)
    if old is not None and id(old) in replaced:
        new = replaced[id(old)]
        scheduler.optimizer = new
        if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            _track_step_called(new)
    for inner in getattr(scheduler, "_schedulers", ()):
        rebind_scheduler(inner, replaced)


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler) or (
        hasattr(obj, "optimizer") and callable(getattr(obj, "step", None))
    )


def _walk(obj: Any, visit: Callable[[Any], Any]) -> Any:
    """Rebuild the nested lists / tuples / dicts of a ``configure_optimizers`` result."""
    if isinstance(obj, torch.optim.Optimizer) or _is_scheduler(obj):
        return visit(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: _walk(v, visit) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, list):
        return [_walk(v, visit) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_walk(v, visit) for v in obj)
    return obj


def translate_output(output: Any, translate: Callable[[torch.optim.Optimizer], Shampoo]) -> Any:
    """Apply ``translate`` to every torch optimizer in a ``configure_optimizers`` result (every
    form Lightning accepts) and re-point the returned LR schedulers at the new optimizers.
    ``Shampoo`` instances are kept; each optimizer is translated once however often it appears."""
    replaced: dict[int, torch.optim.Optimizer] = {}

    def collect(obj: Any) -> Any:
        if (
            isinstance(obj, torch.optim.Optimizer)
            and not isinstance(obj, Shampoo)
            and id(obj) not in replaced
        ):
            replaced[id(obj)] = translate(obj)
        return obj

    _walk(output, collect)

    def substitute(obj: Any) -> Any:
        if isinstance(obj, torch.optim.Optimizer):
            return replaced.get(id(obj), obj)
        rebind_scheduler(obj, replaced)
        return obj

    return _walk(output, substitute)
