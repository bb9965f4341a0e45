"""``benchmarks/step_ops.py``'s op counter: what counts as a top-level aten op."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_ops import count_aten_ops


def _count(fn: Callable[[], object], steps: int = 2) -> tuple[float, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return count_aten_ops(prof.events(), steps)


def test_a_foreach_call_is_one_top_level_op_and_a_loop_one_per_tensor() -> None:
    tensors = [torch.ones(4) for _ in range(10)]
    assert _count(lambda: torch._foreach_mul_(tensors, 2.0))[0] == 1
    assert _count(lambda: [t.mul_(2.0) for t in tensors])[0] == 10


def test_nested_ops_count_in_all_only() -> None:
    x = torch.ones(8)
    top, total = _count(lambda: x.to(torch.float64))  # aten::to → _to_copy → empty, copy_
    assert top == 1
    assert total >= 3


def test_adamw_foreach_step_is_fewer_top_level_ops_than_its_per_parameter_loop() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(6)]
    for p in params:
        p.grad = torch.randn_like(p)
    counts = {}
    for foreach in (True, False):
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=foreach)
        optimizer.step()  # state
        counts[foreach] = _count(optimizer.step)[0]
    assert counts[True] < counts[False] / 2
