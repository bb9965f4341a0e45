"""Step-by-step conformance of ``lightning_shampoo.Shampoo`` with Meta's Distributed Shampoo.

Runs only where ``distributed_shampoo`` is importable (it prints why and exits 0 otherwise).
Both optimizers start from the same copy of a small mixed-shape model (a 4-D conv kernel, a
40x64 matrix split into blocks of at most 32, a 10x40 head, biases and a norm-like scale vector;
some cases add a 1x16 weight) and see the same data for 20 steps. Each row of the table is one
configuration written twice, once with our argument names and once with Distributed Shampoo's.

Relative trajectory gap (the ``gap`` column)::

    gap = max over steps t of  ‖θ_ours(t) − θ_DS(t)‖ / ‖θ_DS(t) − θ(0)‖

with ``θ`` all parameters flattened into one vector: the largest distance between the two
trajectories, relative to how far Distributed Shampoo has moved by then. The ``floor`` column is
the same measure between two Distributed Shampoo runs whose gradients differ by one rounding
(relative noise of ``finfo(dtype).eps`` on every entry, every step): how far rounding alone
carries it. A row passes when its gap is at most its tolerance,
1e-3 in float32 and 1e-6 in float64, or — where Distributed Shampoo's own floor is above that —
at most ``FLOOR_MARGIN`` times the floor. float64 runs execute Distributed Shampoo with float64 as
torch's default dtype (it forms its bias corrections as default-dtype tensors), and float32 runs
use ``FLOAT32_EPSILON`` (see there).

    python benchmarks/conformance_ds.py [--dtype float32|float64|both] [--steps 20] [--only NAME]
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_shampoo as ls

BLOCK = 32
#: 2⁻⁷: exact in float32, which Distributed Shampoo keeps its learning rate in (0.01 would put
#: every float64 row 2e-8 apart from the first step, a perturbation the QR rows amplify).
LR = 2.0**-7
#: Shampoo's epsilon in float32 runs. With Distributed Shampoo's default 1e-12 the early,
#: rank-deficient factors have near-null eigen-directions whose eigenvalues are float32 rounding
#: (~1e-7 of the largest); their inverse roots amplify that rounding, and two correct
#: implementations part at ~2e-2 within 20 steps (1e-8: ~2e-3, 1e-6: ~3e-4) while the same
#: rows agree to ~2e-8 in float64. 1e-6 keeps float32 rows about semantics, not rounding.
FLOAT32_EPSILON = 1e-6


# ------------------------------------------------------------------------------------- model


class Net(nn.Module):
    """Conv kernel [4, 3, 3, 3], 40x64 and 10x40 matrices, biases, a scale vector; ``row`` adds
    a 1x16 weight (a matrix with a size-1 dim)."""

    def __init__(self, row: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(64, 40)
        self.fc2 = nn.Linear(40, 10)
        self.scale = nn.Parameter(torch.ones(10))
        self.row = nn.Parameter(0.1 * torch.randn(1, 16)) if row else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc1(h))
        if self.row is not None:
            h = torch.cat([h[:, :16] * (1.0 + self.row), h[:, 16:]], dim=1)
        return self.fc2(h) * self.scale


def _data(steps: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 10, (8,), generator=g))
        for _ in range(steps)
    ]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Spec:
    """One configuration in library-neutral terms; ``ours_names`` / ``ds_names`` translate it."""

    precond: str = "root_inv"  # root_inv | eigen | soap
    amortized: str = "eigh"  # eigh | qr | newton
    graft: str | None = None  # None | sgd | adagrad | rmsprop | adam (| *_default: class default eps)
    betas: tuple[float, float] = (0.9, 0.999)
    epsilon: float | None = None  # None: 1e-12 (its default) in float64, FLOAT32_EPSILON in float32
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decoupled: bool = True
    frequency: int = 1
    start: int = -1
    bias_correction: bool = True
    row: bool = False
    merge: bool = True  # False: ours use_merge_dims=False, its target_parameter_dimensionality=8
    #: Its ``target_parameter_dimensionality``, passed to both (ours: the core's group option).
    target: float | None = None
    trace_scaling: float | None = None  # exponent, None = off
    #: Vectors (biases, the scale) on Adam in their own param group, so that every factor is a
    #: matrix's — full rank from step ``start`` on when ``start`` ≥ 8 (see ``QR`` below).
    vectors_on_adam: bool = False
    #: Extra keyword arguments of our Shampoo (our improvements that Distributed Shampoo lacks).
    ours_extra: dict[str, Any] = field(default_factory=dict)
    #: Pass Distributed Shampoo's newer argument names to our Shampoo instead of ours.
    ds_argument_names: bool = False


def _epsilon(spec: Spec, dtype: torch.dtype) -> float:
    if spec.epsilon is not None:
        return spec.epsilon
    return 1e-12 if dtype == torch.float64 else FLOAT32_EPSILON


def _preconditioner(lib: Any, spec: Spec, dtype: torch.dtype) -> Any:
    """The spec's preconditioner config from ``lib`` (both libraries use the same class names)."""
    fdt = torch.float64 if dtype == torch.float64 else torch.float32
    trace = {}
    if spec.trace_scaling is not None:
        trace = {"use_trace_scaling": True, "trace_scaling_exponent": spec.trace_scaling}
    if spec.amortized == "newton":
        amortized: Any = lib.CoupledNewtonConfig()
    elif spec.amortized == "qr":
        amortized = lib.QREigendecompositionConfig()
    elif spec.precond == "root_inv":
        amortized = lib.EigenConfig()
    else:
        amortized = lib.EighEigendecompositionConfig()
    common = dict(amortized_computation_config=amortized, factor_matrix_dtype=fdt, **trace)
    if spec.precond == "root_inv":
        return lib.RootInvShampooPreconditionerConfig(inv_factor_matrix_dtype=fdt, **common)
    if spec.precond == "eigen":
        return lib.EigendecomposedShampooPreconditionerConfig(
            factor_matrix_eigenvectors_dtype=fdt, factor_matrix_eigenvalues_dtype=fdt, **common
        )
    return lib.EigenvalueCorrectedShampooPreconditionerConfig(
        factor_matrix_eigenvectors_dtype=fdt, corrected_eigenvalues_dtype=fdt, **common
    )


