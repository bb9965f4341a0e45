"""``ShampooCallback``: exact translation of torch optimizers, scheduler re-attachment, the
module-without-optimizer path, composition of the helper callbacks and their checkpoints."""

from __future__ import annotations

import math
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_same_parameters, side_by_side
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    PreconditionerHealthMonitor,
    PreconditionFrequencyScheduler,
    RMSpropPreconditionerConfig,
    SGDFallback,
    SGDPreconditionerConfig,
    Shampoo,
    ShampooCallback,
)
from lightning_shampoo._translate import translate_optimizer, translate_output
from lightning_shampoo.configure import resolve_preset
from lightning_shampoo.schedules import LogFrequency

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*log_every_n_steps")

OFF = math.inf  # start_preconditioning_step that keeps Shampoo on its grafting direction


def two_groups(model: nn.Module, **second: Any) -> list[dict[str, Any]]:
    """Weights with the optimizer's defaults; biases with ``second`` (their own lr / decay)."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if not n.endswith("bias")]},
        {"params": [p for n, p in named if n.endswith("bias")], **second},
    ]


# --------------------------------------------------------------- translation, optimizer level

SOURCES: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "AdamW": lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    "Adam-L2": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.05),
    "Adam-decoupled": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
    "SGD": lambda g: torch.optim.SGD(g, lr=3e-2),
    "SGD-momentum-dampening": lambda g: torch.optim.SGD(
        g, lr=3e-2, momentum=0.9, dampening=0.3, weight_decay=0.01
    ),
    "SGD-nesterov": lambda g: torch.optim.SGD(g, lr=3e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
    "RMSprop": lambda g: torch.optim.RMSprop(g, lr=1e-3),
    "RMSprop-momentum": lambda g: torch.optim.RMSprop(
        g, lr=1e-3, alpha=0.9, eps=1e-6, momentum=0.5, weight_decay=0.01
    ),
    "Adagrad": lambda g: torch.optim.Adagrad(g, lr=3e-2, eps=1e-8, weight_decay=0.01),
}


@pytest.mark.parametrize("name", SOURCES)
def test_translation_reproduces_the_source_optimizer(name: str) -> None:
    make = SOURCES[name]

    def ours(model: nn.Module) -> torch.optim.Optimizer:
        source = make(two_groups(model, lr=5e-3, weight_decay=0.0))
        return translate_optimizer(source, {"start_preconditioning_step": OFF, "precondition_frequency": 2})

    def reference(model: nn.Module) -> torch.optim.Optimizer:
        return make(two_groups(model, lr=5e-3, weight_decay=0.0))

    a, b = side_by_side(ours, reference, steps=15)
    assert_same_parameters(a, b)


def test_translated_groups() -> None:
    model = nn.Linear(3, 2)
    names = {id(model.weight): "w", id(model.bias): "b"}
    adam = translate_optimizer(
        torch.optim.Adam(two_groups(model, lr=1e-4), lr=1e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1),
        {"max_preconditioner_dim": 64},
        names,
        default_factor_beta=0.5,
    )
    g0, g1 = adam.param_groups
    assert g0["param_names"] == ["w"] and g1["param_names"] == ["b"]
    assert (g0["lr"], g1["lr"], g0["weight_decay"], g0["max_preconditioner_dim"]) == (1e-3, 1e-4, 0.1, 64)
    assert g0["betas"] == (0.8, 0.95)  # factor β defaults to the source's second-moment β
    assert g0["grafting_config"] == AdamPreconditionerConfig(beta2=0.95, epsilon=1e-7)
    assert g0["use_decoupled_weight_decay"] is False  # Adam's decay is L2
    sgd = translate_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), {}, default_factor_beta=0.5
    )
    group = sgd.param_groups[0]
    assert group["betas"] == (0.0, 0.5) and group["momentum"] == 0.9
    assert group["grafting_config"] == SGDPreconditionerConfig()
    rms = translate_optimizer(torch.optim.RMSprop(model.parameters(), alpha=0.9), {}, factor_beta=0.7)
    assert rms.param_groups[0]["grafting_config"] == RMSpropPreconditionerConfig(beta2=0.9, epsilon=1e-8)
    assert rms.param_groups[0]["betas"] == (0.0, 0.7)
    ada = translate_optimizer(torch.optim.Adagrad(model.parameters()), {})
    assert ada.param_groups[0]["grafting_config"] == AdaGradPreconditionerConfig(epsilon=1e-10)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda p: torch.optim.NAdam(p), "torch.optim.nadam.NAdam"),
        (lambda p: torch.optim.Adam(p, amsgrad=True), "amsgrad=True"),
        (lambda p: torch.optim.AdamW(p, maximize=True), "maximize=True"),
        (lambda p: torch.optim.RMSprop(p, centered=True), "centered=True"),
        (lambda p: torch.optim.Adagrad(p, lr_decay=0.1), "lr_decay=0.1"),
        (lambda p: torch.optim.Adagrad(p, initial_accumulator_value=0.1), "initial_accumulator_value=0.1"),
    ],
)
def test_untranslatable_optimizers_are_named(make: Callable, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        translate_optimizer(make(nn.Linear(2, 2).parameters()), {})


# ------------------------------------------------------------------------- LR schedulers

Twin = Callable[[torch.optim.Optimizer], Any]

SCHEDULERS: dict[str, tuple[str, Twin]] = {
    "LambdaLR-warmup": (
        "adamw",
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 4)),
    ),
    "StepLR": ("sgd", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    "OneCycleLR-adam": (
        "adamw",
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.1, 0.05], total_steps=12),
    ),
    "OneCycleLR-sgd": ("sgd", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=12)),
    "CyclicLR-sgd": ("sgd", lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-3, 1e-1, step_size_up=3)),
    "SequentialLR": (
        "adamw",
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, 8),
            ],
            milestones=[3],
        ),
    ),
    "ChainedScheduler": (
        "sgd",
        lambda o: torch.optim.lr_scheduler.ChainedScheduler(
            [torch.optim.lr_scheduler.ExponentialLR(o, 0.9), torch.optim.lr_scheduler.StepLR(o, 4, 0.5)]
        ),
    ),
    "CosineAnnealingWarmRestarts": (
        "adamw",
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 4),
    ),
    "ReduceLROnPlateau": (
        "sgd",
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
    ),
}


def _source(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    groups = two_groups(model, lr=5e-3)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=1e-2)
    return torch.optim.SGD(groups, lr=1e-2, momentum=0.9)


def _trajectory(kind: str, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int = 12) -> list[tuple]:
    """lr and the source's momentum (Adam's β₁ / SGD's momentum, which cycling schedulers
    drive) of every group after each scheduler step."""
    out = []
    for i in range(steps):
        optimizer.step()  # no gradients: moves nothing, but counts as a step for the scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)
        else:
            scheduler.step()
        out.append(
            tuple(
                (float(g["lr"]), float(g["betas"][0] if kind == "adamw" else g["momentum"]))
                for g in optimizer.param_groups
            )
        )
        if i == 0:
            out.append(tuple(float(lr) for lr in scheduler.get_last_lr()))
    return out


@pytest.mark.parametrize("name", SCHEDULERS)
def test_rebound_schedulers_produce_the_same_values(name: str) -> None:
    kind, make = SCHEDULERS[name]
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    original = _source(kind, model)
    expected = _trajectory(kind, original, make(original))

    twin = _source(kind, model)
    translated = translate_output(
        {"optimizer": twin, "lr_scheduler": make(twin)}, lambda o: translate_optimizer(o, {})
    )
    shampoo, scheduler = translated["optimizer"], translated["lr_scheduler"]
    assert isinstance(shampoo, Shampoo) and scheduler.optimizer is shampoo
    for inner in getattr(scheduler, "_schedulers", []):
        assert inner.optimizer is shampoo
    assert [g.get("initial_lr") for g in shampoo.param_groups] == [
        g.get("initial_lr") for g in twin.param_groups
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        assert _trajectory(kind, shampoo, scheduler) == expected


def test_every_configure_optimizers_form_is_rebuilt() -> None:
    model = nn.Linear(3, 2)

    def fresh() -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.StepLR(opt, 2)

    def translate(o: torch.optim.Optimizer) -> Shampoo:
        return translate_optimizer(o, {})

    o, _ = fresh()
    assert isinstance(translate_output(o, translate), Shampoo)
    o, s = fresh()
    opts, scheds = translate_output(([o], [s]), translate)
    assert isinstance(opts[0], Shampoo) and scheds[0] is s and s.optimizer is opts[0]
    o, s = fresh()
    out = translate_output(
        {"optimizer": o, "lr_scheduler": {"scheduler": s, "interval": "step", "monitor": "x"}}, translate
    )
    assert (
        out["lr_scheduler"]["monitor"] == "x"
        and out["lr_scheduler"]["scheduler"].optimizer is out["optimizer"]
    )
    (o1, s1), (o2, _) = fresh(), fresh()
    out = translate_output([{"optimizer": o1, "lr_scheduler": s1}, {"optimizer": o2}], translate)
    assert [type(d["optimizer"]) for d in out] == [Shampoo, Shampoo] and s1.optimizer is out[0]["optimizer"]
    o, _ = fresh()
    same = translate_output((o, o), translate)  # one optimizer, translated once
    assert same[0] is same[1]
    keep = Shampoo(model.parameters())
    assert translate_output([keep], translate)[0] is keep
    assert translate_output(None, translate) is None


# ------------------------------------------------------------------ the drop-in, with Lightning


class Net(pl.LightningModule):
    """No ``configure_optimizers``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.fc2(torch.tanh(self.fc1(x))), y)


