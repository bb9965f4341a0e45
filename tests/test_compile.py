"""``shampoo_pt2_compile_config``: plain steps as one ``torch.compile``d graph per lane.

The checks count graphs with a backend that records every graph it is handed (a graph break
hands it two, a recompilation one more), and compare with the eager optimizer over steps that
include refreshes, a non-finite gradient block, a learning-rate change and a missing gradient.
``aot_eager`` traces exactly what ``inductor`` would compile but runs eager kernels, so it must
agree with eager bitwise (the cheaper checks use ``eager``: Dynamo's graph, no AOT tracing);
``inductor`` (generated C++ on the CPU, minutes to compile here) is
checked within rounding in the test marked ``slow``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import make_batches, small_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_shampoo import (
    AdamPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    PSGDKronPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    ScheduleFreeConfig,
    Shampoo,
    ShampooCallback,
    ShampooPT2CompileConfig,
    configure_shampoo,
)

STEPS = 10
#: Steps 1-3 graft alone (start_preconditioning_step defaults to the frequency), refreshes at 4
#: and 8. Eager: the first step of each phase (1, and 4 which also refreshes: they fill the
#: lane's caches); compiled: the others, by four graphs — the plain step grafting alone, the
#: plain step preconditioned, and a refresh step's two (before and after the eager refresh).
FREQUENCY = 4
COMPILED_STEPS = 8
GRAPHS = 4
NAN_STEP = 6  # a plain (compiled) step


def _states(opt: Shampoo) -> dict[str, torch.Tensor]:
    return {
        f"{key}.{name}": tensor
        for key, entries in opt.state_dict()["state"].items()
        for name, tensor in entries.items()
    }


def _tiny() -> nn.Module:
    """An MLP on ``make_batches``' inputs: fewer buckets than ``small_model``, so a quicker trace."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 6), nn.Tanh(), nn.Linear(6, 4))


def _run(
    make: Callable[[nn.Module], Shampoo],
    steps: int = STEPS,
    before_step: Callable[[int, nn.Module, Shampoo], None] | None = None,
    model_fn: Callable[[], nn.Module] = _tiny,
) -> tuple[nn.Module, Shampoo]:
    model = model_fn()
    opt = make(model)
    first_matrix = next(p for p in model.parameters() if p.ndim == 2)
    for step, (x, y) in enumerate(make_batches(steps), start=1):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step == NAN_STEP:
            first_matrix.grad[0, 0] = float("nan")  # its block is skipped this step
        if before_step is not None:
            before_step(step, model, opt)
        opt.step()
    return model, opt


def _shampoo(config: Any = None, **kwargs: Any) -> Callable[[nn.Module], Shampoo]:
    options: dict[str, Any] = dict(
        lr=0.05,
        precondition_frequency=FREQUENCY,
        grafting_config=AdamPreconditionerConfig(epsilon=1e-8),
        weight_decay=0.01,
        momentum=0.5,
        use_merge_dims=False,
        epsilon=1e-8,
    )
    options.update(kwargs)
    return lambda model: Shampoo(model.parameters(), shampoo_pt2_compile_config=config, **options)


def _assert_same(
    ours: tuple[nn.Module, Shampoo],
    eager: tuple[nn.Module, Shampoo],
    tol: dict[str, float] | None = None,
    state_tol: dict[str, float] | None = None,
) -> None:
    """Parameters and every state tensor equal (bitwise unless tolerances are given)."""
    exact = {"rtol": 0.0, "atol": 0.0}
    for (name, a), (_, b) in zip(ours[0].named_parameters(), eager[0].named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **(tol or exact))
    ours_state, eager_state = _states(ours[1]), _states(eager[1])
    assert ours_state.keys() == eager_state.keys()
    for key, value in ours_state.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(
                value,
                eager_state[key],
                equal_nan=True,
                msg=lambda m, key=key: f"{key}: {m}",
                **(state_tol or tol or exact),
            )
        else:
            assert torch.equal(value, eager_state[key]), key


@dataclass
class _Case:
    name: str
    config: Any
    model_fn: Callable[[], nn.Module]
    backend: str = "aot_eager"