def _ours(spec: Spec, dtype: torch.dtype) -> dict[str, Any]:
    config = _preconditioner(ls, spec, dtype)
    kwargs: dict[str, Any] = dict(
        lr=LR,
        betas=spec.betas,
        epsilon=_epsilon(spec, dtype),
        weight_decay=spec.weight_decay,
        max_preconditioner_dim=BLOCK,
        precondition_frequency=spec.frequency,
        start_preconditioning_step=spec.start,
        use_bias_correction=spec.bias_correction,
        grafting_config=_graft(ls, spec.graft),
        preconditioner_config=config,
        use_merge_dims=spec.merge,
    )
    if spec.target is not None:
        kwargs["target_parameter_dimensionality"] = spec.target
    if spec.ds_argument_names:
        kwargs["weight_decay_type"] = (
            ls.WeightDecayType.DECOUPLED if spec.decoupled else ls.WeightDecayType.L2
        )
        if spec.momentum:
            kwargs["iterate_averaging_config"] = ls.ClassicMomentumConfig(
                momentum=spec.momentum, dampening=spec.dampening, use_nesterov=spec.nesterov
            )
    else:
        kwargs.update(
            use_decoupled_weight_decay=spec.decoupled,
            momentum=spec.momentum,
            dampening=spec.dampening,
            use_nesterov=spec.nesterov,
        )
    return {**kwargs, **spec.ours_extra}


def _graft(lib: Any, graft: str | None) -> Any:
    if graft is None:
        return None
    if graft == "sgd":
        return lib.SGDPreconditionerConfig()
    if graft == "adagrad":
        return lib.AdaGradPreconditionerConfig(epsilon=1e-8)
    if graft == "rmsprop":
        return lib.RMSpropPreconditionerConfig(beta2=0.99, epsilon=1e-8)
    if graft == "adam":
        return lib.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
    if graft == "adam_default":
        return lib.AdamPreconditionerConfig()
    if graft == "rmsprop_default":
        return lib.RMSpropPreconditionerConfig()
    raise ValueError(graft)


def _ds(spec: Spec, dtype: torch.dtype) -> dict[str, Any]:
    import distributed_shampoo as ds
    from distributed_shampoo.shampoo_types import ClassicMomentumConfig

    config = _preconditioner(ds, spec, dtype)
    averaging = None
    if spec.momentum:
        averaging = ClassicMomentumConfig(
            momentum=spec.momentum, dampening=spec.dampening, use_nesterov=spec.nesterov
        )
    return dict(
        lr=LR,
        betas=spec.betas,
        epsilon=_epsilon(spec, dtype),
        weight_decay=spec.weight_decay,
        weight_decay_type=ds.WeightDecayType.DECOUPLED if spec.decoupled else ds.WeightDecayType.L2,
        max_preconditioner_dim=BLOCK,
        precondition_frequency=spec.frequency,
        start_preconditioning_step=spec.start,
        use_bias_correction=spec.bias_correction,
        iterate_averaging_config=averaging,
        grafting_config=_graft(ds, spec.graft),
        preconditioner_config=config,
        # Our use_merge_dims=False squeezes size-1 dims and merges nothing, as its deprecated
        # use_merge_dims=False did: a target at least every parameter's order does that now
        # (math.inf would also keep the size-1 dims).
        distributed_config=ds.SingleDeviceDistributedConfig(
            target_parameter_dimensionality=(1 if spec.merge else 8) if spec.target is None else spec.target
        ),
    )