class WithOptimizer(Net):
    """A module whose own ``configure_optimizers`` returns ``make_optimizers(self)``."""

    def __init__(self, make_optimizers: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self._make = make_optimizers

    def configure_optimizers(self):
        return self._make(self)


def adamw_warmup(model: nn.Module) -> Any:
    optimizer = torch.optim.AdamW(two_groups(model, lr=5e-3, weight_decay=0.0), lr=1e-2, weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def sgd_momentum_steps(model: nn.Module) -> Any:
    optimizer = torch.optim.SGD(
        two_groups(model, lr=2e-2, weight_decay=0.0), lr=5e-2, momentum=0.9, weight_decay=1e-3
    )
    return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)]


def data(samples: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(samples, 6, generator=g), torch.randn(samples, 3, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(model: pl.LightningModule, callbacks: list, steps: int = 12, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, data())
    return trainer


def quiet(**kwargs: Any) -> ShampooCallback:
    kwargs.setdefault("health_monitor", PreconditionerHealthMonitor(print_table=False))
    return ShampooCallback(**kwargs)


@pytest.mark.parametrize(
    "make", [adamw_warmup, sgd_momentum_steps], ids=["AdamW+LambdaLR", "SGD-momentum+StepLR"]
)
def test_drop_in_without_preconditioning_reproduces_the_run(make: Callable) -> None:
    reference = WithOptimizer(make)
    plain = fit(reference, [])
    ours = WithOptimizer(make)
    callback = quiet(start_preconditioning_step=OFF)
    trainer = fit(ours, [callback])
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, Shampoo) and callback.optimizers == [optimizer]
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert [g["param_names"] for g in optimizer.param_groups] == [
        ["fc1.weight", "fc2.weight"],
        ["fc1.bias", "fc2.bias"],
    ]
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in plain.optimizers[0].param_groups]
    for group in optimizer.param_groups:
        assert group["step"] == 12
    assert_same_parameters(ours, reference)
    assert "configure_optimizers" not in ours.__dict__  # the module is handed back unchanged


