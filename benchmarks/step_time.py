"""Step-time benchmark: Shampoo-family optimizers against AdamW, and buckets against a block loop.

Part A — full training step (zero_grad + forward + backward + optimizer.step) on a 4-layer
transformer LM (d_model 512, vocabulary 4096, batch 16 x 256 tokens, blocks of 512), as a ratio
to ``torch.optim.AdamW(foreach=True)`` timed in the same process just before each candidate.
Each candidate is timed on plain steps and on refresh steps separately, each step paired with an
AdamW step just before it; with r_plain and r_refresh the medians of those per-pair time ratios,
the ratio at precondition frequency f is ``((f-1)·r_plain + r_refresh)/f`` — exactly the mix of
steps a run at frequency f makes.
``--direct`` instead runs every frequency for ``--steps`` real steps (use it on a GPU).
PSGD-Kron (each mode) is timed the same way on steps that fit Q and steps that only apply P;
its ratio at update probability p is ``(1-p)·r_apply + p·r_fit`` (its schedule is a
deterministic counter, so a run at p makes exactly that mix).

Part B — optimizer step alone on six 256x256 layers in blocks of 64 (96 same-shape blocks):
bucketed vs ``use_bucketing=False`` (one block at a time), on plain and refresh steps, and the
plain step's achieved GFLOP/s as a fraction of one batched matmul of the same shapes.

    python benchmarks/step_time.py            # both parts, prints markdown tables
    python benchmarks/step_time.py --part b   # the fast part only
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

from _models import TinyTransformerLM, lm_loss

from lightning_shampoo import (
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    PSGDKronPreconditionerConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
)

FREQUENCIES = (1, 10, 100)
PSGD_PROBABILITY = 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _shampoo(params, frequency: int, config, **overrides) -> Shampoo:
    """The benchmark's Shampoo: Adam-grafted, blocks of 512, unless ``overrides`` say otherwise."""
    options = dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        epsilon=1e-10,
        weight_decay=0.01,
        max_preconditioner_dim=512,
        grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
    )
    options.update(overrides)
    return Shampoo(params, precondition_frequency=frequency, preconditioner_config=config, **options)


#: SOAP's settings on top of those: Adam in the eigenbasis, so no grafting.
SOAP_OPTIONS: dict[str, Any] = dict(betas=(0.95, 0.95), epsilon=1e-8, grafting_config=None)
#: The ``soap`` preset's config (its moment rotation), as the documented figures were measured.
SOAP_CONFIG = EigenvalueCorrectedShampooPreconditionerConfig(rotate_corrected_eigenvalues=True)


Factory = Callable[[list[nn.Parameter], int], torch.optim.Optimizer]


def candidates(variants: bool = False) -> dict[str, Factory]:
    """Name → factory(params, precondition_frequency); ``variants`` adds the matmul-only refreshes
    (coupled Newton roots, warm-started QR eigenbases), which matter where ``eigh`` is slow (CUDA)."""
    made: dict[str, Factory] = {
        "Shampoo (root-inverse)": lambda p, f: _shampoo(p, f, RootInvShampooPreconditionerConfig()),
        "SOAP": lambda p, f: _shampoo(p, f, SOAP_CONFIG, **SOAP_OPTIONS),
    }
    if variants:
        newton = RootInvShampooPreconditionerConfig(amortized_computation_config=CoupledNewtonConfig())
        qr = EigenvalueCorrectedShampooPreconditionerConfig(
            amortized_computation_config=QREigendecompositionConfig(reference_soap=True),
            rotate_corrected_eigenvalues=True,
        )
        made["Shampoo (root-inverse, coupled Newton)"] = lambda p, f: _shampoo(p, f, newton)
        made["SOAP (QR power iteration)"] = lambda p, f: _shampoo(p, f, qr, **SOAP_OPTIONS)
    return made


def psgd(params, probability: float, mode: str) -> Shampoo:
    config = PSGDKronPreconditionerConfig(mode=mode, preconditioner_update_probability=probability)
    return Shampoo(
        params,
        lr=3e-4,
        betas=(0.9, 0.999),
        weight_decay=0.01,
        max_preconditioner_dim=512,
        preconditioner_config=config,
    )


