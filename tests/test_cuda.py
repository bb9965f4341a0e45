"""CUDA checks (skipped without a GPU; CI has none): every preset computes on the GPU what it
computes on the CPU, plain steps never synchronise with the host, the bucketed path equals the
block loop there too, and the drop-in callback trains a module on ``accelerator="gpu"``."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_batches, small_model
from lightning_helpers import ShampooDigits, cpu_trainer, digits, finite_params
from torch import nn

from lightning_shampoo import (
    PreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    ScheduleFreeConfig,
    Shampoo,
    ShampooCallback,
    configure_shampoo,
)
from lightning_shampoo.configure import PRESET_NAMES, device_refresh_config, resolve_preset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 12
FREQUENCY = 4
SHAPES = [(48, 40), (40, 24), (4, 6, 5), (40,)]  # random gradients: full-rank factors by step 2


@pytest.fixture(autouse=True)
def no_tf32() -> None:
    """Full float32 matmuls and convolutions, so the comparisons measure our code, not TF32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _float64(config: PreconditionerConfig) -> PreconditionerConfig:
    """The config with every storage dtype float64 (the factors default to float32, as in
    Distributed Shampoo: their rounding would swamp a float64 comparison)."""
    wide = {f.name: torch.float64 for f in fields(config) if isinstance(getattr(config, f.name), torch.dtype)}
    return replace(config, **wide)


def _optimizer(
    model: nn.Module, preset: str, wide: bool = False, frequency: int = FREQUENCY, **kwargs: object
) -> Shampoo:
    """The preset without merged dimensions: merged, a 40x24 weight gets one 960x960 factor that
    stays rank-deficient for hundreds of steps, and with the Shampoo presets' epsilon 1e-12 its
    null space magnifies rounding (float32 vs float64 on the CPU alone: 15% after 12 steps).
    Muon needs the merge (its 3-D weight becomes a matrix). ``wide``: the float64 config the
    preset picks on CUDA (its matmul-only refresh, ``device_refresh_config``), passed as an
    object, so the same on either device."""
    merge = preset == "muon"
    config = _float64(device_refresh_config(resolve_preset(preset).config, "cuda")) if wide else preset
    opt = configure_shampoo(
        model, config, lr=1e-2, precondition_frequency=frequency, use_merge_dims=merge, **kwargs
    )
    assert isinstance(opt, Shampoo)
    return opt


