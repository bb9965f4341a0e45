"""The optimizers of the convergence suite, each built the way a user builds it.

* ``adamw`` — ``torch.optim.AdamW`` returned by the module's ``configure_optimizers`` (the baseline).
* ``shampoo_callback`` — the same module, ``Trainer(callbacks=[ShampooCallback()])`` (the drop-in).
* every ``configure_shampoo`` preset (``shampoo``, ``eigen``, ``kl_shampoo``, ``soap``,
  ``psgd_kron``, ``adam``, ``muon``) returned from ``configure_optimizers``.
* peers, when installed: heavyball ``SOAP`` and ``PSGDKron``, kron-torch ``Kron``,
  pytorch-optimizer ``SOAP`` and ``Shampoo``. Their defaults, except the learning rate (swept),
  weight decay (0, as for every optimizer here) and pytorch-optimizer ``Shampoo``'s inverse-root
  interval (every 10 steps like ours, instead of every step, which would make it 5-10× slower).
  heavyball and kron-torch ``torch.compile`` their kernels; on a CPU the compilation alone takes
  longer than a run, so it is switched off and they run eagerly, as ours does.

A name may carry overrides, ``shampoo:epsilon=1e-8,precondition_frequency=20``, passed to
``configure_shampoo`` (presets) or ``ShampooCallback`` (``shampoo_callback``): the recipe search
runs such variants through exactly the code path users run.

Every optimizer uses the same schedule: linear warmup over the task's ``warmup`` steps, then a
constant learning rate (``LambdaLR``; ``configure_shampoo(schedule="constant")`` for presets).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_shampoo import (
    GeneralizedPrimalAveragingConfig,
    PreconditionerHealthMonitor,
    ScheduleFreeConfig,
    ShampooCallback,
    configure_shampoo,
)
from lightning_shampoo.configure import PRESET_NAMES, resolve_preset
from lightning_shampoo.preconditioners import PreconditionerConfig
from lightning_shampoo.preconditioners.amortized import QREigendecompositionConfig
from lightning_shampoo.schedules import WarmupConstant

PEERS = ("hb_soap", "hb_psgd_kron", "kron_torch", "po_soap", "po_shampoo")
OURS = ("shampoo_callback", *PRESET_NAMES)
DEFAULT_OPTIMIZERS = ("adamw", *OURS, *PEERS)


@dataclass
class Spec:
    """How to build one optimizer for a module: ``configure(module, lr, total, warmup)`` is what
    ``configure_optimizers`` returns; ``callbacks()`` go into the Trainer."""

    name: str
    configure: Callable[[nn.Module, float, int, int], Any]
    callbacks: Callable[[], list[pl.Callback]] = field(default=lambda: [])


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> dict[str, Any]:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupConstant(total, warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _adamw(module: nn.Module, lr: float, total: int, warmup: int) -> dict[str, Any]:
    return _schedule(torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0), total, warmup)


def parse_overrides(text: str) -> dict[str, Any]:
    """``"a=1e-8,b=(0.9,0.95),c=inf"`` → ``{"a": 1e-8, "b": (0.9, 0.95), "c": inf}``."""
    out: dict[str, Any] = {}
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in filter(None, (p.strip() for p in parts)):
        key, _, value = part.partition("=")
        value = value.strip()
        if value in ("inf", "math.inf"):
            out[key.strip()] = float(value)
        elif value.isidentifier() and value not in ("True", "False", "None"):
            out[key.strip()] = value  # a bare name: a string (averaging=schedule_free)
        else:
            out[key.strip()] = ast.literal_eval(value)
    return out


def _preset_config(name: str, overrides: dict[str, Any]) -> str | PreconditionerConfig:
    """``name``, or its preset config with the ``config.<field>`` overrides applied (``config.qr``:
    warm-started QR eigendecompositions, the reference SOAP's refresh as documented runs used;
    ``config.amortized.<field>``: a field of its ``amortized_computation_config``, e.g.
    ``config.amortized.epsilon_rtol=0``)."""
    fields = {k.removeprefix("config."): overrides.pop(k) for k in list(overrides) if k.startswith("config.")}
    if not fields:
        return name
    prefix = "amortized."
    amortized = {k.removeprefix(prefix): fields.pop(k) for k in list(fields) if k.startswith(prefix)}
    config = resolve_preset(name).config
    if fields.pop("qr", False):
        fields["amortized_computation_config"] = QREigendecompositionConfig(reference_soap=True)
    if amortized:
        base = fields.get("amortized_computation_config", config.amortized_computation_config)
        fields["amortized_computation_config"] = replace(base, **amortized)
    return replace(config, **fields)


#: ``averaging=<name>`` overrides: iterate averaging with Distributed Shampoo's default settings.
AVERAGING = {"schedule_free": ScheduleFreeConfig(), "gpa": GeneralizedPrimalAveragingConfig()}


def _averaging(overrides: dict[str, Any]) -> None:
    """``averaging=schedule_free`` / ``gpa`` → ``iterate_averaging_config`` (evaluated at the
    averaged weights: ``convergence.Recorder``)."""
    name = overrides.pop("averaging", None)
    if name is not None:
        if name not in AVERAGING:
            raise ValueError(f"averaging={name!r}: choose from {list(AVERAGING)}")
        overrides["iterate_averaging_config"] = AVERAGING[name]


def _preset(name: str, overrides: dict[str, Any]) -> Callable[[nn.Module, float, int, int], Any]:
    _averaging(overrides)
    preconditioner = _preset_config(name, overrides)

    def configure(module: nn.Module, lr: float, total: int, warmup: int) -> Any:
        return configure_shampoo(
            module,
            preconditioner,
            lr=lr,
            weight_decay=0.0,
            schedule="constant",
            warmup_steps=warmup,
            total_steps=total,
            **overrides,
        )

    return configure


def _callback(overrides: dict[str, Any]) -> Callable[[], list[pl.Callback]]:
    _averaging(overrides)
    if any(k.startswith("config.") for k in overrides):
        overrides["preconditioner"] = _preset_config(overrides.pop("preconditioner", "shampoo"), overrides)

    def callbacks() -> list[pl.Callback]:
        # The defaults, except that the health table is not printed after each of the many runs.
        options = {"health_monitor": PreconditionerHealthMonitor(print_table=False), **overrides}
        return [ShampooCallback(**options)]

    return callbacks


def _peer(name: str) -> Callable[[nn.Module, float, int, int], Any]:
    def configure(module: nn.Module, lr: float, total: int, warmup: int) -> Any:
        params = list(module.parameters())
        if name == "hb_soap":
            heavyball = importlib.import_module("heavyball")
            optimizer = heavyball.SOAP(params, lr=lr, weight_decay=0.0)
        elif name == "hb_psgd_kron":
            heavyball = importlib.import_module("heavyball")
            optimizer = heavyball.PSGDKron(params, lr=lr, weight_decay=0.0)
        elif name == "kron_torch":
            optimizer = importlib.import_module("kron_torch").Kron(params, lr=lr, weight_decay=0.0)
        elif name == "po_soap":
            optimizer = importlib.import_module("pytorch_optimizer").SOAP(params, lr=lr, weight_decay=0.0)
        elif name == "po_shampoo":
            optimizer = importlib.import_module("pytorch_optimizer").Shampoo(
                params, lr=lr, weight_decay=0.0, preconditioning_compute_steps=10
            )
        else:
            raise ValueError(f"unknown peer {name!r}")
        return _schedule(optimizer, total, warmup)

    return configure


_PEER_MODULES = {
    "hb_soap": "heavyball",
    "hb_psgd_kron": "heavyball",
    "kron_torch": "kron_torch",
    "po_soap": "pytorch_optimizer",
    "po_shampoo": "pytorch_optimizer",
}


def peer_status() -> dict[str, str]:
    """``{peer: "ok" | why it is skipped}``; imports each package (and turns compilation off)."""
    status = {}
    for name, module in _PEER_MODULES.items():
        try:
            imported = importlib.import_module(module)
        except Exception as error:  # a broken install is a skip, not a crash
            status[name] = f"not available ({type(error).__name__}: {error})"
            continue
        if module == "heavyball":
            imported.utils.compile_mode = None
        status[name] = "ok"
    if any(s == "ok" for n, s in status.items() if _PEER_MODULES[n] == "kron_torch"):
        import torch._dynamo

        torch._dynamo.config.disable = True  # kron-torch decorates its kernels with torch.compile
    return status


def make_spec(name: str) -> Spec:
    """``name`` or ``name:overrides`` → its :class:`Spec`."""
    base, _, text = name.partition(":")
    overrides = parse_overrides(text) if text else {}
    if base == "adamw":
        return Spec(name, _adamw)
    if base == "shampoo_callback":
        return Spec(name, _adamw, _callback(overrides))
    if base in PRESET_NAMES:
        return Spec(name, _preset(base, overrides))
    if base in _PEER_MODULES:
        if overrides:
            raise ValueError(f"{name}: peers run with their defaults")
        return Spec(name, _peer(base))
    raise ValueError(f"unknown optimizer {name!r}; choose from {list(DEFAULT_OPTIMIZERS)}")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages reachable from ``optimizer.state``."""
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    for state in optimizer.state.values():
        visit(state)
    return total