class TrainStep:
    """One full training step of the benchmark model under a given optimizer."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor) -> None:
        self.model, self.tokens = model, tokens
        self.device = tokens.device

    def __call__(self, optimizer: torch.optim.Optimizer) -> float:
        _sync(self.device)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        lm_loss(self.model, self.tokens).backward()
        optimizer.step()
        _sync(self.device)
        return time.perf_counter() - began


def part_a(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TinyTransformerLM().to(device)
    tokens = torch.randint(0, 4096, (args.batch, 257), device=device)
    step = TrainStep(model, tokens)
    print(
        f"\n## Part A: full training step vs AdamW(foreach=True) — {args.batch}x256 tokens, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, device {device}, "
        f"{torch.get_num_threads()} threads\n"
    )
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    step(adamw)  # warm-up

    def paired(optimizer: torch.optim.Optimizer, count: int) -> tuple[float, float, float]:
        """Alternate AdamW and candidate steps; median times and the median of per-pair ratios
        (adjacent steps share whatever else the machine is doing)."""
        pairs = [(step(adamw), step(optimizer)) for _ in range(count)]
        base = statistics.median(a for a, _ in pairs)
        return base, statistics.median(c for _, c in pairs), statistics.median(c / a for a, c in pairs)

    rows = []
    for name, make in candidates(args.variants).items():
        if args.direct:
            ratios = []
            for frequency in FREQUENCIES:
                optimizer = make(list(model.parameters()), frequency)
                for _ in range(frequency):  # reach the first refresh (steady state)
                    step(optimizer)
                base, mean, _ = paired(optimizer, args.steps)
                ratios.append(mean / base)
            baseline, plain, refresh = base, math.nan, math.nan
        else:
            optimizer = make(list(model.parameters()), 1)
            step(optimizer)  # first refresh (warm-up)
            _, refresh, refresh_ratio = paired(optimizer, args.refresh_steps)
            for group in optimizer.param_groups:
                group["precondition_frequency"] = 10**9  # no more refreshes: plain steps only
            baseline, plain, plain_ratio = paired(optimizer, args.steps)
            ratios = [((f - 1) * plain_ratio + refresh_ratio) / f for f in FREQUENCIES]
        rows.append((name, baseline, plain, refresh, ratios))
        del optimizer
    psgd_rows = []
    for mode in ("Q0.5EQ1.5", "EQ", "QUAD"):
        # The update schedule is a deterministic counter: probability 1 fits Q on every step,
        # probability 0 only on the first; a run at p mixes the two in proportion p.
        fitting = psgd(list(model.parameters()), 1.0, mode)
        step(fitting)
        _, fit_time, fit_ratio = paired(fitting, args.refresh_steps)
        del fitting
        applying = psgd(list(model.parameters()), 0.0, mode)
        step(applying)
        baseline, apply_time, apply_ratio = paired(applying, args.steps)
        del applying
        mixed = (1 - PSGD_PROBABILITY) * apply_ratio + PSGD_PROBABILITY * fit_ratio
        psgd_rows.append((f"PSGD-Kron {mode}", baseline, apply_time, fit_time, mixed))
    print(
        "| optimizer | AdamW step (s) | plain step (s) | refresh step (s) | "
        + " | ".join(f"ratio @ freq {f}" for f in FREQUENCIES)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(FREQUENCIES))
    for name, baseline, plain, refresh, ratios in rows:
        print(
            f"| {name} | {baseline:.3f} | {plain:.3f} | {refresh:.3f} | "
            + " | ".join(f"{r:.3f}x" for r in ratios)
            + " |"
        )
    print(
        f"\n| optimizer | AdamW step (s) | step without Q fit (s) | step with Q fit (s) | "
        f"ratio @ update probability {PSGD_PROBABILITY} |"
    )
    print("|---|---|---|---|---|")
    for name, baseline, apply_time, fit_time, mixed in psgd_rows:
        print(f"| {name} | {baseline:.3f} | {apply_time:.3f} | {fit_time:.3f} | {mixed:.3f}x |")


def _layers(device: torch.device) -> list[nn.Parameter]:
    torch.manual_seed(0)
    params = []
    for _ in range(6):
        layer = nn.Linear(256, 256).to(device)
        params += [layer.weight, layer.bias]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _time(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def part_b(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    print(
        f"\n## Part B: optimizer step alone, six 256x256 layers in 64x64 blocks — device {device}, "
        f"{torch.get_num_threads()} threads\n"
    )
    results = {}
    for bucketing in (True, False):
        params = _layers(device)
        optimizer = Shampoo(
            params,
            lr=1e-3,
            betas=(0.9, 0.999),
            epsilon=1e-10,
            max_preconditioner_dim=64,
            precondition_frequency=1,
            grafting_config=AdamPreconditionerConfig(epsilon=1e-8),
            use_bucketing=bucketing,
        )
        optimizer.step()  # first refresh
        refresh = _time(optimizer.step, args.repeats, device)
        optimizer.param_groups[0]["precondition_frequency"] = 10**9
        plain = _time(optimizer.step, args.repeats * 4, device)
        results[bucketing] = (plain, refresh, len(optimizer.plans))
    blocks = 6 * 16
    flops = blocks * 8 * 64**3  # per plain step: two factor updates and two preconditioner matmuls
    a = torch.randn(blocks, 64, 64, device=device)
    b = torch.randn(blocks, 64, 64, device=device)
    matmul = _time(lambda: torch.bmm(a, b), args.repeats * 4, device)
    matmul_rate = blocks * 2 * 64**3 / matmul
    print("| path | buckets | plain step (ms) | refresh step (ms) | plain GFLOP/s | fraction of bmm |")
    print("|---|---|---|---|---|---|")
    for bucketing, label in ((True, "bucketed"), (False, "one block at a time")):
        plain, refresh, buckets = results[bucketing]
        rate = flops / plain
        print(
            f"| {label} | {buckets} | {plain * 1e3:.2f} | {refresh * 1e3:.2f} | {rate / 1e9:.2f} | "
            f"{rate / matmul_rate:.2f} |"
        )
    speed_plain = results[False][0] / results[True][0]
    speed_refresh = results[False][1] / results[True][1]
    print(
        f"\nbucketed speed-up: {speed_plain:.2f}x on plain steps, {speed_refresh:.2f}x on refresh steps; "
        f"plain bmm [{blocks},64,64]: {matmul_rate / 1e9:.2f} GFLOP/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed plain steps per measurement")
    parser.add_argument("--refresh-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", action="store_true", help="also coupled Newton and QR refreshes")
    parser.add_argument("--direct", action="store_true", help="run each frequency for real (GPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("b", "all"):
        part_b(args)
    if args.part in ("a", "all"):
        part_a(args)


if __name__ == "__main__":
    main()