def _groups(model: nn.Module, spec: Spec, lib: Any) -> Any:
    """All parameters in one group, or (``vectors_on_adam``) vectors in a group of their own on
    Adam (the preconditioner, no grafting)."""
    if not spec.vectors_on_adam:
        return model.parameters()
    matrices = [p for p in model.parameters() if sum(d > 1 for d in p.shape) >= 2]
    vectors = [p for p in model.parameters() if sum(d > 1 for d in p.shape) < 2]
    adam = lib.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
    return [{"params": matrices}, {"params": vectors, "preconditioner_config": adam, "grafting_config": None}]


@dataclass(frozen=True)
class Case:
    name: str
    spec: Spec
    #: Tolerance override ``{dtype name: gap}`` with the reason in ``note``.
    tolerance: dict[str, float] = field(default_factory=dict)
    note: str = ""


SOAP = Spec(precond="soap", betas=(0.95, 0.95), epsilon=1e-8, start=4)


def cases() -> list[Case]:
    """The issue's matrix: rows that agreed before the parity work, then the rows that did not."""
    rows = [
        Case("root-inv, no grafting", Spec()),
        *(Case(f"root-inv, {g} grafting", Spec(graft=g)) for g in ("sgd", "adagrad", "rmsprop", "adam")),
        *(
            Case(f"eigendecomposed, {g or 'no'} grafting", Spec(precond="eigen", graft=g))
            for g in (None, "adam")
        ),
        # Coupled Newton needs an epsilon it converges with in 100 iterations (at 1e-12 neither
        # implementation converges on the early rank-deficient factors, and they differ in what
        # they do then: Distributed Shampoo uses the unconverged root, we keep the previous one).
        Case("coupled Newton, adam grafting", Spec(amortized="newton", graft="adam", epsilon=1e-5)),
        Case("momentum 0.9", Spec(graft="adam", momentum=0.9)),
        Case("Nesterov 0.9", Spec(graft="adam", momentum=0.9, nesterov=True)),
        Case("L2 decay 1e-2", Spec(graft="adam", weight_decay=1e-2, decoupled=False)),
        Case("decoupled decay 1e-2", Spec(graft="adam", weight_decay=1e-2)),
        Case("betas[1] = 1", Spec(graft="adagrad", betas=(0.9, 1.0))),
        Case("start step 5, frequency 5", Spec(graft="adam", frequency=5, start=5)),
        Case("start step 8, frequency 4", Spec(graft="adam", frequency=4, start=8)),
        # The rows that did not agree before.
        Case("SOAP defaults (frequency 1, from step 4)", SOAP),
        Case("Adam grafting, use_bias_correction=False", Spec(graft="adam", bias_correction=False)),
        Case("momentum 0.5, dampening 0.1", Spec(graft="adam", momentum=0.5, dampening=0.1)),
        Case("Nesterov 0.5, dampening 0.1", Spec(graft="adam", momentum=0.5, dampening=0.1, nesterov=True)),
        # QR refreshes are one QR-algorithm step from the last basis, sorted by eigenvalue: on a
        # rank-deficient factor the null-space columns tie, rounding orders them, and the next
        # step depends on that order — its own runs part as far when nudged by one rounding
        # (the floor column). With full-rank factors (matrices only, from step 8) they agree.
        Case("QR, eigendecomposed", Spec(precond="eigen", amortized="qr", graft="adam")),
        Case("QR, SOAP (from step 4)", Spec(**{**SOAP.__dict__, "amortized": "qr"})),
        Case(
            "QR, eigendecomposed, full-rank factors",
            Spec(precond="eigen", amortized="qr", graft="adam", start=8, vectors_on_adam=True),
        ),
        Case(
            "QR, SOAP, full-rank factors",
            Spec(**{**SOAP.__dict__, "amortized": "qr", "start": 8, "vectors_on_adam": True}),
        ),
        Case("1x16 weight", Spec(graft="adam", row=True)),
        Case("1x16 weight, no merging", Spec(graft="adam", row=True, merge=False)),
        Case(
            "1x16 weight, target_parameter_dimensionality=inf", Spec(graft="adam", row=True, target=math.inf)
        ),
        Case("Adam grafting, default epsilon", Spec(graft="adam_default")),
        Case("RMSprop grafting, default epsilon", Spec(graft="rmsprop_default")),
        # Distributed Shampoo's newer arguments.
        Case("trace scaling 0.5, root-inv", Spec(graft="adam", trace_scaling=0.5)),
        Case("trace scaling 0.25, eigendecomposed", Spec(precond="eigen", graft="adam", trace_scaling=0.25)),
        Case(
            "DS names: weight_decay_type L2, ClassicMomentumConfig",
            Spec(
                graft="adam",
                weight_decay=1e-2,
                decoupled=False,
                momentum=0.5,
                dampening=0.1,
                ds_argument_names=True,
            ),
        ),
    ]
    return rows


