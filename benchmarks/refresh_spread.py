"""Refresh spread: per-step optimizer time with refreshes all at once vs staggered.

For each model (an MLP and a small transformer LM) and preset, ``configure_shampoo`` is built
twice — ``refresh_stagger=False`` (Distributed Shampoo's schedule: every block refreshes on the
same step every ``precondition_frequency`` steps) and ``True`` (each block on its own phase of
the interval, balanced by refresh cost) — and ``optimizer.step()`` alone is timed on every step
of ``--intervals`` full intervals after the first refresh (forward/backward excluded; on CUDA
with a synchronize around each step). The table gives the median step, the slowest step (the
refresh step without stagger), the mean over the interval (the same work either way, so it
should match) and the slowest step as a multiple of the median.

    python benchmarks/refresh_spread.py                       # CPU, one thread
    python benchmarks/refresh_spread.py --device cuda --frequency 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _models import TinyTransformerLM, lm_loss

from lightning_shampoo import Shampoo, configure_shampoo


def _mlp(width: int) -> tuple[nn.Module, Callable[[nn.Module, torch.Generator, str], torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
        nn.ReLU(), nn.Linear(width, 10),
    )  # fmt: skip

    def loss(m: nn.Module, g: torch.Generator, device: str) -> torch.Tensor:
        x = torch.randn(64, 64, generator=g).to(device)
        y = torch.randint(0, 10, (64,), generator=g).to(device)
        return nn.functional.cross_entropy(m(x), y)

    return model, loss


def _transformer(width: int) -> tuple[nn.Module, Callable[[nn.Module, torch.Generator, str], torch.Tensor]]:
    model = TinyTransformerLM(vocab=512, d_model=width // 2, layers=2, heads=4, seq=64)

    def loss(m: nn.Module, g: torch.Generator, device: str) -> torch.Tensor:
        return lm_loss(m, torch.randint(0, 512, (8, 65), generator=g).to(device))

    return model, loss


MODELS = {"mlp": _mlp, "transformer": _transformer}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, preset: str, stagger: bool, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    model, loss_fn = MODELS[name](args.width)
    model = model.to(args.device)
    optimizer = configure_shampoo(
        model, preset, lr=1e-3, precondition_frequency=args.frequency, refresh_stagger=stagger
    )
    assert isinstance(optimizer, Shampoo)
    g = torch.Generator().manual_seed(1)
    f = args.frequency
    times: list[float] = []
    for step in range(1, f * (args.intervals + 2) + 1):
        optimizer.zero_grad()
        loss_fn(model, g, args.device).backward()
        _sync(args.device)
        began = time.perf_counter()
        optimizer.step()
        _sync(args.device)
        if step > 2 * f:  # past the first refresh (at step f) and one whole interval
            times.append(time.perf_counter() - began)
    refreshes = optimizer.refresh_counts()[0]
    ms = [1e3 * t for t in times]
    median = statistics.median(ms)
    return {
        "median": median,
        "max": max(ms),
        "mean": statistics.fmean(ms),
        "peak": max(ms) / median,
        "refreshes": refreshes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--intervals", type=int, default=3)
    parser.add_argument("--width", type=int, default=256, help="MLP width; the transformer's d_model is half")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--presets", nargs="+", default=["shampoo", "soap"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
        f"precondition_frequency {args.frequency}, {args.intervals} intervals timed"
    )
    print()
    columns = ["model", "preset", "stagger", "median step (ms)", "slowest step (ms)", "mean step (ms)"]
    print("| " + " | ".join([*columns, "slowest/median", "refreshes"]) + " |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        for preset in args.presets:
            for stagger in (False, True):
                r = measure(name, preset, stagger, args)
                print(
                    f"| {name} | {preset} | {'on' if stagger else 'off'} | {r['median']:.2f} "
                    f"| {r['max']:.2f} | {r['mean']:.2f} | {r['peak']:.1f}× | {int(r['refreshes'])} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
