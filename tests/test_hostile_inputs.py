"""Hostile inputs (issue 16): every public constructor and ``load_state_dict`` refuses a bad value
with a ``ValueError`` that names the argument, or handles it as documented. (Preconditioner
configs, schedules and strategies: ``test_hostile_configs.py``.)

Each table row is ``(description, call, name)``: ``call()`` must raise ``ValueError`` whose message
contains ``name``. Rows marked ``core`` need wiring in the optimizer core (see the reasons).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_shampoo import (
    PreconditionerHealthMonitor,
    PreconditionFrequencyScheduler,
    PSGDKronPreconditionerConfig,
    SGDFallback,
    Shampoo,
    ShampooCallback,
    configure_shampoo,
)
from lightning_shampoo._checks import MAX_EPSILON_SCALE, clamp_epsilon_scale
from lightning_shampoo._state_checks import nonfinite_entries
from lightning_shampoo.health import BlockHealth

nan, inf = math.nan, math.inf


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))]


def _shampoo(**kwargs: Any) -> Callable[[], Any]:
    return lambda: Shampoo(_params(), **kwargs)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _configure(**kwargs: Any) -> Callable[[], Any]:
    return lambda: configure_shampoo(_net(), **kwargs)


Row = tuple[str, Callable[[], Any], str]

SHAMPOO: list[Row] = [
    ("lr inf", _shampoo(lr=inf), "lr"),
    ("lr nan", _shampoo(lr=nan), "lr"),
    ("lr negative", _shampoo(lr=-1e-3), "lr"),
    ("lr str", _shampoo(lr="1e-3"), "lr must be a number, got str '1e-3'"),
    ("lr None", _shampoo(lr=None), "lr"),
    ("lr bool", _shampoo(lr=True), "lr"),
    ("lr tensor nan", _shampoo(lr=torch.tensor(nan)), "lr"),
    ("lr tensor inf", _shampoo(lr=torch.tensor(inf)), "lr"),
    ("lr tensor negative", _shampoo(lr=torch.tensor(-1.0)), "lr"),
    ("lr tensor two elements", _shampoo(lr=torch.tensor([0.1, 0.2])), "lr"),
    ("weight_decay inf", _shampoo(weight_decay=inf), "weight_decay"),
    ("weight_decay nan", _shampoo(weight_decay=nan), "weight_decay"),
    ("weight_decay str", _shampoo(weight_decay="0.1"), "weight_decay"),
    ("epsilon inf", _shampoo(epsilon=inf), "epsilon"),
    ("epsilon str", _shampoo(epsilon="1e-8"), "epsilon must be a number, got str '1e-8'"),
    ("epsilon zero", _shampoo(epsilon=0.0), "epsilon"),
    ("betas float", _shampoo(betas=0.9), "betas must be a pair"),
    ("betas triple", _shampoo(betas=(0.9, 0.99, 0.999)), "betas must be a pair"),
    ("betas str item", _shampoo(betas=(0.9, "x")), r"betas[1]"),
    ("betas nan", _shampoo(betas=(nan, 0.9)), r"betas[0]"),
    ("betas inf", _shampoo(betas=(0.9, inf)), r"betas[1]"),
    ("beta3 nan", _shampoo(beta3=nan), "beta3"),
    ("beta3 str", _shampoo(beta3="0.5"), "beta3"),
    ("momentum nan", _shampoo(momentum=nan), "momentum"),
    ("momentum str", _shampoo(momentum="0.9"), "momentum"),
    ("momentum bool", _shampoo(momentum=True), "momentum"),
    ("dampening nan", _shampoo(momentum=0.9, dampening=nan), "dampening"),
    ("use_nesterov str", _shampoo(use_nesterov="yes"), "use_nesterov"),
    ("max_preconditioner_dim nan", _shampoo(max_preconditioner_dim=nan), "max_preconditioner_dim"),
    ("max_preconditioner_dim str", _shampoo(max_preconditioner_dim="1024"), "max_preconditioner_dim"),
    ("max_preconditioner_dim bool", _shampoo(max_preconditioner_dim=True), "max_preconditioner_dim"),
    ("precondition_frequency nan", _shampoo(precondition_frequency=nan), "precondition_frequency"),
    ("precondition_frequency float", _shampoo(precondition_frequency=10.0), "precondition_frequency"),
    (
        "start_preconditioning_step nan",
        _shampoo(start_preconditioning_step=nan),
        "start_preconditioning_step",
    ),
    (
        "start_preconditioning_step str",
        _shampoo(start_preconditioning_step="5"),
        "start_preconditioning_step",
    ),
    ("refresh_tolerance nan", _shampoo(refresh_tolerance=nan), "refresh_tolerance"),
    ("refresh_tolerance str", _shampoo(refresh_tolerance="0.1"), "refresh_tolerance"),
    (
        "skip_preconditioning_rank_lt float",
        _shampoo(skip_preconditioning_rank_lt=1.5),
        "skip_preconditioning",
    ),
    (
        "skip_preconditioning_rank_lt bool",
        _shampoo(skip_preconditioning_rank_lt=True),
        "skip_preconditioning",
    ),
    ("preconditioner_config str", _shampoo(preconditioner_config="shampoo"), "preconditioner_config"),
    ("grafting_config str", _shampoo(grafting_config="adam"), "grafting_config"),
]

PARAMETERS: list[Row] = [
    (
        "complex parameter",
        lambda: Shampoo([("z", nn.Parameter(torch.randn(3, 2, dtype=torch.complex64)))]),
        "'z' is complex",
    ),
    (
        "complex parameter advice",
        lambda: Shampoo([nn.Parameter(torch.randn(3, dtype=torch.cfloat))]),
        "view_as_real",
    ),
    (
        "duplicate in a group",
        lambda: (lambda p: Shampoo([("w", p), ("w2", p)]))(_params()[0]),
        "'w2' appears twice",
    ),
    (
        "duplicate across groups",
        lambda: (lambda p: Shampoo([{"params": [("a", p)]}, {"params": [("b", p)]}]))(_params()[0]),
        "'b' is already in this optimizer (as 'a')",
    ),
    ("misspelt key", lambda: Shampoo([{"params": _params(), "weight_decya": 0.1}]), "'weight_decya'"),
    (
        "misspelt key suggestion",
        lambda: Shampoo([{"params": _params(), "weight_decya": 0.1}]),
        "'weight_decay'",
    ),
    ("misspelt key case", lambda: Shampoo([{"params": _params(), "LR": 0.1}]), "'LR'"),
    ("foreign key eps", lambda: Shampoo([{"params": _params(), "eps": 1e-8}]), "'epsilon'"),
    ("foreign key nesterov", lambda: Shampoo([{"params": _params(), "nesterov": True}]), "'use_nesterov'"),
    ("foreign key maximize", lambda: Shampoo([{"params": _params(), "maximize": True}]), "maximize"),
    (
        "constructor key in a group",
        lambda: Shampoo([{"params": _params(), "use_bucketing": False}]),
        "use_bucketing",
    ),
]

CALLBACKS: list[Row] = [
    ("fallback target", lambda: SGDFallback(target="adam"), "target"),
    (
        "fallback max_condition_number str",
        lambda: SGDFallback(max_condition_number="1e6"),
        "max_condition_number",
    ),
    (
        "fallback max_condition_number nan",
        lambda: SGDFallback(max_condition_number=nan),
        "max_condition_number",
    ),
    ("fallback retry_after str", lambda: SGDFallback(retry_after="10"), "retry_after"),
    ("fallback retry_after nan", lambda: SGDFallback(retry_after=nan), "retry_after"),
    ("fallback epsilon_multiplier nan", lambda: SGDFallback(epsilon_multiplier=nan), "epsilon_multiplier"),
    ("fallback epsilon_multiplier str", lambda: SGDFallback(epsilon_multiplier="10"), "epsilon_multiplier"),
    ("fallback max_retries float", lambda: SGDFallback(max_retries=1.5), "max_retries"),
    (
        "fallback check_every_n_steps str",
        lambda: SGDFallback(check_every_n_steps="10"),
        "check_every_n_steps",
    ),
    ("fallback check_every_n_steps nan", lambda: SGDFallback(check_every_n_steps=nan), "check_every_n_steps"),
    ("fallback prefix", lambda: SGDFallback(prefix=3), "prefix"),
    (
        "fallback damping overflow",
        lambda: SGDFallback(epsilon_multiplier=1e13),
        "epsilon_multiplier ** max_retries",
    ),
    ("fallback damping retries", lambda: SGDFallback(max_retries=39), "max_retries"),
    (
        "monitor log_every_n_steps str",
        lambda: PreconditionerHealthMonitor(log_every_n_steps="10"),
        "log_every_n",
    ),
    (
        "monitor log_every_n_steps nan",
        lambda: PreconditionerHealthMonitor(log_every_n_steps=nan),
        "log_every_n",
    ),
    ("monitor top_k negative", lambda: PreconditionerHealthMonitor(top_k=-1), "top_k"),
    ("monitor top_k bool", lambda: PreconditionerHealthMonitor(top_k=True), "top_k"),
    ("monitor histograms str", lambda: PreconditionerHealthMonitor(histograms="yes"), "histograms"),
    (
        "monitor histogram_every_n_steps nan",
        lambda: PreconditionerHealthMonitor(histogram_every_n_steps=nan),
        "histogram_every_n_steps",
    ),
    ("monitor print_table str", lambda: PreconditionerHealthMonitor(print_table="no"), "print_table"),
    ("monitor table_rows str", lambda: PreconditionerHealthMonitor(table_rows="x"), "table_rows"),
    ("monitor table_rows zero", lambda: PreconditionerHealthMonitor(table_rows=0), "table_rows"),
    ("monitor prog_bar int", lambda: PreconditionerHealthMonitor(prog_bar=1), "prog_bar"),
    ("scheduler schedule nan", lambda: PreconditionFrequencyScheduler(nan), "schedule"),
    ("scheduler schedule zero", lambda: PreconditionFrequencyScheduler(0), "frequency"),
    ("scheduler start nan", lambda: PreconditionFrequencyScheduler(10, nan), "start_preconditioning_step"),
    ("scheduler start str", lambda: PreconditionFrequencyScheduler(10, "5"), "start_preconditioning_step"),
    (
        "scheduler log_metrics str",
        lambda: PreconditionFrequencyScheduler(10, log_metrics="yes"),
        "log_metrics",
    ),
    ("scheduler only", lambda: PreconditionFrequencyScheduler(10, only=5), "only"),
    ("callback use_bucketing str", lambda: ShampooCallback(use_bucketing="no"), "use_bucketing"),
    ("callback max_bucket_numel str", lambda: ShampooCallback(max_bucket_numel="x"), "max_bucket_numel"),
    ("callback beta2 nan", lambda: ShampooCallback(beta2=nan), "beta2"),
    ("callback beta2 str", lambda: ShampooCallback(beta2="0.9"), "beta2"),
    ("callback epsilon str", lambda: ShampooCallback(epsilon="1e-8"), "epsilon"),
    ("callback epsilon inf", lambda: ShampooCallback(epsilon=inf), "epsilon"),
    (
        "callback frequency str",
        lambda: ShampooCallback(precondition_frequency="10"),
        "precondition_frequency",
    ),
    (
        "callback start nan",
        lambda: ShampooCallback(start_preconditioning_step=nan),
        "start_preconditioning_step",
    ),
    ("callback max dim nan", lambda: ShampooCallback(max_preconditioner_dim=nan), "max_preconditioner_dim"),
    ("callback preconditioner", lambda: ShampooCallback(preconditioner=5), "preconditioner"),
    ("callback frequency_scheduler nan", lambda: ShampooCallback(frequency_scheduler=nan), "schedule"),
    ("callback health_monitor str", lambda: ShampooCallback(health_monitor="yes"), "health_monitor"),
    ("callback fallback int", lambda: ShampooCallback(fallback=1), "fallback"),
    ("callback misspelt option", lambda: ShampooCallback(weight_decya=0.1), "weight_decya"),
    ("callback beta3 nan", lambda: ShampooCallback(beta3=nan), "beta3"),
    ("callback refresh_tolerance str", lambda: ShampooCallback(refresh_tolerance="x"), "refresh_tolerance"),
]

CONFIGURE: list[Row] = [
    ("configure lr inf", _configure(lr=inf), "lr"),
    ("configure lr str", _configure(lr="1e-3"), "lr must be a number, got str '1e-3'"),
    ("configure weight_decay nan", _configure(weight_decay=nan), "weight_decay"),
    ("configure betas float", _configure(betas=0.9), "betas must be a pair"),
    ("configure betas str", _configure(betas=("0.9", 0.99)), r"betas[0]"),
    ("configure adam_betas nan", _configure(adam_betas=(0.9, nan)), r"adam_betas[1]"),
    ("configure epsilon str", _configure(epsilon="1e-8"), "epsilon"),
    ("configure epsilon inf", _configure(epsilon=inf), "epsilon"),
    ("configure adam_epsilon inf", _configure(adam_epsilon=inf), "adam_epsilon"),
    ("configure adam_epsilon str", _configure(adam_epsilon="1e-8"), "adam_epsilon"),
    ("configure schedule list", _configure(schedule=["cosine"]), "schedule"),
    ("configure warmup nan", _configure(schedule="cosine", total_steps=10, warmup_steps=nan), "warmup_steps"),
    ("configure warmup str", _configure(warmup_steps="5", total_steps=10), "warmup_steps"),
    ("configure total_steps str", _configure(schedule="cosine", total_steps="10"), "total_steps"),
    ("configure min_lr_ratio nan", _configure(min_lr_ratio=nan), "min_lr_ratio"),
    ("configure use_bucketing str", _configure(use_bucketing="no"), "use_bucketing"),
    ("configure max_bucket_numel zero", _configure(max_bucket_numel=0), "max_bucket_numel"),
    ("configure frequency nan", _configure(precondition_frequency=nan), "precondition_frequency"),
    ("configure override misspelt", _configure(param_groups={"*": {"weight_decya": 0.1}}), "weight_decya"),
    ("configure override nan", _configure(param_groups={"0.*": {"lr": nan}}), "lr"),
]

TABLE = SHAMPOO + PARAMETERS + CALLBACKS + CONFIGURE


#: Rows that need a change in the optimizer core, with what it is.
CORE: dict[str, str] = {}


@pytest.mark.parametrize(
    ("call", "name"),
    [
        pytest.param(c, n, id=d, marks=[pytest.mark.xfail(strict=True, reason=CORE[d])] if d in CORE else [])
        for d, c, n in TABLE
    ],
)
def test_refused_naming_the_argument(call: Callable[[], Any], name: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert name in str(info.value)


def test_add_param_group_refuses_like_the_constructor() -> None:
    w, b = _params()
    opt = Shampoo([("w", w)])
    for group, name in [
        ({"params": [("w_again", w)]}, "'w_again' is already in this optimizer (as 'w')"),
        ({"params": [("b", b)], "weight_decya": 0.0}, "weight_decya"),
        ({"params": [("b", b)], "lr": inf}, "lr"),
        ({"params": [("b", b)], "betas": 0.9}, "betas must be a pair"),
    ]:
        with pytest.raises(ValueError) as info:
            opt.add_param_group(group)
        assert name in str(info.value)
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [("b", b)], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5


def test_metadata_keys_are_kept() -> None:
    """Keys that schedulers, Lightning and libraries write (``initial_lr``, ``max_momentum``,
    ``name``, ``lr_scale``) are carried, not refused."""
    w, b = _params()
    group = {"params": [w, b], "initial_lr": 0.1, "max_momentum": 0.95, "name": "all", "lr_scale": 0.5}
    opt = Shampoo([group])
    assert {k: opt.param_groups[0][k] for k in ("initial_lr", "max_momentum", "name", "lr_scale")} == {
        "initial_lr": 0.1,
        "max_momentum": 0.95,
        "name": "all",
        "lr_scale": 0.5,
    }


def test_valid_edge_values_are_accepted() -> None:
    Shampoo(_params(), lr=torch.tensor(0.0), max_preconditioner_dim=inf, refresh_tolerance=inf)
    Shampoo(_params(), lr=0, weight_decay=0, epsilon=1, betas=[0, 1])
    SGDFallback(epsilon_multiplier=10.0, max_retries=30)  # 1e30: exactly the cap
    PreconditionerHealthMonitor(log_every_n_steps=None, top_k="all", table_rows=1)
    PSGDKronPreconditionerConfig(max_size_triangular=inf, max_skew=inf, preconditioner_update_probability=0.0)


def test_sparse_gradient_is_refused_at_the_first_step_naming_the_parameter() -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    opt = Shampoo([("embedding.weight", emb.weight)])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError) as info:
        opt.step()
    assert "'embedding.weight'" in str(info.value) and "sparse gradients are not supported" in str(info.value)


# ------------------------------------------------------------------------------ damping cap


def test_clamp_epsilon_scale_caps_instead_of_overflowing() -> None:
    assert clamp_epsilon_scale(1e39) == MAX_EPSILON_SCALE
    assert clamp_epsilon_scale(inf) == MAX_EPSILON_SCALE
    assert clamp_epsilon_scale(torch.tensor(1e3)) == 1e3
    assert float(torch.tensor(clamp_epsilon_scale(1e300), dtype=torch.float32)) == pytest.approx(1e30)
    for bad in (nan, 0.0, -1.0, "10"):
        with pytest.raises(ValueError, match="epsilon_scale"):
            clamp_epsilon_scale(bad)


def _health(opt: Shampoo, scale: float) -> list[BlockHealth]:
    return [
        BlockHealth(
            param_index=0,
            param_name="w",
            block_index=0,
            shape=(6, 4),
            group=0,
            preconditioner="shampoo",
            step=100,
            last_refresh_step=10,
            condition_numbers=(inf,),
            min_eigenvalues=(0.0,),
            max_eigenvalues=(1.0,),
            failure_count=0,
            nonfinite_count=0,
            fallback="grafting",
            epsilon_scale=scale,
        )
    ]


def test_fallback_compounded_damping_stays_under_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = Shampoo([("w", _params()[0])])
    requested: list[float] = []
    monkeypatch.setattr(
        opt, "request_refresh", lambda blocks, epsilon_scale=None: requested.append(epsilon_scale)
    )
    monkeypatch.setattr(opt, "set_fallback", lambda blocks, mode: None)
    fallback = SGDFallback(retry_after=1, max_retries=30)
    trainer = SimpleNamespace(is_global_zero=False)
    fallback._check(trainer, 0, opt, _health(opt, 1.0), step=1)  # switch
    fallback._check(trainer, 0, opt, _health(opt, 3e29), step=2)  # retry: 3e30 -> capped
    assert requested == [MAX_EPSILON_SCALE]
    assert fallback.records[(0, 0, 0)].epsilon_scale == MAX_EPSILON_SCALE


def test_request_refresh_with_a_huge_scale_never_crashes() -> None:
    w = _params()[0]
    opt = Shampoo([w], precondition_frequency=5)
    opt.request_refresh([(0, 0)], epsilon_scale=1e39)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.health()[0].epsilon_scale == pytest.approx(MAX_EPSILON_SCALE)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"use_bucketing": "no"}, "use_bucketing"), ({"max_bucket_numel": nan}, "max_bucket_numel")],
)
def test_shampoo_constructor_options(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Shampoo(_params(), **kwargs)


# ---------------------------------------------------------------------------- loaded state


def _trained() -> tuple[Shampoo, list[nn.Parameter]]:
    params = _params()
    opt = Shampoo(params, lr=0.01, precondition_frequency=2, epsilon=1e-6)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, params


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", inf),
        ("lr", nan),
        ("lr", -1.0),
        ("lr", torch.tensor(nan)),
        ("lr", "1e-3"),
        ("weight_decay", inf),
        ("weight_decay", -0.1),
        ("epsilon", nan),
        ("epsilon", 0.0),
        ("betas", (1.5, 0.9)),
        ("betas", 0.9),
        ("momentum", nan),
        ("precondition_frequency", 0),
        ("step", -1),
        ("step", "4"),
    ],
)
def test_load_state_dict_refuses_bad_group_values_naming_group_and_key(key: str, value: Any) -> None:
    opt, _ = _trained()
    state = opt.state_dict()
    state["param_groups"][0][key] = value
    fresh = Shampoo(_params(), lr=0.01, precondition_frequency=2, epsilon=1e-6)
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(state)
    assert "param group 0" in str(info.value) and key in str(info.value)
    assert fresh.param_groups[0]["lr"] == 0.01 and not fresh.state  # untouched


def test_nonfinite_entries_finds_corrupted_blocks_and_ignores_health() -> None:
    opt, _ = _trained()
    state = opt.state_dict()
    assert nonfinite_entries(state) == []  # health figures of a fresh state may be nan: not state
    state["state"][0]["block_0.precond.factor.0"].view(-1)[0] = nan
    state["state"][1]["block_0.precond.factor.0"].view(-1)[2] = inf
    assert nonfinite_entries(state) == [(0, 0, "precond.factor.0"), (1, 0, "precond.factor.0")]


def test_loading_a_nan_factor_resets_that_block_with_a_warning() -> None:
    opt, params = _trained()
    state = opt.state_dict()
    state["state"][0]["block_0.precond.factor.0"].view(-1)[0] = nan
    fresh = Shampoo(params, lr=0.01, precondition_frequency=2, epsilon=1e-6)
    with pytest.warns(UserWarning, match="factor.0"):
        fresh.load_state_dict(state)
    assert nonfinite_entries(fresh.state_dict()) == []


# ------------------------------------------------------- values written after construction


def test_nonfinite_lr_written_after_construction_never_reaches_the_weights() -> None:
    params = _params()
    opt = Shampoo(params, lr=0.01)
    opt.param_groups[0]["lr"] = inf
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_block_without_gradient_on_refresh_steps_still_refreshes() -> None:
    params = _params()
    opt = Shampoo(params, lr=0.01, precondition_frequency=10, epsilon=1e-6)
    for step in range(1, 61):
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and step % 2 == 0) else torch.randn_like(p)
        opt.step()
    refreshed = {r.param_index: r.last_refresh_step for r in opt.health()}
    assert refreshed[1] > 0
