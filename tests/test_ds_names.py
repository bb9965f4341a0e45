"""Distributed Shampoo's newer argument names: each one is accepted and means what ours mean, or
is refused at construction with a message that names ours."""

from __future__ import annotations

import enum
import io
from typing import Any

import pytest
import torch
from torch import nn

from lightning_shampoo import (
    AdamPreconditionerConfig,
    ClassicMomentumConfig,
    GeneralizedPrimalAveragingConfig,
    ScheduleFreeConfig,
    Shampoo,
    ShampooCallback,
    WeightDecayType,
    configure_shampoo,
)

DS_KEYS = ("weight_decay_type", "iterate_averaging_config", "use_pin_memory", "shampoo_pt2_compile_config")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def _trajectory(**kwargs: Any) -> list[torch.Tensor]:
    model = _model()
    opt = Shampoo(model.parameters(), lr=0.05, grafting_config=AdamPreconditionerConfig(), **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


class ForeignWeightDecayType(enum.Enum):  # stands for Distributed Shampoo's own enum
    L2 = "L2"
    DECOUPLED = "DECOUPLED"


@pytest.mark.parametrize("value", [WeightDecayType.L2, "L2", "l2", ForeignWeightDecayType.L2])
def test_weight_decay_type_l2_is_coupled_decay(value: Any) -> None:
    _same(
        _trajectory(weight_decay=0.1, weight_decay_type=value),
        _trajectory(weight_decay=0.1, use_decoupled_weight_decay=False),
    )
    group = Shampoo(_model().parameters(), weight_decay_type=value).param_groups[0]
    assert group["use_decoupled_weight_decay"] is False and "weight_decay_type" not in group


def test_weight_decay_type_decoupled_and_independent() -> None:
    decoupled = _trajectory(weight_decay=0.1, use_decoupled_weight_decay=True)
    _same(_trajectory(weight_decay=0.1, weight_decay_type=ForeignWeightDecayType.DECOUPLED), decoupled)
    # INDEPENDENT: decoupled decay divided by the peak lr (the constructor's lr, 0.05).
    _same(_trajectory(weight_decay=0.005, weight_decay_type="INDEPENDENT"), decoupled)
    model = _model()
    params = list(model.parameters())
    opt = Shampoo(
        [{"params": params[:2], "lr": 0.5}, {"params": params[2:], "weight_decay": 0.2}],
        lr=0.1,
        weight_decay=0.01,
        weight_decay_type=WeightDecayType.INDEPENDENT,
    )
    # Every group divides its own weight decay by the constructor's lr, as peak_lr there.
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.1, 2.0])
    assert all("peak_lr" not in g for g in opt.param_groups)


def test_weight_decay_type_refusals() -> None:
    with pytest.raises(ValueError, match=r"CORRECTED.*use_decoupled_weight_decay"):
        Shampoo(_model().parameters(), weight_decay=0.1, weight_decay_type="CORRECTED")
    with pytest.raises(ValueError, match=r"weight_decay_type must be one of.*use_decoupled_weight_decay"):
        Shampoo(_model().parameters(), weight_decay_type="L1")
    with pytest.raises(ValueError, match="contradicts use_decoupled_weight_decay=False"):
        Shampoo(_model().parameters(), weight_decay_type="DECOUPLED", use_decoupled_weight_decay=False)


@pytest.mark.parametrize("nesterov", [False, True])
def test_classic_momentum_config_is_our_momentum_options(nesterov: bool) -> None:
    config = ClassicMomentumConfig(momentum=0.5, dampening=0.1, use_nesterov=nesterov)
    _same(
        _trajectory(iterate_averaging_config=config),
        _trajectory(momentum=0.5, dampening=0.1, use_nesterov=nesterov),
    )
    group = Shampoo(_model().parameters(), iterate_averaging_config=config).param_groups[0]
    assert (group["momentum"], group["dampening"], group["use_nesterov"]) == (0.5, 0.1, nesterov)
    assert "iterate_averaging_config" not in group


def test_iterate_averaging_refusals() -> None:
    """GPA and Schedule-Free are supported (tests/test_iterate_averaging.py); they replace
    momentum, so both together are refused."""
    for config in (GeneralizedPrimalAveragingConfig(), ScheduleFreeConfig()):
        group = Shampoo(_model().parameters(), iterate_averaging_config=config).param_groups[0]
        assert group["iterate_averaging_config"] == config and group["train_mode"] is True
        with pytest.raises(ValueError, match=f"{type(config).__name__}.*replaces momentum"):
            Shampoo(_model().parameters(), momentum=0.9, iterate_averaging_config=config)
    with pytest.raises(
        ValueError, match=r"iterate_averaging_config must be None, ClassicMomentumConfig.*momentum"
    ):
        Shampoo(_model().parameters(), iterate_averaging_config=object())
    with pytest.raises(ValueError, match="both set momentum"):
        Shampoo(_model().parameters(), momentum=0.9, iterate_averaging_config=ClassicMomentumConfig())
    with pytest.raises(ValueError, match="momentum must be in"):
        ClassicMomentumConfig(momentum=0.0)


def test_distributed_config_is_refused_naming_ours() -> None:
    with pytest.raises(ValueError, match=r"distributed_config.*Shampoo\.shard.*shampoo_ddp"):
        Shampoo(_model().parameters(), distributed_config=object())


def test_accepted_without_effect() -> None:
    # shampoo_pt2_compile_config now takes effect (tests/test_compile.py): it is no longer here.
    _same(_trajectory(use_pin_memory=True), _trajectory())
    with pytest.raises(ValueError, match="use_pin_memory must be a bool"):
        Shampoo(_model().parameters(), use_pin_memory="yes")


def test_distributed_shampoo_keys_in_a_param_group() -> None:
    model = _model()
    params = list(model.parameters())
    opt = Shampoo(
        [
            {"params": params[:2], "weight_decay_type": WeightDecayType.L2, "use_pin_memory": True},
            {"params": params[2:], "iterate_averaging_config": ClassicMomentumConfig(momentum=0.8)},
        ],
        weight_decay=0.1,
    )
    first, second = opt.param_groups
    assert first["use_decoupled_weight_decay"] is False and second["use_decoupled_weight_decay"] is True
    assert (first["momentum"], second["momentum"]) == (0.0, 0.8)
    assert not any(key in group for group in opt.param_groups for key in DS_KEYS)


def test_checkpoint_holds_no_distributed_shampoo_objects() -> None:
    model = _model()
    opt = Shampoo(
        model.parameters(),
        weight_decay=0.1,
        weight_decay_type=WeightDecayType.L2,
        iterate_averaging_config=ClassicMomentumConfig(momentum=0.5),
    )
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["param_groups"][0]["momentum"] == 0.5
    assert not any(key in group for group in loaded["param_groups"] for key in DS_KEYS)


def test_presets_and_drop_in_take_the_names_their_way() -> None:
    opt = configure_shampoo(_model(), "shampoo", weight_decay=0.1, weight_decay_type="L2")
    assert isinstance(opt, Shampoo)
    assert all(g["use_decoupled_weight_decay"] is False for g in opt.param_groups)
    for key, value in (
        ("iterate_averaging_config", ClassicMomentumConfig()),
        ("weight_decay_type", "L2"),
        ("use_torch_momentum", True),
    ):
        with pytest.raises(ValueError, match=f"{key} comes from the wrapped optimizer"):
            ShampooCallback(**{key: value})
