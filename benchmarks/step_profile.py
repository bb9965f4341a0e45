"""Where an optimizer step's time goes: ``torch.profiler`` over plain (non-refresh) steps.

The step-time benchmark's transformer (``step_time.py``), one backward for gradients, then
``--steps`` calls of ``optimizer.step()`` alone for AdamW and the Shampoo candidates. Prints, per
optimizer, host time and device time per step and kernel launches per step (on a GPU a plain step
that launches thousands of small kernels is bound by launch latency, not by arithmetic), then the
operators with the most host time.

    python benchmarks/step_profile.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import TinyTransformerLM, lm_loss
from step_time import candidates

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def _profile(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> profile:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def plain_steps_only(optimizer: torch.optim.Optimizer) -> None:
    """No more refreshes: every later step is a plain step."""
    for group in optimizer.param_groups:
        group["precondition_frequency"] = 10**9


def step_stats(events: EventList, steps: int) -> tuple[float, float, float]:
    """Host ms, device ms and kernel launches per step from a ``_profile`` run's ``key_averages()``
    (host: the ``Optimizer.step`` annotation; device: the kernels' own time)."""
    host = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")) / steps / 1e3
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    device = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    return host, device, launches / steps


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TinyTransformerLM().to(device)
    lm_loss(model, torch.randint(0, 4096, (16, 257), device=device)).backward()
    params = list(model.parameters())
    makers = {"AdamW": lambda p, f: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True)}
    makers.update(candidates(variants=False))
    rows, tables = [], {}
    for name, make in makers.items():
        optimizer = make(params, 1)
        optimizer.step()  # state, first refresh
        plain_steps_only(optimizer)
        optimizer.step()
        prof = _profile(optimizer, args.steps, device)
        events = prof.key_averages()
        rows.append((name, *step_stats(events, args.steps)))
        tables[name] = events.table(sort_by="self_cpu_time_total", row_limit=args.top)
        del optimizer
    print(f"\n## Plain optimizer step on {device}: {sum(p.numel() for p in params) / 1e6:.1f}M params\n")
    print("| optimizer | host ms/step | device ms/step | kernel launches/step |")
    print("|---|---|---|---|")
    for name, host, gpu, launches in rows:
        print(f"| {name} | {host:.2f} | {gpu:.2f} | {launches:.0f} |")
    for name, table in tables.items():
        print(f"\n### {name}\n\n{table}")


if __name__ == "__main__":
    main()
