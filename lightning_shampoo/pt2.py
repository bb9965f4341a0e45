"""``ShampooPT2CompileConfig``: opt-in ``torch.compile`` of the plain (non-refresh) step.

Distributed Shampoo's argument name (``Shampoo(shampoo_pt2_compile_config=...)``); its own config
class (fields ``pytorch_compile_backend``, ``enable_shampoo_pt2_dynamic_shape``) is translated by
``as_compile_config``. What is compiled, and what stays eager, is ``_lane_step``'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._checks import describe, require_bool, require_choice

__all__ = ["COMPILE_MODES", "ShampooPT2CompileConfig", "as_compile_config"]

#: ``torch.compile`` modes (``None``: its default).
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True)
class ShampooPT2CompileConfig:
    """How the plain step is compiled: ``torch.compile(fn, backend=, mode=, fullgraph=, dynamic=)``.

    ``backend``: a registered backend name (``"inductor"``: generated kernels; ``"aot_eager"``:
    traced but run with eager kernels, for checking) or a backend callable. ``fullgraph=True``
    (the default) makes a graph break an error instead of a silent slow path. ``dynamic=False``:
    the step's shapes never change, so nothing is traced symbolically. Refreshes run eagerly
    between two graphs (the stages before and after them); steps with a missing gradient,
    sharded optimizers (``shard()``, the Shampoo strategies), iterate averaging and PSGD-Kron's
    buckets (their fit is decided on the host each step) run eagerly; see ``docs/architecture.md``.
    """

    backend: str | Callable[..., Any] = "inductor"
    mode: str | None = None
    fullgraph: bool = True
    dynamic: bool = False

    def __post_init__(self) -> None:
        name = "shampoo_pt2_compile_config"
        if not (isinstance(self.backend, str) and self.backend) and not callable(self.backend):
            raise ValueError(
                f"{name}.backend must be a backend name (e.g. 'inductor') or a callable, "
                f"got {describe(self.backend)}"
            )
        if self.mode is not None:
            require_choice(f"{name}.mode", self.mode, COMPILE_MODES)
        require_bool(f"{name}.fullgraph", self.fullgraph)
        require_bool(f"{name}.dynamic", self.dynamic)


def as_compile_config(value: Any) -> ShampooPT2CompileConfig | None:
    """``value`` as our config: ``None`` (eager), ours, or Distributed Shampoo's
    ``ShampooPT2CompileConfig`` (read by its field names); anything else is refused."""
    if value is None or isinstance(value, ShampooPT2CompileConfig):
        return value
    if hasattr(value, "pytorch_compile_backend"):
        dynamic = getattr(value, "enable_shampoo_pt2_dynamic_shape", False)
        return ShampooPT2CompileConfig(
            backend=value.pytorch_compile_backend, dynamic=bool(dynamic) if dynamic is not None else False
        )
    raise ValueError(
        "shampoo_pt2_compile_config must be None or a lightning_shampoo.ShampooPT2CompileConfig "
        f"(or Distributed Shampoo's), got {describe(value)}"
    )
