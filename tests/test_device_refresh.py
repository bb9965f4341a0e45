"""On CUDA the presets and the drop-in refresh with matmuls only (coupled Newton, warm-started QR)
unless the caller chose the refresh: ``device_refresh_config`` is pure, so this runs on CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import lightning_shampoo as ls
from lightning_shampoo import configure
from lightning_shampoo.configure import (
    EPSILON_RTOL,
    configure_shampoo,
    device_refresh_config,
    module_device_type,
    resolve_preset,
)


def _config(name: str):
    return resolve_preset(name).config


def test_cpu_and_other_devices_keep_every_preset() -> None:
    for name in ("shampoo", "eigen", "kl_shampoo", "soap", "adam", "muon"):
        config = _config(name)
        for device in ("cpu", "mps", "meta", "xpu"):
            assert device_refresh_config(config, device) is config


def test_cuda_root_inverse_takes_coupled_newton_with_its_damping() -> None:
    out = device_refresh_config(_config("shampoo"), "cuda")
    assert isinstance(out, ls.RootInvShampooPreconditionerConfig)
    assert out.amortized_computation_config == ls.CoupledNewtonConfig()
    damped = configure.with_epsilon_rtol(_config("shampoo"), EPSILON_RTOL)
    newton = device_refresh_config(damped, "cuda").amortized_computation_config
    assert newton == ls.CoupledNewtonConfig(epsilon_rtol=EPSILON_RTOL)


@pytest.mark.parametrize("name", ["eigen", "kl_shampoo", "soap"])
def test_cuda_eigenbases_take_warm_started_qr(name: str) -> None:
    config = _config(name)
    out = device_refresh_config(config, "cuda")
    assert type(out) is type(config)
    qr = out.amortized_computation_config
    assert isinstance(qr, ls.QREigendecompositionConfig) and qr.reference_soap
    assert qr.epsilon_rtol == config.amortized_computation_config.epsilon_rtol
    # Everything but the refresh is kept (SOAP's rotation, KL's config).
    assert out == replace(config, amortized_computation_config=qr)


def test_cuda_keeps_what_newton_or_qr_cannot_serve() -> None:
    pinv = ls.RootInvShampooPreconditionerConfig(
        amortized_computation_config=ls.EigenConfig(pseudo_inverse=True)
    )
    assert device_refresh_config(pinv, "cuda") is pinv
    override = ls.RootInvShampooPreconditionerConfig(inverse_exponent_override={0: 0.3})
    assert device_refresh_config(override, "cuda") is override
    chosen_qr = ls.EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=ls.QREigendecompositionConfig(max_iterations=3)
    )
    assert device_refresh_config(chosen_qr, "cuda") is chosen_qr
    newton = ls.RootInvShampooPreconditionerConfig(amortized_computation_config=ls.CoupledNewtonConfig())
    assert device_refresh_config(newton, "cuda") is newton


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _matrix_config(optimizer: ls.Shampoo):
    return next(g for g in optimizer.param_groups if g["weight_decay"] != 0.0 or "adam" not in g["name"])[
        "preconditioner_config"
    ]


def test_module_device_type() -> None:
    assert module_device_type(_net()) == "cpu"
    assert module_device_type(nn.ReLU()) == "cpu"
    assert module_device_type(nn.Linear(2, 2, device="meta")) == "meta"


def test_configure_shampoo_maps_presets_not_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = configure_shampoo(_net(), "shampoo")
    assert isinstance(_matrix_config(cpu).amortized_computation_config, ls.EigenConfig)
    monkeypatch.setattr(configure, "module_device_type", lambda module: "cuda")
    on_cuda = configure_shampoo(_net(), "shampoo")
    assert isinstance(_matrix_config(on_cuda).amortized_computation_config, ls.CoupledNewtonConfig)
    soap = configure_shampoo(_net(), "soap")
    assert _matrix_config(soap).amortized_computation_config.reference_soap
    chosen = configure_shampoo(_net(), ls.RootInvShampooPreconditionerConfig())
    assert isinstance(_matrix_config(chosen).amortized_computation_config, ls.EigenConfig)
    override = configure_shampoo(_net(), "shampoo", param_groups={"2.*": {"preconditioner": "eigen"}})
    by_name = {g["name"]: g for g in override.param_groups}
    eigen = next(g for n, g in by_name.items() if n.startswith("2.*"))["preconditioner_config"]
    assert isinstance(eigen.amortized_computation_config, ls.QREigendecompositionConfig)
    # The matmul-only recipe steps (here on the CPU) and stays finite.
    model = _net()
    optimizer = configure_shampoo(model, "shampoo", precondition_frequency=2)
    assert isinstance(_matrix_config(optimizer).amortized_computation_config, ls.CoupledNewtonConfig)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.refresh_counts()[0] > 0


def test_drop_in_maps_its_preset_not_a_given_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_shampoo.callbacks import shampoo as dropin

    model = _net()
    names = ("preset", "config")
    callbacks = (ls.ShampooCallback("shampoo"), ls.ShampooCallback(ls.RootInvShampooPreconditionerConfig()))
    monkeypatch.setattr(dropin, "module_device_type", lambda module: "cuda")
    for label, callback in zip(names, callbacks):
        optimizer = callback.translate(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
        amortized = optimizer.param_groups[0]["preconditioner_config"].amortized_computation_config
        if label == "preset":
            assert amortized == ls.CoupledNewtonConfig(epsilon_rtol=EPSILON_RTOL)
        else:
            assert isinstance(amortized, ls.EigenConfig)
        assert optimizer.param_groups[0]["refresh_stagger"] is True
    default = callbacks[0].default_optimizer(_net())
    assert isinstance(default, ls.Shampoo)
    config = _matrix_config(default)
    assert config.amortized_computation_config == ls.CoupledNewtonConfig(epsilon_rtol=EPSILON_RTOL)


def test_presets_stagger_and_raw_shampoo_does_not() -> None:
    assert all(g["refresh_stagger"] for g in configure_shampoo(_net(), "soap").param_groups)
    off = configure_shampoo(_net(), "shampoo", refresh_stagger=False)
    assert not any(g["refresh_stagger"] for g in off.param_groups)
    assert ls.Shampoo(_net().parameters()).param_groups[0]["refresh_stagger"] is False
