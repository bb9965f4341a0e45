"""Optimizer state memory against AdamW: the default recipes, with and without the lean rules.

For each model, every optimizer steps the same parameters ``STEPS`` times on random gradients
(the state's size depends on the shapes alone; 12 steps cover the presets' first refresh), then
its state is counted: ``Shampoo.state_bytes()`` (every declared state tensor once; the step's
reusable buffers are not state), else the bytes of the distinct tensor storages reachable from
``optimizer.state`` (AdamW: ``exp_avg``, ``exp_avg_sq`` and a step count per parameter).

Models: ``lm4096`` — issue 12's 2-layer pre-norm transformer LM, vocabulary 4096, d_model 128
(1.45M parameters, as ``step_ops.py``'s ``transformer``); and the convergence suite's models
(``_tasks.py``: ``mlp``, ``cnn``, ``autoencoder``, ``transformer``, ``word_lm``).

Optimizers: ``adamw`` (``torch.optim.AdamW``), ``callback`` (``ShampooCallback().translate`` of an
AdamW with decay and no-decay groups: the drop-in), and ``configure_shampoo(module, preset)`` for
``shampoo``, ``eigen``, ``soap``, ``kl_shampoo``, ``psgd_kron``. ``--before`` adds each Shampoo-family
recipe as it was before the lean rules (``target_parameter_dimensionality=1``, every dim factored:
``max_factor_ratio=inf``), marked ``(before)``.

    OMP_NUM_THREADS=1 python benchmarks/state_memory.py
    OMP_NUM_THREADS=1 python benchmarks/state_memory.py --models lm4096 --before --sections
    OMP_NUM_THREADS=1 python benchmarks/state_memory.py --models word_lm --before --time

``--time`` also times each optimizer's step (fixed random gradients; refreshes at their own
frequency, every 10 steps for the presets): 3 rounds, each running ``TIME_STEPS`` steps of every
optimizer in turn; the median round.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import TinyTransformerLM
from _optimizers import state_bytes as storage_bytes
from _tasks import _LM, _autoencoder, _cnn, _mlp, _WordLM

from lightning_shampoo import ShampooCallback, configure_shampoo

STEPS = 12
TIME_STEPS = 20
PRESETS = ("shampoo", "eigen", "soap", "kl_shampoo", "psgd_kron")
OPTIMIZERS = ("adamw", "callback", *PRESETS)
#: The Shampoo-family recipes' layout before the lean rules (issue 12).
BEFORE = {"target_parameter_dimensionality": 1, "max_factor_ratio": math.inf}
TARGETS = ("callback", "shampoo", "soap")  # issue 12: <= 3.5x AdamW

MODELS: dict[str, Callable[[], nn.Module]] = {
    "lm4096": lambda: TinyTransformerLM(vocab=4096, d_model=128, layers=2, heads=4, seq=64),
    "mlp": _mlp,
    "cnn": _cnn,
    "autoencoder": _autoencoder,
    "transformer": lambda: _LM(128, 64),
    "word_lm": lambda: _WordLM(32, 64, 4096),
}


def _adamw_groups(module: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01)


def make(name: str, module: nn.Module, before: bool = False) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``module``; ``before``: the recipe without the lean rules."""
    extra: dict[str, Any] = dict(BEFORE) if before else {}
    if name == "adamw":
        return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
    if name == "callback":
        return ShampooCallback(**extra).translate(_adamw_groups(module), module)
    result = configure_shampoo(module, name, weight_decay=0.01, **extra)
    assert isinstance(result, torch.optim.Optimizer)
    return result


def measure(optimizer: torch.optim.Optimizer, module: nn.Module) -> tuple[int, dict[str, int]]:
    for step in range(STEPS):
        torch.manual_seed(step)
        for p in module.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
    sections = getattr(optimizer, "state_bytes_by_section", None)
    if callable(sections):
        by_section = sections()
        return sum(by_section.values()), by_section
    return storage_bytes(optimizer), {}


def _times(optimizers: list[torch.optim.Optimizer]) -> list[float]:
    """Median (over 3 rounds) seconds per step of each optimizer, interleaved round by round."""
    rounds: list[list[float]] = [[] for _ in optimizers]
    for _ in range(3):
        for spent, optimizer in zip(rounds, optimizers):
            began = time.perf_counter()
            for _ in range(TIME_STEPS):
                optimizer.step()
            spent.append((time.perf_counter() - began) / TIME_STEPS)
    return [statistics.median(r) for r in rounds]


def rows_for(model_name: str, names: list[str], before: bool, timed: bool = False) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    module = MODELS[model_name]()
    rows = []
    variants = [(n, False) for n in names]
    if before:
        variants += [(n, True) for n in names if n not in ("adamw", "psgd_kron")]
    optimizers = []
    for name, old in variants:
        optimizers.append(make(name, module, old))
        total, sections = measure(optimizers[-1], module)
        rows.append({"optimizer": name + (" (before)" if old else ""), "bytes": total, "sections": sections})
    if timed:
        for row, seconds in zip(rows, _times(optimizers)):
            row["ms"] = 1e3 * seconds
    base = next(r["bytes"] for r in rows if r["optimizer"] == "adamw")
    params = sum(p.numel() for p in module.parameters())
    for row in rows:
        row.update(ratio=row["bytes"] / base, model=model_name, params=params)
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(rows: list[dict[str, Any]], sections: bool) -> str:
    timed = "ms" in rows[0]
    head = "| optimizer | state | ×AdamW |" + (" ms/step |" if timed else "")
    rule = "|---|---:|---:|" + ("---:|" if timed else "")
    if sections:
        head += " precond | graft | moments | status |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        mark = " ✓" if r["optimizer"] in TARGETS and r["ratio"] <= 3.5 else ""
        line = f"| {r['optimizer']} | {_mib(r['bytes'])} | {r['ratio']:.2f}×{mark} |"
        if timed:
            line += f" {r['ms']:.1f} |"
        if sections:
            parts = r["sections"]
            line += "".join(
                f" {_mib(parts[s]) if s in parts else '–'} |"
                for s in ("precond", "graft", "moments", "status")
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated (adamw always)")
    parser.add_argument("--before", action="store_true", help="also the recipes without the lean rules")
    parser.add_argument("--sections", action="store_true", help="bytes per state section")
    parser.add_argument("--time", action="store_true", help="also ms per step (module docstring)")
    args = parser.parse_args()
    names = ["adamw", *(n for n in args.optimizers.split(",") if n and n != "adamw")]
    for n in names:
        if n not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {n!r}; choose from {list(OPTIMIZERS)}")
    print(f"Optimizer state after {STEPS} steps, torch {torch.__version__} (✓: a target recipe ≤ 3.5× AdamW)")
    for model_name in (m for m in args.models.split(",") if m):
        if model_name not in MODELS:
            raise SystemExit(f"unknown model {model_name!r}; choose from {list(MODELS)}")
        rows = rows_for(model_name, names, args.before, args.time)
        print(f"\n### {model_name} ({rows[0]['params'] / 1e6:.3g}M parameters)\n")
        print(table(rows, args.sections))


if __name__ == "__main__":
    main()
