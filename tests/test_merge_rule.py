"""The lean block rules of the presets and the drop-in (issue 12): merge down to matrices only, and
no Kronecker factor along a dim whose factor would dwarf its block (``factoring.py``)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lightning_shampoo import (
    EigenvalueCorrectedShampooPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
    ShampooCallback,
    configure_shampoo,
)
from lightning_shampoo.configure import FACTOR_RATIO, SOAP_FACTOR_RATIO
from lightning_shampoo.factoring import unfactored_dims, with_unfactored_dims


def _layouts(optimizer: Shampoo) -> dict[str, tuple[int, ...]]:
    return {layout.name: layout.processed_shape for g in optimizer.plan.groups for layout in g.layouts}


def _factor_dims(optimizer: Shampoo) -> dict[str, set[tuple[tuple[int, ...], tuple[int, ...]]]]:
    out: dict[str, set] = {}
    for bucket in optimizer.buckets:
        for member in bucket.members:
            out.setdefault(member.param.name, set()).add((bucket.block_shape, bucket.kernel.factor_dims))
    return out


@pytest.mark.parametrize(
    ("shape", "max_dim", "ratio", "expected"),
    [
        ((1024, 128), math.inf, 4.0, (0,)),  # vocabulary side of an embedding block: 8x its block
        ((128, 1024), math.inf, 4.0, (1,)),  # an output head's
        ((16, 64), math.inf, 4.0, ()),  # 64² = 4·(16·64): not over the ratio
        ((32, 144), math.inf, 4.0, (1,)),  # a merged [32, 16, 3, 3] conv kernel
        ((512, 128), math.inf, 4.0, ()),
        ((1024, 128), 512, math.inf, (0,)),  # the absolute threshold
        ((1024, 1024), 512, math.inf, (1,)),  # every dim over it: the smallest (last) keeps its factor
        ((2000, 3, 4), math.inf, 4.0, (0,)),
        ((4096,), 16, 1.0, ()),  # vectors are the grafting config's business
        ((1024, 128), math.inf, math.inf, ()),  # Distributed Shampoo's rule: every dim
    ],
)
def test_unfactored_dims(shape, max_dim, ratio, expected):
    assert unfactored_dims(shape, max_dim, ratio) == expected


def test_config_rewrites_add_dims():
    shampoo = RootInvShampooPreconditionerConfig(diagonal_dims={2: [1], 3: [2]})
    assert with_unfactored_dims(shampoo, (1024, 128), (0,)).diagonal_dims == {2: (0, 1), 3: (2,)}
    soap = EigenvalueCorrectedShampooPreconditionerConfig(ignored_basis_change_dims={2: [1]})
    assert with_unfactored_dims(soap, (10, 10), (0,)).ignored_basis_change_dims[2] == (0, 1)
    assert with_unfactored_dims(shampoo, (4, 4), ()) is shampoo


class Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Linear(64, 16)  # weight [16, 64]
        self.up = nn.Linear(16, 64)  # weight [64, 16]
        self.conv = nn.Conv2d(16, 32, 3)  # weight [32, 16, 3, 3]


def test_presets_merge_matrices_never_into_vectors():
    model = Autoencoder()
    raw = Shampoo(model.parameters(), max_preconditioner_dim=1024)  # Distributed Shampoo's rule
    assert _layouts(raw)["param0"] == (1024,)
    for preset in ("shampoo", "eigen", "kl_shampoo"):
        opt = configure_shampoo(model, preset)
        shapes = _layouts(opt)
        assert shapes["down.weight"] == (16, 64)
        assert shapes["up.weight"] == (64, 16)
        assert shapes["conv.weight"] == (32, 144), "a conv kernel's trailing dims still merge"
        dims = _factor_dims(opt)
        assert dims["down.weight"] == {((16, 64), (0, 1))}
        assert dims["conv.weight"] == {((32, 144), (0, 1))}, "144 <= 5·32: both factors"
    soap = configure_shampoo(model, "soap")
    assert _layouts(soap)["conv.weight"] == (32, 16, 3, 3)  # SOAP keeps dims unmerged


class WordLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(4096, 128)
        self.hidden = nn.Linear(128, 512)
        self.head = nn.Linear(128, 4096, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens)))[..., :128])


def _step(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 3) -> None:
    for i in range(steps):
        torch.manual_seed(100 + i)
        tokens = torch.randint(0, 4096, (4, 9))
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()


@pytest.mark.parametrize(("preset", "hidden"), [("shampoo", (0, 1)), ("soap", (1,))])
def test_vocabulary_side_gets_no_factor(preset, hidden):
    """Shampoo's ratio is 5, SOAP's 3 (its factors keep a full eigenbasis beside the statistics):
    a [512, 128] block keeps both factors under Shampoo, only the 128 one under SOAP. (Blocks of
    1024 here: the ``shampoo`` preset's own 256 keeps both factors of a [256, 128] block.)"""
    model = WordLM()
    opt = configure_shampoo(model, preset, precondition_frequency=1, max_preconditioner_dim=1024)
    _step(opt, model)
    dims = _factor_dims(opt)
    assert dims["embed.weight"] == {((1024, 128), (1,))}
    assert dims["head.weight"] == {((1024, 128), (1,))}
    assert dims["hidden.weight"] == {((512, 128), hidden)}
    embed_bucket = next(b for b in opt.buckets if b.members[0].param.name == "embed.weight")
    names = set(opt.state[embed_bucket.key]["precond"])
    assert not any(n.startswith(("factor.0", "root.0", "eigenvectors.0")) for n in names), names
    if preset == "shampoo":  # the 1024 side keeps the factor's diagonal
        assert opt.state[embed_bucket.key]["precond"]["diagonal.0"].shape[1:] == (1024,)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_one_sided_shampoo_is_diagonal_dims_by_hand():
    """The rule is ``diagonal_dims`` applied per block shape."""
    results = []
    for options in (
        {"max_factor_ratio": 4.0},
        {"preconditioner_config": RootInvShampooPreconditionerConfig(diagonal_dims={2: [0]})},
    ):
        model = WordLM()
        opt = Shampoo([model.embed.weight], lr=1e-2, betas=(0.9, 0.95), precondition_frequency=1, **options)
        model.hidden.requires_grad_(False)
        model.head.requires_grad_(False)
        _step(opt, model)
        results.append(model.embed.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_diagonal_factor_is_the_full_factors_diagonal():
    """A diagonal dim is preconditioned by ``(diag(L)/(1-β₂ᵗ) + ε)^(-α)``: on a block whose full
    factor along that dim is diagonal (disjoint rows), diagonal and full Shampoo agree."""
    torch.manual_seed(0)
    grads = []
    for _ in range(3):
        g = torch.zeros(8, 4)
        g[torch.randint(0, 8, (1,)).item()] = torch.randn(4)  # one row per step: L₀ stays diagonal
        grads.append(g)
    out = []
    for config in (
        RootInvShampooPreconditionerConfig(),
        RootInvShampooPreconditionerConfig(diagonal_dims={2: [0]}),
    ):
        p = nn.Parameter(torch.zeros(8, 4))
        opt = Shampoo(
            [p],
            lr=1.0,
            betas=(0.0, 0.9),
            epsilon=1e-6,
            precondition_frequency=1,
            preconditioner_config=config,
        )
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_state_bytes_shrink_by_the_factor_memory():
    model = WordLM()
    sizes = {}
    for ratio in (math.inf, 4.0):
        opt = Shampoo([model.embed.weight], betas=(0.9, 0.95), max_factor_ratio=ratio)
        model.embed.weight.grad = torch.randn_like(model.embed.weight)
        opt.step()
        sections = opt.state_bytes_by_section()
        assert sum(sections.values()) == opt.state_bytes()
        sizes[ratio] = sections["precond"]
    # four [1024, 128] blocks trade a packed 1024² factor and its packed root (fp32) for a
    # 1024-long diagonal and its root
    assert sizes[math.inf] - sizes[4.0] == 4 * 2 * (1024 * 1025 // 2 - 1024) * 4
    assert sizes[4.0] == 4 * 2 * (128 * 129 // 2 + 1024) * 4


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_factor_ratio", 0.5), ("max_factor_ratio", "4"), ("max_factor_dim", 0), ("max_factor_dim", 2.5)],
)
def test_rule_options_are_validated(key, value):
    with pytest.raises(ValueError, match=key):
        Shampoo([nn.Parameter(torch.zeros(3, 3))], **{key: value})
    with pytest.raises(ValueError, match=key):
        Shampoo([{"params": [nn.Parameter(torch.zeros(3, 3))], key: value}])


def test_checkpoint_keeps_the_rule_and_refuses_another():
    model = WordLM()
    opt = configure_shampoo(model, "shampoo")
    _step(opt, model, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = configure_shampoo(model, "shampoo")
    again.load_state_dict(saved)
    key = (next(i for i, n in enumerate(opt._names) if n == "embed.weight"), 0)
    assert set(again.block_state(key)) == set(opt.block_state(key))
    other = configure_shampoo(model, "shampoo", max_factor_ratio=math.inf)
    with pytest.raises(ValueError, match="max_factor_ratio"):
        other.load_state_dict(saved)


def test_drop_in_uses_the_lean_rules():
    callback = ShampooCallback()
    assert callback.options["target_parameter_dimensionality"] == 2
    assert callback.options["max_factor_ratio"] == FACTOR_RATIO
    model = WordLM()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = callback.translate(adamw, model)
    # Its 256-wide blocks keep both factors (256² ≤ 5·256·128) ...
    assert _factor_dims(opt)["embed.weight"] == {((256, 128), (0, 1))}
    # ... and at 1024 the vocabulary side gets none.
    wide_callback = ShampooCallback(max_preconditioner_dim=1024)
    wide = wide_callback.translate(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    assert _factor_dims(wide)["embed.weight"] == {((1024, 128), (1,))}
    assert ShampooCallback("soap").options["max_factor_ratio"] == SOAP_FACTOR_RATIO


@pytest.mark.parametrize("dim", [0, 1])
def test_one_sided_soap_rotation_matches_the_mode_product(dim):
    """SOAP with one dim in the original basis rotates with one matmul (into ``out``, or through
    the scratch when ``out`` is the input itself); the same as the generic mode product."""
    from lightning_shampoo.preconditioners.base import Context, apply_along_dims
    from lightning_shampoo.preconditioners.soap import SOAPPreconditioner

    config = EigenvalueCorrectedShampooPreconditionerConfig(ignored_basis_change_dims={2: [dim]})
    kernel = SOAPPreconditioner(config, (6, 5), "test")
    state = kernel.init_state(3, torch.device("cpu"), torch.float32)
    kept = 1 - dim
    q, _ = torch.linalg.qr(torch.randn(3, kernel.block_shape[kept], kernel.block_shape[kept]))
    state[f"eigenvectors.{kept}"].copy_(q)
    ctx = Context.uniform(1, 0.9, 1e-8, True, torch.ones(3))
    x = torch.randn(3, 6, 5)
    for back in (False, True):
        expected = apply_along_dims(x, {kept: q}, transpose=not back)
        out, scratch = torch.empty_like(x), torch.empty_like(x)
        kernel._rotate_into(x, state, ctx, out, scratch, back=back)
        torch.testing.assert_close(out, expected)
        inplace = x.clone()
        kernel._rotate_into(inplace, state, ctx, inplace, scratch, back=back)
        torch.testing.assert_close(inplace, expected)