def test_drop_in_with_preconditioning_changes_the_run() -> None:
    reference = WithOptimizer(adamw_warmup)
    fit(reference, [])
    ours = WithOptimizer(adamw_warmup)
    trainer = fit(ours, [quiet(precondition_frequency=2)])
    assert trainer.optimizers[0].param_groups[0]["start_preconditioning_step"] == 2
    assert not torch.allclose(ours.fc1.weight, reference.fc1.weight, atol=1e-4)
    assert all(torch.isfinite(p).all() for p in ours.parameters())


@pytest.mark.parametrize("preconditioner", ["shampoo", "eigen", "kl_shampoo", "soap", "psgd_kron", "adam"])
def test_every_preset_works_as_drop_in(preconditioner: str) -> None:
    model = WithOptimizer(adamw_warmup)
    before = [p.detach().clone() for p in model.parameters()]
    callback = ShampooCallback(
        preconditioner,
        precondition_frequency=2,
        beta2=0.99,
        health_monitor=False,
        beta3=0.95,
        use_bucketing=False,
    )
    trainer = fit(model, [callback], steps=4)
    optimizer = trainer.optimizers[0]
    expected = type(resolve_preset(preconditioner).config)
    for group in optimizer.param_groups:
        assert type(group["preconditioner_config"]) is expected
        assert group["betas"] == (0.9, 0.99) and group["beta3"] == 0.95
        assert group["grafting_config"] == AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
        assert group["start_preconditioning_step"] == 2
    assert optimizer._use_bucketing is False
    records = optimizer.health()
    vectors = [h for h in records if h.param_name.endswith("bias")]
    matrices = [h for h in records if h.param_name.endswith("weight")]
    assert matrices and vectors and len(matrices) + len(vectors) == len(records)
    # Biases take the wrapped AdamW's own update (its Adam, no grafting); weights the preset.
    assert {h.preconditioner for h in vectors} == {"adam"}
    bias_buckets = [p for p in optimizer.buckets if p.members[0].param.name.endswith("bias")]
    assert bias_buckets and all(p.graft is None for p in bias_buckets)
    if preconditioner != "adam":
        assert "adam" not in {h.preconditioner for h in matrices}
    if any(p.kernel.amortized for p in optimizer.buckets):
        assert all(h.last_refresh_step >= 2 for h in matrices)
    for p, p0 in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, p0)