DEFAULT_TOLERANCE = {"float32": 1e-3, "float64": 1e-6}
#: A row whose rounding floor exceeds its tolerance passes within this multiple of the floor.
FLOOR_MARGIN = 3.0


# ------------------------------------------------------------------------------------- runs


def _trajectory(
    make: Callable[[nn.Module], torch.optim.Optimizer], model: nn.Module, data: list, noise: float = 0.0
) -> list[torch.Tensor]:
    """Parameters after each step; ``noise``: relative perturbation of every gradient entry."""
    model = copy.deepcopy(model)
    optimizer = make(model)
    loss_fn = nn.CrossEntropyLoss()
    points = [_flat(model)]
    g = torch.Generator().manual_seed(2)
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        if noise:
            for p in model.parameters():
                assert p.grad is not None
                p.grad.mul_(1.0 + noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
        optimizer.step()
        points.append(_flat(model))
    return points


def _gap(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ours[1:], theirs[1:]):
        moved = float((b - theirs[0]).norm())
        worst = max(worst, float((a - b).norm()) / max(moved, 1e-300))
    return worst


def _theirs(
    case: Case, dtype: torch.dtype, model: nn.Module, data: list, noise: float = 0.0
) -> list[torch.Tensor]:
    import distributed_shampoo as ds

    # Distributed Shampoo forms its bias corrections (1 − β₂ᵗ, 1 − β₁ᵗ) as default-dtype tensors:
    # in float32 they carry ~6e-8 absolute error, ~6e-5 relative at β₂ = 0.999, which alone
    # puts a float64 run ~1e-5 off. Running it under the model's default dtype removes that floor.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _trajectory(
            lambda m: ds.DistributedShampoo(_groups(m, case.spec, ds), **_ds(case.spec, dtype)),
            model,
            data,
            noise,
        )
    finally:
        torch.set_default_dtype(previous)


def gap(case: Case, dtype: torch.dtype, steps: int, floor: bool = False) -> tuple[float, float | None]:
    """The relative trajectory gap of one case (module docstring) and, with ``floor``, the
    rounding floor: the gap between two Distributed Shampoo runs whose gradients differ by one
    rounding (relative ``finfo(dtype).eps`` noise on every entry, every step), i.e. how far
    rounding alone carries it."""
    torch.manual_seed(0)
    model = Net(case.spec.row).to(dtype)
    data = _data(steps, dtype)
    ours = _trajectory(
        lambda m: ls.Shampoo(_groups(m, case.spec, ls), **_ours(case.spec, dtype)), model, data
    )
    theirs = _theirs(case, dtype, model, data)
    if not floor:
        return _gap(ours, theirs), None
    noisy = _theirs(case, dtype, model, data, noise=torch.finfo(dtype).eps)
    return _gap(ours, theirs), _gap(noisy, theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = parser.parse_args()
    try:
        import distributed_shampoo  # noqa: F401
    except ImportError as error:
        print(
            f"skipped: distributed_shampoo is not importable ({error}); "
            "install Meta's Distributed Shampoo to run"
        )
        return
    logging.getLogger("distributed_shampoo").setLevel(logging.ERROR)
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    print("| case | dtype | gap | floor | tolerance | pass |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for case in cases():
        if args.only and args.only not in case.name:
            continue
        for name in dtypes:
            base = case.tolerance.get(name, DEFAULT_TOLERANCE[name])
            try:
                value, floor = gap(case, getattr(torch, name), args.steps, floor=True)
                assert floor is not None
                tolerance = max(base, FLOOR_MARGIN * floor)
                text, floor_text, ok = f"{value:.1e}", f"{floor:.1e}", value <= tolerance
            except Exception as error:  # a refused argument is a failing row, not a crash
                text, floor_text, ok = f"error: {type(error).__name__}: {str(error)[:70]}", "", False
                tolerance = base
            failures += not ok
            verdict = "yes" if ok else "NO"
            print(
                f"| {case.name} | {name} | {text} | {floor_text} | {tolerance:.0e} | {verdict} |", flush=True
            )
    print(f"\n{failures} row(s) outside tolerance")


if __name__ == "__main__":
    main()
