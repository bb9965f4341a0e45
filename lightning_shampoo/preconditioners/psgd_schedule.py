"""PSGD-Kron's update-probability schedule and its update credit in closed form.

PSGD-Kron fits ``Q`` at step ``t`` when a credit counter ``C(t) = C(0) + Σ_{s≤t} round(p(s)·U)``
crosses a whole unit ``U`` (see ``PSGDKronPreconditioner.update_due``). A resumed run needs
``C(t)`` at its resume step; summing ``p(s)`` step by step costs seconds at millions of steps.
:meth:`PSGDUpdateProbabilitySchedule.credit` gives the same integer in closed form: ``p`` is
constant (``max_probability``) for ``flat_steps``, decays for a bounded number of steps, then is
constant again (``min_probability``), so only the decaying stretch needs its terms summed — once,
vectorised, and memoised.

Exactness. The per-step counter rounds ``p(s)·U`` with ``math.exp``; the vectorised sum uses
``torch.exp``, which may differ by an ulp or two. That changes a rounded term only when ``p(s)·U``
lies within a few ulps of a half-integer, so every term within ``_NEAR_HALF`` of one (about 2 in
10⁴) is recomputed with ``math.exp`` exactly as the counter does: the sum is bit-identical.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .._checks import require_float, require_int

__all__ = ["PSGDUpdateProbabilitySchedule"]

_CHUNK = 1 << 20  # terms per vectorised chunk (8 MiB of float64)
# |p·U - (n + ½)| below which a term is recomputed in Python: ~100 ulps of p·U at U = 2³², far
# above the error of torch.exp (≤ 1 ulp, so ≤ 2 ulps of p·U with the product's rounding).
_NEAR_HALF = 1e-4


@dataclass(frozen=True, kw_only=True)
class PSGDUpdateProbabilitySchedule:
    """``max_probability`` for ``flat_steps`` steps, then ``exp(-decay·(t - flat_steps))`` clamped
    to ``[min_probability, max_probability]``: fit often while ``P`` is far off, rarely later."""

    max_probability: float = 1.0
    min_probability: float = 0.03
    decay: float = 0.001
    flat_steps: int = 200

    def __post_init__(self) -> None:
        require_float("max_probability", self.max_probability, low=0.0, high=1.0)
        require_float("min_probability", self.min_probability, low=0.0, high=1.0)
        if self.min_probability > self.max_probability:
            raise ValueError(
                f"min_probability ({self.min_probability}) must be <= "
                f"max_probability ({self.max_probability})"
            )
        require_float("decay", self.decay, low=0.0)
        require_int("flat_steps", self.flat_steps, low=0)

    def __call__(self, step: int) -> float:
        p = self.max_probability * math.exp(-self.decay * max(0, step - self.flat_steps))
        return min(self.max_probability, max(self.min_probability, p))

    def credit(self, step: int, unit: int) -> int:
        """``Σ_{s=1..step} round(self(s)·unit)``, bit-identical to summing step by step, in time
        independent of ``step`` once the decay is over (module docstring)."""
        if step <= 0:
            return 0
        flat = round(self.max_probability * unit)
        if self.decay == 0.0:  # exp(-0.0 · k) == 1: p is max_probability at every step
            return step * flat
        total = min(step, self.flat_steps) * flat
        decayed = step - self.flat_steps  # steps k = 1, 2, … after the flat stretch
        if decayed <= 0:
            return total
        end = _decay_end(self.max_probability, self.min_probability, self.decay)
        args = (self.max_probability, self.min_probability, self.decay, unit)
        if end is None or decayed < end:
            return total + _decay_sum(*args, decayed)
        floor = round(self.min_probability * unit)
        return total + _decay_sum(*args, end - 1) + (decayed - end + 1) * floor


def _decay_end(max_p: float, min_p: float, decay: float) -> int | None:
    """A ``k`` with ``max_p·exp(-decay·k) <= min_p`` (so ``p = min_p`` from there on, the decay
    being monotone); ``None`` if none is within reach of a step count."""

    def below(k: int) -> bool:
        return max_p * math.exp(-decay * k) <= min_p

    if below(1):
        return 1
    guess = math.log(max_p / min_p) / decay if min_p > 0.0 else 800.0 / decay  # exp(-800) == 0.0
    if not guess < 2.0**53:
        return None
    k = math.ceil(guess) + 1
    while not below(k):  # at most a few steps: the estimate is off by rounding only
        k += 1
    return k


@functools.lru_cache(maxsize=256)
def _decay_sum(max_p: float, min_p: float, decay: float, unit: int, count: int) -> int:
    """``Σ_{k=1..count} round(clamp(max_p·exp(-decay·k), min_p, max_p)·unit)``, exactly as the
    per-step Python expression rounds each term (module docstring)."""
    total = 0
    for start in range(1, count + 1, _CHUNK):
        k = torch.arange(start, min(start + _CHUNK, count + 1), dtype=torch.float64)
        scaled = (max_p * torch.exp(-decay * k)).clamp(min_p, max_p) * unit
        rounded = torch.round(scaled)  # half to even, as Python's round
        total += int(rounded.to(torch.int64).sum())
        near_half = ((scaled - scaled.floor()) - 0.5).abs() < _NEAR_HALF
        for index in near_half.nonzero().flatten().tolist():
            step = start + index
            exact = round(min(max_p, max(min_p, max_p * math.exp(-decay * step))) * unit)
            total += exact - int(rounded[index])
    return total