SMALL = _Case("shampoo_small_model", RootInvShampooPreconditionerConfig(), small_model)
CASES = [
    _Case("shampoo", RootInvShampooPreconditionerConfig(), _tiny),
    _Case("soap", EigenvalueCorrectedShampooPreconditionerConfig(), _tiny, "eager"),  # keeps it < 20 s
    # small_model: conv, linear, 3-D and bias parameters (every kind of region and bucket).
    pytest.param(SMALL, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_plain_steps_equal_eager_without_breaks_or_recompiles(case: _Case) -> None:
    counter = CompileCounterWithBackend(case.backend)
    # fullgraph=False: a graph break would not raise but hand the backend one more graph.
    config = ShampooPT2CompileConfig(backend=counter, fullgraph=False)
    torch._dynamo.utils.counters.clear()
    compiled = _run(_shampoo(config, preconditioner_config=case.config), model_fn=case.model_fn)
    eager = _run(_shampoo(None, preconditioner_config=case.config), model_fn=case.model_fn)
    _assert_same(compiled, eager)
    assert compiled[1].compiled_steps == COMPILED_STEPS
    # One graph per phase, each traced once: no graph break, no recompilation from step to step
    # (the step count, the bias corrections and the learning rate are tensors).
    assert counter.frame_count == GRAPHS
    assert counter.op_count > 0
    assert not torch._dynamo.utils.counters["graph_break"]
    nonfinite = sum(int(v.sum()) for k, v in _states(compiled[1]).items() if k.endswith("status.nonfinite"))
    assert nonfinite == 1  # the block with the NaN, skipped on a compiled step


def test_learning_rate_changes_and_missing_gradients_do_not_recompile() -> None:
    counter = CompileCounterWithBackend("eager")

    def perturb(step: int, model: nn.Module, opt: Shampoo) -> None:
        opt.param_groups[0]["lr"] = 0.05 / step  # as a scheduler would
        if step == 7:
            model[-1].bias.grad = None  # this step runs eagerly

    config = ShampooPT2CompileConfig(backend=counter)
    compiled = _run(_shampoo(config), before_step=perturb)
    eager = _run(_shampoo(None), before_step=perturb)
    _assert_same(compiled, eager)
    assert compiled[1].compiled_steps == COMPILED_STEPS - 1  # step 7 ran eagerly
    assert counter.frame_count == GRAPHS


def test_staggered_refreshes_run_compiled_around_the_eager_refresh() -> None:
    """With ``refresh_stagger`` (the presets'), most steps refresh some block: they run as the
    two graphs around the eager refresh, not eagerly, and recompile nothing."""
    counter = CompileCounterWithBackend("eager")
    config = ShampooPT2CompileConfig(backend=counter)
    compiled = _run(_shampoo(config, refresh_stagger=True))
    eager = _run(_shampoo(None, refresh_stagger=True))
    _assert_same(compiled, eager)
    assert compiled[1].compiled_steps == COMPILED_STEPS
    assert counter.frame_count <= GRAPHS


def test_tensor_learning_rate_is_read_each_step() -> None:
    counter = CompileCounterWithBackend("eager")
    rates: dict[int, torch.Tensor] = {}

    def make(config: Any) -> Callable[[nn.Module], Shampoo]:
        def build(model: nn.Module) -> Shampoo:
            rates[id(model)] = torch.tensor(0.05)
            return _shampoo(config, lr=rates[id(model)])(model)

        return build

    def decay(step: int, model: nn.Module, opt: Shampoo) -> None:
        rates[id(model)].fill_(0.05 / step if step != 9 else float("nan"))  # nan: update skipped

    compiled = _run(make(ShampooPT2CompileConfig(backend=counter)), before_step=decay)
    eager = _run(make(None), before_step=decay)
    _assert_same(compiled, eager)
    assert counter.frame_count == GRAPHS


def test_psgd_kron_runs_eagerly() -> None:
    """PSGD-Kron decides on the host, from the step count, whether it fits ``Q``: compiled,
    that would be one graph per step, so its lanes stay eager."""
    counter = CompileCounterWithBackend("eager")
    config = ShampooPT2CompileConfig(backend=counter)
    kron = PSGDKronPreconditionerConfig()
    compiled = _run(_shampoo(config, preconditioner_config=kron, grafting_config=None))
    eager = _run(_shampoo(None, preconditioner_config=kron, grafting_config=None))
    _assert_same(compiled, eager)
    assert compiled[1].compiled_steps == 0 and counter.frame_count == 0


def test_iterate_averaging_runs_eagerly() -> None:
    """Schedule-Free's and GPA's coefficients are host values of each step: their lanes stay
    eager (and equal to the optimizer without the config)."""
    counter = CompileCounterWithBackend("eager")
    config = ShampooPT2CompileConfig(backend=counter)
    options = dict(momentum=0.0, iterate_averaging_config=ScheduleFreeConfig())
    compiled = _run(_shampoo(config, **options))
    eager = _run(_shampoo(None, **options))
    _assert_same(compiled, eager)
    assert compiled[1].compiled_steps == 0 and counter.frame_count == 0


def test_presets_take_the_config() -> None:
    counter = CompileCounterWithBackend("eager")
    config = ShampooPT2CompileConfig(backend=counter)

    def make(cfg: Any) -> Callable[[nn.Module], Shampoo]:
        def build(model: nn.Module) -> Shampoo:
            opt = configure_shampoo(model, "shampoo", lr=1e-2, shampoo_pt2_compile_config=cfg)
            assert isinstance(opt, Shampoo)
            return opt

        return build

    compiled, eager = _run(make(config), steps=6), _run(make(None), steps=6)
    _assert_same(compiled, eager)
    assert compiled[1].compile_config is config and eager[1].compile_config is None
    assert compiled[1].compiled_steps > 0 and counter.frame_count >= 1
    model = _tiny()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dropped_in = ShampooCallback(shampoo_pt2_compile_config=config).translate(adamw, model)
    assert dropped_in.compile_config is config


@pytest.mark.slow
def test_inductor_equals_eager_within_rounding() -> None:
    """Generated kernels round differently (fused, reordered sums): close, not bitwise. On a
    busy 2-core CPU each graph takes about a minute to compile."""
    # Damping 1e-4 and biases grafted alone: a rank-deficient factor under a tiny damping
    # magnifies rounding differences far beyond rounding (1e-8 gives 2e-4 after one refresh).
    options = dict(epsilon=1e-4, skip_preconditioning_rank_lt=2)
    compiled = _run(_shampoo(ShampooPT2CompileConfig(backend="inductor"), **options))
    eager = _run(_shampoo(None, **options))
    # Roots of factors that are still rank-deficient (a 6x32 gradient a step, 32x32 factor)
    # are ε^(-1/4)-sized and magnify rounding: 1e-3 relative there, 1e-4 on the parameters.
    _assert_same(compiled, eager, tol=dict(rtol=1e-4, atol=1e-5), state_tol=dict(rtol=1e-3, atol=1e-4))
    assert compiled[1].compiled_steps == COMPILED_STEPS


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": 3}, r"shampoo_pt2_compile_config\.backend must be a backend name"),
        ({"backend": ""}, r"shampoo_pt2_compile_config\.backend must be a backend name"),
        ({"mode": "fast"}, r"shampoo_pt2_compile_config\.mode must be one of"),
        ({"fullgraph": 1}, r"shampoo_pt2_compile_config\.fullgraph must be a bool"),
        ({"dynamic": None}, r"shampoo_pt2_compile_config\.dynamic must be a bool"),
    ],
)
def test_config_refuses_bad_fields(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShampooPT2CompileConfig(**kwargs)


def test_optimizer_refuses_what_is_not_a_compile_config() -> None:
    model = small_model()
    with pytest.raises(
        ValueError, match=r"shampoo_pt2_compile_config must be None or .*ShampooPT2CompileConfig"
    ):
        Shampoo(model.parameters(), shampoo_pt2_compile_config=object())
    with pytest.raises(ValueError, match=r"shampoo_pt2_compile_config applies to the whole optimizer"):
        Shampoo(
            [{"params": list(model.parameters()), "shampoo_pt2_compile_config": ShampooPT2CompileConfig()}]
        )


def test_distributed_shampoo_config_is_read_by_its_field_names() -> None:
    @dataclass(frozen=True)
    class ForeignConfig:  # stands for Distributed Shampoo's ShampooPT2CompileConfig
        pytorch_compile_backend: str = "aot_eager"
        enable_shampoo_pt2_dynamic_shape: bool | None = False

    opt = Shampoo(small_model().parameters(), shampoo_pt2_compile_config=ForeignConfig())
    assert opt.compile_config == ShampooPT2CompileConfig(backend="aot_eager", dynamic=False)
    assert Shampoo(small_model().parameters()).compile_config is None
    assert copy.deepcopy(ShampooPT2CompileConfig()) == ShampooPT2CompileConfig()
