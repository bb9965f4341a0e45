"""First PSGD-Kron step after a resume at a late step, against a plain step (issue 16, item 7).

PSGD-Kron decides which steps fit its preconditioner from a deterministic credit counter over the
update-probability schedule; after a resume at step ``s`` the counter's value at ``s`` has to be
known. Per resume step, this loads a checkpoint whose groups say ``step = s`` into a fresh
optimizer, times its first ``step()`` and the median of the next ``--steps`` plain steps, and
prints the ratio (1 means the resume costs nothing extra)::

    python benchmarks/psgd_resume.py --at 100000 1000000 4000000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_shampoo import PSGDKronPreconditionerConfig, Shampoo


def _optimizer(param: nn.Parameter) -> Shampoo:
    return Shampoo([param], lr=1e-3, betas=(0.9, 1.0), preconditioner_config=PSGDKronPreconditionerConfig())


def _timed_step(optimizer: Shampoo, param: nn.Parameter) -> float:
    param.grad = torch.randn_like(param)
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def measure(at: int, steps: int) -> tuple[float, float]:
    """(first step after a resume at ``at``, median plain step) in seconds."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(32, 16))
    source = _optimizer(param)
    _timed_step(source, param)
    state = source.state_dict()
    for group in state["param_groups"]:
        group["step"] = at
    resumed = _optimizer(param)
    resumed.load_state_dict(state)
    first = _timed_step(resumed, param)
    plain = statistics.median(_timed_step(resumed, param) for _ in range(steps))
    return first, plain


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--at", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| resume at step | first step (ms) | plain step (ms) | ratio |")
    print("|---:|---:|---:|---:|")
    for at in args.at:
        first, plain = measure(at, args.steps)
        print(f"| {at:,} | {first * 1e3:.2f} | {plain * 1e3:.2f} | {first / plain:.1f}× |")


if __name__ == "__main__":
    main()
