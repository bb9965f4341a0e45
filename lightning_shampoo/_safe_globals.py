"""The package's config classes, allowed in ``torch.load(..., weights_only=True)``.

Shampoo's own ``state_dict`` holds only tensors and plain values, but Lightning callbacks may save
param groups whole: ``BaseFinetuning`` (``BackboneFinetuning``) keeps the groups it added,
``preconditioner_config`` and ``grafting_config`` included, to put them back on resume. The configs
are frozen dataclasses (and one enum) of plain values, so allowing them to be unpickled is as safe
as the plain values themselves; registering them at import keeps such checkpoints loadable with
torch's default ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pkgutil
from types import ModuleType
from typing import Any

import torch

from . import averaging, compat, preconditioners

__all__ = ["config_classes", "register_safe_globals"]

_CONFIG_SUFFIXES = ("Config", "Options", "Schedule")  # not the kernels' state declarations


def _modules() -> list[ModuleType]:
    found = [averaging, compat, preconditioners]
    for info in pkgutil.iter_modules(preconditioners.__path__, f"{preconditioners.__name__}."):
        found.append(importlib.import_module(info.name))
    return found


def config_classes() -> list[type]:
    """Frozen config dataclasses and enums defined in the config modules (sorted by name)."""
    out: dict[str, type] = {}
    for module in _modules():
        for value in vars(module).values():
            if not isinstance(value, type) or value.__module__ != module.__name__:
                continue
            frozen = dataclasses.is_dataclass(value) and value.__dataclass_params__.frozen  # type: ignore[attr-defined]
            if (frozen and value.__name__.endswith(_CONFIG_SUFFIXES)) or issubclass(value, enum.Enum):
                out[f"{value.__module__}.{value.__qualname__}"] = value
    return [out[k] for k in sorted(out)]


def register_safe_globals() -> None:
    torch.serialization.add_safe_globals(list[Any](config_classes()))
