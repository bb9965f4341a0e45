"""Perturbation sensitivity: how far a tiny change of the inputs moves the trained parameters.

Each optimizer (the convergence suite's names and ``name:overrides``, ``_optimizers.py``) trains a
task's model (``_tasks.py``) for ``--steps`` steps through Lightning, twice from the same initial
weights and batch order: on the task's inputs ``x``, and on ``x · (1 + δ·z)`` with ``δ = 1e-7``
and a fixed ``z ~ N(0, 1)`` — a change at the level of float32 rounding. The table gives
``‖θ' − θ‖ / ‖θ‖`` over all parameters at the end. A well-conditioned optimizer moves them by
about ``δ`` or less (AdamW); a preconditioner whose damping sits below its factors' rounding
error turns the rounding in their null space into O(1) changes of its inverse root.

    OMP_NUM_THREADS=1 python benchmarks/sensitivity.py
    python benchmarks/sensitivity.py --tasks mlp \
        --optimizers adamw,shampoo,shampoo:config.amortized.epsilon_rtol=0

Constant learning rate (no warm-up): the task's AdamW-best rate from the convergence suite.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _optimizers import make_spec
from _tasks import TASKS, Task
from convergence import BenchModule, bench_trainer

#: AdamW's best learning rate of each digits task on the convergence suite (docs/convergence.md).
LEARNING_RATES = {"mlp": 3.16e-3, "cnn": 3.16e-3, "autoencoder": 1e-3}
DEFAULT_OPTIMIZERS = ("adamw", "shampoo_callback", "shampoo", "eigen", "kl_shampoo", "soap")


def perturbed(task: Task, delta: float, seed: int = 1234) -> Task:
    """``task`` with its training inputs multiplied by ``1 + delta·z`` (labels unchanged)."""
    x, *rest = task.train.tensors
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return replace(task, train=TensorDataset(x * (1.0 + delta * z), *rest))


def train(task: Task, optimizer: str, lr: float) -> torch.Tensor:
    """All parameters (flattened, float64) after ``task.steps`` steps."""
    spec = make_spec(optimizer)
    module = BenchModule(task, spec, lr)
    trainer = bench_trainer(task, spec.callbacks())
    trainer.fit(module)
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def sensitivity(task: Task, optimizer: str, lr: float, delta: float) -> float:
    """``‖θ' − θ‖ / ‖θ‖`` between the runs on the original and the perturbed inputs."""
    base = train(task, optimizer, lr)
    moved = train(perturbed(task, delta), optimizer, lr)
    return float(torch.linalg.vector_norm(moved - base) / torch.linalg.vector_norm(base))


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tasks", default="mlp,cnn,autoencoder", help="comma-separated digits tasks")
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help="',' or ';'-separated")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--delta", type=float, default=1e-7, help="relative size of the input change")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_shampoo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in LEARNING_RATES]
    if unknown:
        parser.error(f"--tasks: {unknown} are not digits tasks ({list(LEARNING_RATES)})")
    separator = ";" if ";" in args.optimizers else ","
    optimizers = [o for o in args.optimizers.split(separator) if o]
    print(f"‖θ' − θ‖ / ‖θ‖ after {args.steps} steps, inputs × (1 + {args.delta:g}·z)\n")
    print("| optimizer | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for optimizer in optimizers:
        cells = []
        for name in tasks:
            task = replace(TASKS[name](), steps=args.steps, warmup=0)
            value = sensitivity(task, optimizer, LEARNING_RATES[name], args.delta)
            cells.append("nan" if math.isnan(value) else f"{value:.2g}")
        print(f"| {optimizer} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