def test_module_without_configure_optimizers_gets_configure_shampoo() -> None:
    model = Net()
    callback = quiet(preconditioner="soap", precondition_frequency=3)
    trainer = fit(model, [callback], steps=4)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, Shampoo) and callback.optimizers == [optimizer]
    groups = {g["name"]: g["param_names"] for g in optimizer.param_groups}
    assert groups == {"soap": ["fc1.weight", "fc2.weight"], "adam_no_decay": ["fc1.bias", "fc2.bias"]}
    assert optimizer.param_groups[-1]["start_preconditioning_step"] == 3  # -1 resolved to the frequency
    assert "configure_optimizers" not in model.__dict__


def test_a_module_returning_shampoo_is_left_alone() -> None:
    created: list[Shampoo] = []

    def make(model: nn.Module) -> Shampoo:
        created.append(Shampoo(model.parameters(), lr=1e-3, precondition_frequency=5))
        return created[-1]

    trainer = fit(WithOptimizer(make), [quiet()], steps=2)
    assert (
        trainer.optimizers[0] is created[0]
        and trainer.optimizers[0].param_groups[0]["precondition_frequency"] == 5
    )


def test_untranslatable_optimizer_fails_fit_with_its_name() -> None:
    model = WithOptimizer(lambda m: torch.optim.NAdam(m.parameters()))
    with pytest.raises(ValueError, match="NAdam"):
        fit(model, [quiet()], steps=1)


def test_constructor_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="muon"):
        ShampooCallback("muon")
    with pytest.raises(ValueError, match="preconditioner"):
        ShampooCallback("shampo")
    with pytest.raises(ValueError, match="lr comes from the wrapped optimizer"):
        ShampooCallback(lr=1e-3)
    with pytest.raises(ValueError, match="unknown argument 'learning_rate'"):
        ShampooCallback(learning_rate=1e-3)
    with pytest.raises(ValueError, match="precondition_frequency"):
        ShampooCallback(precondition_frequency=0)
    with pytest.raises(ValueError, match="epsilon"):
        ShampooCallback(epsilon=-1.0)
    with pytest.raises(ValueError, match="beta2"):
        ShampooCallback(beta2=1.5)
    with pytest.raises(ValueError, match="health_monitor"):
        ShampooCallback(health_monitor="yes")


# --------------------------------------------------------------------------- composition


def test_helper_callbacks_are_added_before_checkpointing(tmp_path: Path) -> None:
    callback = quiet(precondition_frequency=8)
    trainer = fit(
        WithOptimizer(adamw_warmup), [callback], steps=2, default_root_dir=tmp_path, enable_checkpointing=True
    )
    kinds = [type(c) for c in trainer.callbacks]
    at = kinds.index(ShampooCallback)
    assert kinds[at + 1 : at + 4] == [
        PreconditionFrequencyScheduler,
        SGDFallback,
        PreconditionerHealthMonitor,
    ]
    assert kinds.index(ModelCheckpoint) > at + 3
    assert callback.frequency_scheduler is not None
    assert callback.frequency_scheduler.schedule == LogFrequency(min_frequency=2, max_frequency=8)
    assert callback.callbacks == trainer.callbacks[at + 1 : at + 4]