class _Params(nn.Module):
    """Bare parameters of :data:`SHAPES` (``configure_shampoo`` takes a module)."""

    def __init__(self, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        draws = [0.1 * torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        self.weights = nn.ParameterList(nn.Parameter(d.to(device, dtype)) for d in draws)


def _feed(model: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS) -> None:
    """Gradients ``G_t + 0.1·p`` with ``G_t`` drawn on the CPU in float64: the optimizer alone is
    compared (a model's forward on the GPU rounds differently from the CPU's, and the small
    factors of an early Shampoo step amplify any such difference)."""
    g = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    for _ in range(steps):
        for p in params:
            draw = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
            p.grad = draw + 0.1 * p.detach()
        opt.step()


def _relative(ours: nn.Module, reference: nn.Module) -> float:
    num = den = 0.0
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
        num += float((a64 - b64).square().sum())
        den += float(b64.square().sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_cuda_matches_cpu(preset: str) -> None:
    reference, initial = _Params(torch.float64, "cpu"), _Params(torch.float64, "cpu")
    _feed(reference, _optimizer(reference, preset, wide=True))
    assert _relative(reference, initial) > 1e-2  # it trained
    ours64 = _Params(torch.float64, "cuda")  # the same function up to float64 rounding
    _feed(ours64, _optimizer(ours64, preset, wide=True))
    assert _relative(ours64, reference) < 1e-9
    ours32 = _Params(torch.float32, "cuda")  # as users run it: float32 factors
    opt = _optimizer(ours32, preset)
    _feed(ours32, opt)
    assert _relative(ours32, reference) < 1e-4
    assert _state_devices(opt) == {"cuda"}


def _state_devices(opt: torch.optim.Optimizer) -> set[str]:
    def walk(value: object) -> set[str]:
        if isinstance(value, dict):
            return set().union(*(walk(v) for v in value.values()))
        return {value.device.type} if torch.is_tensor(value) else set()

    return walk(dict(opt.state))


@pytest.mark.parametrize("stagger", [False, True], ids=["all_at_once", "staggered"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_plain_steps_never_synchronise(preset: str, stagger: bool) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any blocking host sync in a step.
    Staggered, a step is plain when no block's phase is due (a long interval leaves some)."""
    model = small_model().cuda()
    frequency = 4 * FREQUENCY if stagger else FREQUENCY
    opt = _optimizer(model, preset, frequency=frequency, refresh_stagger=stagger)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(3 * frequency)]
    due = {0} | {phase for g in range(len(opt.param_groups)) for phase in opt.refresh_phases(g).values()}
    assert len(due) < frequency  # some plain steps are left to check

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    for x, y in batches[:frequency]:  # first refreshes, lazy state
        step(x, y)
    torch.cuda.synchronize()
    for i, (x, y) in enumerate(batches[frequency:], start=frequency + 1):
        if i % frequency in due:
            step(x, y)  # refresh step: eigh/solvers may check their status on the host
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_bucketed_equals_block_loop_on_cuda() -> None:
    """On the GPU batched and single matmuls round differently (on the CPU they agree bitwise).
    The 1-D parameter's 16x16 blocks get rank-1 updates, so they stay rank-deficient; with the
    default epsilon (1e-12) a 1e-15 change of the gradients moves it by ~50% on the CPU alone,
    with 1e-4 by ~1e-11: the comparison uses 1e-4."""
    config = _float64(RootInvShampooPreconditionerConfig())
    kwargs = dict(lr=1e-2, epsilon=1e-4, max_preconditioner_dim=16, precondition_frequency=2)
    kwargs["preconditioner_config"] = config
    bucketed, looped = _Params(torch.float64, "cuda"), _Params(torch.float64, "cuda")
    for model, bucketing in ((bucketed, True), (looped, False)):
        _feed(model, Shampoo(model.parameters(), use_bucketing=bucketing, **kwargs))
    assert _relative(bucketed, looped) < 1e-9


class _StateDevices(pl.Callback):
    """The devices of the optimizer's state tensors while training (teardown moves them back)."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.devices |= _state_devices(trainer.optimizers[0])


def test_callback_trains_on_gpu(tmp_path: Path) -> None:
    module = ShampooDigits()
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=3e-3)  # type: ignore[method-assign]
    devices = _StateDevices()
    trainer = cpu_trainer(tmp_path, accelerator="gpu", max_steps=30, callbacks=[ShampooCallback(), devices])
    trainer.fit(module, datamodule=digits())
    opt = trainer.optimizers[0]
    assert isinstance(opt, Shampoo)
    assert finite_params(module)
    assert any(r.last_refresh_step > 0 for r in opt.health())
    assert devices.devices == {"cuda"}


def test_schedule_free_on_cuda_matches_cpu_without_syncs() -> None:
    """Iterate averaging on the GPU: the same trajectory as the CPU in float64 (a tensor lr,
    weight decay), no host sync on plain steps, and eval()/train() round-tripping bitwise."""

    def run(device: str, lr: float | torch.Tensor, check_syncs: bool = False) -> tuple[_Params, Shampoo]:
        model = _Params(torch.float64, device)
        opt = configure_shampoo(
            model,
            "shampoo",
            lr=lr,
            weight_decay=0.01,
            precondition_frequency=FREQUENCY,
            iterate_averaging_config=ScheduleFreeConfig(),
        )
        assert isinstance(opt, Shampoo)
        g = torch.Generator().manual_seed(1)
        for step in range(1, STEPS + 1):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device) + 0.1 * p.detach()
            if check_syncs and step > FREQUENCY and step % FREQUENCY:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return model, opt

    reference, _ = run("cpu", 3e-3)
    ours, opt = run("cuda", torch.tensor(3e-3, dtype=torch.float64, device="cuda"), check_syncs=True)
    assert _relative(ours, reference) < 1e-9
    before = [p.detach().clone() for p in ours.parameters()]
    opt.eval()
    assert any(not torch.equal(p, b) for p, b in zip(ours.parameters(), before))
    opt.train()
    assert all(torch.equal(p, b) for p, b in zip(ours.parameters(), before))


def _draws(params: list[nn.Parameter], g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype) for p in params]


def _opt_states(opt: Shampoo) -> dict[str, torch.Tensor]:
    return {
        f"{key}.{name}": tensor
        for key, entries in opt.state_dict()["state"].items()
        for name, tensor in entries.items()
    }


def test_plain_step_replays_as_a_cuda_graph() -> None:
    """The plain step is capturable: its buffers are static, it allocates nothing it keeps and
    never synchronises (capture would fail). Captured once, then replayed with new gradients
    copied into the same ``.grad`` tensors and a learning rate changed in its CUDA tensor, it
    matches the eager optimizer step for step. (A replay runs no host code: the group's host
    step count stays at the capture's; the blocks' own step counts, on the device, advance.)"""
    graphed, eager = _Params(torch.float32, "cuda"), _Params(torch.float32, "cuda")
    rates = {id(m): torch.tensor(1e-2, device="cuda") for m in (graphed, eager)}
    opts = {
        id(m): Shampoo(m.parameters(), lr=rates[id(m)], precondition_frequency=FREQUENCY, momentum=0.5)
        for m in (graphed, eager)
    }
    g = torch.Generator().manual_seed(1)
    models = (graphed, eager)

    def feed(draws: list[torch.Tensor], model: nn.Module) -> None:
        for p, d in zip(model.parameters(), draws):
            if p.grad is None:
                p.grad = d.clone()
            else:
                p.grad.copy_(d)  # static gradient tensors: the graph reads these

    for _ in range(FREQUENCY + 1):  # refreshes, then one plain step (it fills the caches)
        draws = _draws(list(graphed.parameters()), g)
        for model in models:
            feed(draws, model)
            opts[id(model)].step()
    for opt in opts.values():  # every later step is a plain step
        opt.param_groups[0]["precondition_frequency"] = 10**9
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        draws = _draws(list(graphed.parameters()), g)
        for model in models:
            feed(draws, model)
            opts[id(model)].step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[id(graphed)].step()
    for step in range(6):
        draws = _draws(list(graphed.parameters()), g)
        feed(draws, graphed)
        feed(draws, eager)
        if step == 3:
            for rate in rates.values():
                rate.fill_(3e-3)
        graph.replay()
        opts[id(eager)].step()
    torch.cuda.synchronize()
    for a, b in zip(graphed.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ours, reference = _opt_states(opts[id(graphed)]), _opt_states(opts[id(eager)])
    for key, value in ours.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-7, equal_nan=True, msg=key)


@pytest.mark.slow
def test_compiled_plain_steps_match_eager_and_never_synchronise() -> None:
    """``shampoo_pt2_compile_config`` with inductor on the GPU: plain steps run compiled, agree
    with eager within rounding and never synchronise with the host."""
    pytest.importorskip("triton")
    from lightning_shampoo import ShampooPT2CompileConfig

    results = []
    for config in (ShampooPT2CompileConfig(backend="inductor"), None):
        model = _Params(torch.float32, "cuda")
        opt = Shampoo(
            model.parameters(), lr=1e-2, precondition_frequency=FREQUENCY, shampoo_pt2_compile_config=config
        )
        g = torch.Generator().manual_seed(1)
        for step in range(1, 3 * FREQUENCY + 1):
            for p, d in zip(model.parameters(), _draws(list(model.parameters()), g)):
                p.grad = d
            plain = step % FREQUENCY != 0 and step > FREQUENCY + 2  # past both phases' warm-up and compile
            if plain:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        results.append((model, opt))
    (compiled, opt), (eager, _) = results
    assert opt.compiled_steps > 0
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
