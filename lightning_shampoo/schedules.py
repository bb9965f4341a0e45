"""Schedules as small pure objects: precondition frequency per optimizer step, and LR multipliers.

A *frequency schedule* maps the optimizer step about to run (``group["step"] + 1``) to the
``precondition_frequency`` that step uses, or ``None`` to leave the group's value alone. The
optimizer refreshes a block when ``(step % frequency == 0 and step > start) or step == start``,
so a schedule should change its value only at steps where refreshes stay evenly spaced; the
built-in ones do (a frequency ``f(s)`` re-evaluated at every step would refresh at every multiple
of the step where ``s % f(s) == 0``, which is rarely what one means).

All schedules are frozen dataclasses of plain numbers: picklable, comparable, and (for the LR
multipliers, which ``LambdaLR`` saves through ``__dict__``) loadable with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ._checks import require_float, require_int

__all__ = [
    "AdaptiveFrequency",
    "ConstantFrequency",
    "FrequencySchedule",
    "FrequencyScheduleSpec",
    "LogFrequency",
    "MilestoneFrequency",
    "WarmupConstant",
    "WarmupCosine",
    "WarmupLinear",
    "make_frequency_schedule",
]

#: ``step -> precondition_frequency`` (``None``: leave the group's value unchanged).
FrequencySchedule: TypeAlias = Callable[[int], int | None]
#: What :func:`make_frequency_schedule` accepts.
FrequencyScheduleSpec: TypeAlias = int | str | Sequence[tuple[int, int]] | Callable[[int], int | None]


def _check_frequency(name: str, value: Any) -> int:
    return require_int(name, value, low=1)


@dataclass(frozen=True)
class ConstantFrequency:
    """The same frequency at every step."""

    frequency: int

    def __post_init__(self) -> None:
        _check_frequency("frequency", self.frequency)

    def __call__(self, step: int) -> int:
        return self.frequency


@dataclass(frozen=True)
class MilestoneFrequency:
    """``[(step, frequency), ...]``: from each milestone step on, its frequency. Before the first
    milestone the group keeps its own value (``None``)."""

    milestones: tuple[tuple[int, int], ...]

    def __init__(self, milestones: Sequence[tuple[int, int]]) -> None:
        if not isinstance(milestones, Sequence) or isinstance(milestones, str):
            raise ValueError(f"milestones must be a sequence of (step, frequency) pairs, got {milestones!r}")
        points = []
        for i, point in enumerate(milestones):
            if not (isinstance(point, tuple | list) and len(point) == 2):
                raise ValueError(f"milestones[{i}] must be a (step, frequency) pair, got {point!r}")
            step, frequency = point
            require_int(f"milestones[{i}] step", step, low=0)
            points.append((step, _check_frequency(f"milestones[{i}] frequency", frequency)))
        if not points:
            raise ValueError("milestones must not be empty")
        steps = [s for s, _ in points]
        if steps != sorted(set(steps)):
            raise ValueError(f"milestones steps must be strictly increasing, got {steps}")
        object.__setattr__(self, "milestones", tuple(points))

    def __call__(self, step: int) -> int | None:
        current = None
        for at, frequency in self.milestones:
            if step < at:
                break
            current = frequency
        return current


@dataclass(frozen=True)
class LogFrequency:
    """Frequent refreshes early, sparse later: phase ``k`` uses ``min_frequency · 2^k`` (capped at
    ``max_frequency``) and lasts until ``refreshes_per_phase`` refreshes have happened at that
    spacing, so refreshes up to step ``T`` grow like ``refreshes_per_phase · log2(T)`` until the cap.

    Why: factor statistics move fastest at the start (few, large gradients; a bias-corrected EMA
    over few steps), so an early preconditioner goes stale quickly; later they change slowly and
    refreshing them often buys little. Phase boundaries fall on multiples of both spacings, so
    refreshes stay evenly spaced within a phase.
    """

    min_frequency: int = 1
    max_frequency: int = 100
    refreshes_per_phase: int = 8

    def __post_init__(self) -> None:
        _check_frequency("min_frequency", self.min_frequency)
        _check_frequency("max_frequency", self.max_frequency)
        _check_frequency("refreshes_per_phase", self.refreshes_per_phase)
        if self.max_frequency < self.min_frequency:
            raise ValueError(
                f"max_frequency ({self.max_frequency}) must be >= min_frequency ({self.min_frequency})"
            )

    def __call__(self, step: int) -> int:
        first_phase = self.min_frequency * self.refreshes_per_phase
        phase = 0 if step < 2 * first_phase else int(math.log2(step / first_phase))
        return min(self.min_frequency << phase, self.max_frequency)


@dataclass(frozen=True)
class AdaptiveFrequency:
    """Check every ``check_every`` steps and refresh only the blocks whose factors drifted by more
    than ``tolerance`` from the ones their preconditioner was computed from (relative change for
    root-inverse Shampoo, off-diagonal mass in the stored eigenbasis for eigendecomposed Shampoo
    and SOAP; see ``Shampoo(refresh_tolerance=...)``). Never-refreshed blocks always refresh.

    Why: rare refreshes are cheap, frequent ones accurate; a drift test on a check step costs one
    matmul per factor, far less than the eigendecomposition it avoids when nothing moved.
    """

    tolerance: float = 0.05
    check_every: int = 5

    def __post_init__(self) -> None:
        _check_frequency("check_every", self.check_every)
        require_float("tolerance", self.tolerance, low=0.0, allow_inf=True)

    def __call__(self, step: int) -> int:
        return self.check_every


def make_frequency_schedule(spec: FrequencyScheduleSpec) -> FrequencySchedule:
    """``int`` → constant; ``[(step, freq), ...]`` → milestones; ``"log"`` / ``"adaptive"`` → their
    defaults; a callable ``step -> int | None`` as is."""
    if isinstance(spec, ConstantFrequency | MilestoneFrequency | LogFrequency | AdaptiveFrequency):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return ConstantFrequency(spec)
    if isinstance(spec, str):
        if spec == "log":
            return LogFrequency()
        if spec == "adaptive":
            return AdaptiveFrequency()
        raise ValueError(
            f"schedule must be 'log', 'adaptive', an int, milestones or a callable, got {spec!r}"
        )
    if callable(spec):
        return spec
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return MilestoneFrequency(spec)
    raise ValueError(f"schedule must be 'log', 'adaptive', an int, milestones or a callable, got {spec!r}")


# --------------------------------------------------------------------------- LR multipliers


@dataclass(frozen=True)
class _Warmup:
    """Linear warmup over ``warmup_steps`` (the first step already gets ``1/warmup_steps``, so no
    step is wasted at lr 0), then a decay from 1 to ``min_ratio`` at ``total_steps``."""

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        require_int("total_steps", self.total_steps, low=1)
        require_int("warmup_steps", self.warmup_steps, low=0, high=self.total_steps)
        require_float("min_ratio", self.min_ratio, low=0.0, high=1.0)

    def __call__(self, step: int) -> float:
        """Multiplier of the base LR for scheduler step ``step`` (0 for the first optimizer step)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * self._decay(progress)

    def _decay(self, progress: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class WarmupCosine(_Warmup):
    """Warmup, then half a cosine from 1 to ``min_ratio``."""

    def _decay(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupLinear(_Warmup):
    """Warmup, then a straight line from 1 to ``min_ratio``."""

    def _decay(self, progress: float) -> float:
        return 1.0 - progress


@dataclass(frozen=True)
class WarmupConstant(_Warmup):
    """Warmup, then the base LR (``min_ratio`` unused)."""

    def _decay(self, progress: float) -> float:
        return 1.0