def test_helper_callbacks_can_be_switched_off_or_replaced() -> None:
    mine = PreconditionFrequencyScheduler(3)
    callback = ShampooCallback(frequency_scheduler=mine, health_monitor=False, fallback=None)
    trainer = fit(WithOptimizer(adamw_warmup), [callback], steps=2)
    added = [c for c in trainer.callbacks if not isinstance(c, ShampooCallback)]
    assert added == [mine] and trainer.optimizers[0].param_groups[0]["precondition_frequency"] == 3
    own = SGDFallback(retry_after=7)
    callback = ShampooCallback(frequency_scheduler=5, health_monitor=False)
    trainer = fit(WithOptimizer(adamw_warmup), [own, callback], steps=2)
    fallbacks = [c for c in trainer.callbacks if isinstance(c, SGDFallback)]
    assert fallbacks == [own]  # the trainer's own one is used, not a second one
    assert trainer.optimizers[0].param_groups[0]["precondition_frequency"] == 5


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_checkpoint_holds_the_helpers_state_and_resumes_exactly(tmp_path: Path) -> None:
    def run(steps: int, **kwargs: Any) -> tuple[WithOptimizer, ShampooCallback, pl.Trainer]:
        model = WithOptimizer(adamw_warmup)
        callback = quiet(precondition_frequency=2, fallback=SGDFallback(check_every_n_steps=2))
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            callbacks=[callback, checkpoint],
        )
        # 6 batches per epoch: Lightning resumes exactly only from an epoch boundary (it restarts a
        # non-stateful dataloader), so checkpoint where the 6th step ends the first epoch
        trainer.fit(model, data(48), **kwargs)
        return model, callback, trainer

    whole, whole_callback, _ = run(12)
    path = tmp_path / "epoch=0-step=6.ckpt"
    saved = torch.load(path, weights_only=True)
    states = saved["callbacks"]
    for component in (PreconditionFrequencyScheduler, SGDFallback, PreconditionerHealthMonitor):
        assert component.__qualname__ in states
    assert states["PreconditionFrequencyScheduler"]["refreshes"] > 0

    resumed, resumed_callback, trainer = run(12, ckpt_path=str(path))
    assert trainer.global_step == 12
    assert_same_parameters(resumed, whole)
    assert isinstance(resumed_callback.frequency_scheduler, PreconditionFrequencyScheduler)
    assert isinstance(whole_callback.frequency_scheduler, PreconditionFrequencyScheduler)
    assert (
        resumed_callback.frequency_scheduler.state_dict() == whole_callback.frequency_scheduler.state_dict()
    )
    assert resumed_callback.fallback is not None and whole_callback.fallback is not None
    assert resumed_callback.fallback.state_dict() == whole_callback.fallback.state_dict()


# ---------------------------------------------------------------------- distributed hand-off


def test_distributed_hand_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Shampoo, Any]] = []
    fake = types.ModuleType("lightning_shampoo.distributed")
    fake.shard_optimizer = lambda optimizer, strategy: calls.append((optimizer, strategy))
    monkeypatch.setitem(sys.modules, "lightning_shampoo.distributed", fake)
    shampoo, sharded = Shampoo(nn.Linear(2, 2).parameters()), Shampoo(nn.Linear(2, 2).parameters())
    sharded.sharded = True
    strategy = DDPStrategy()
    callback = ShampooCallback(health_monitor=False, fallback=False, frequency_scheduler=False)

    def trainer(world_size: int, strategy: Any) -> Any:
        return types.SimpleNamespace(world_size=world_size, strategy=strategy, optimizers=[shampoo, sharded])

    callback.on_fit_start(trainer(1, strategy), None)
    callback.on_fit_start(trainer(2, object()), None)
    assert calls == []
    callback.on_fit_start(trainer(2, strategy), None)
    assert calls == [(shampoo, strategy)]
    del fake.shard_optimizer  # not there yet: nothing happens
    callback.on_fit_start(trainer(2, strategy), None)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("preconditioner", "factor_beta"), [("shampoo", 0.95), ("soap", 0.95), ("adam", 0.99)]
)
def test_default_beta2_is_the_presets_factor_beta_and_the_sources_for_adam(
    preconditioner: str, factor_beta: float
) -> None:
    """Kronecker factors get the preset's EMA β (the convergence suite's recipe), not AdamW's β₂;
    for the diagonal Adam preset ``betas[1]`` is Adam's second moment, so it stays AdamW's."""
    model = WithOptimizer(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.99)))
    trainer = fit(model, [quiet(preconditioner=preconditioner)], steps=1)
    for group in trainer.optimizers[0].param_groups:
        assert group["betas"] == (0.8, factor_beta)
        assert group["grafting_config"] == AdamPreconditionerConfig(beta2=0.99, epsilon=1e-8)


@pytest.mark.parametrize(("preconditioner", "merge"), [("shampoo", True), ("soap", False)])
def test_soap_keeps_dims_unmerged(preconditioner: str, merge: bool) -> None:
    """The SOAP preset does not merge dims (the convergence suite's recipe); Shampoo's does;
    ``use_merge_dims`` passed to the callback overrides either."""
    model = WithOptimizer(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    trainer = fit(model, [quiet(preconditioner=preconditioner)], steps=1)
    assert {g["use_merge_dims"] for g in trainer.optimizers[0].param_groups} == {merge}
    trainer = fit(model, [quiet(preconditioner=preconditioner, use_merge_dims=not merge)], steps=1)
    assert {g["use_merge_dims"] for g in trainer.optimizers[0].param_groups} == {not merge}
