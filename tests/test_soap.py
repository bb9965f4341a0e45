"""SOAP (eigenvalue-corrected Shampoo) against Adam and closed forms.

* identity eigenbasis (no refresh ever, or every dim's basis change ignored) ⇒ exactly Adam/AdamW;
* a QR refresh that re-sorts the basis columns permutes the second moment with them, so the
  preconditioned direction of a fixed gradient does not change when the basis is already exact;
* in an exact, known eigenbasis SOAP is diagonal Adam on the singular values.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from helpers import assert_same_parameters, side_by_side
from torch import Tensor, nn

import lightning_shampoo.preconditioners as preconditioners
import lightning_shampoo.preconditioners.amortized as amortized
from lightning_shampoo import (
    EigenvalueCorrectedShampooPreconditionerConfig,
    EighEigendecompositionConfig,
    QREigendecompositionConfig,
    Shampoo,
)
from lightning_shampoo.preconditioners import Context, Preconditioner
from lightning_shampoo.preconditioners.base import apply_along_dims
from lightning_shampoo.preconditioners.soap import SOAPPreconditioner

F64 = torch.float64
SOAP64 = dict(
    factor_matrix_dtype=F64,
    factor_matrix_eigenvectors_dtype=F64,
    corrected_eigenvalues_dtype=F64,
)


def _orthogonal(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _soap(model: nn.Module, config: Any, weight_decay: float, decoupled: bool, **kwargs: Any) -> Shampoo:
    return Shampoo(
        model.parameters(),
        lr=0.01,
        betas=(0.8, 0.95),
        epsilon=1e-6,
        weight_decay=weight_decay,
        use_decoupled_weight_decay=decoupled,
        max_preconditioner_dim=8,
        grafting_config=None,
        preconditioner_config=config,
        **kwargs,
    )


ADAM_CASES = {
    "adam": (0.0, False, torch.optim.Adam),
    "adam_l2": (0.1, False, torch.optim.Adam),
    "adamw": (0.1, True, torch.optim.AdamW),
}


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_identity_basis_is_adam(case: str) -> None:
    """Never refreshed, the basis stays the identity: SOAP is Adam (L2) / AdamW (decoupled)."""
    weight_decay, decoupled, reference = ADAM_CASES[case]
    config = EigenvalueCorrectedShampooPreconditionerConfig()
    ours, ref = side_by_side(
        lambda m: _soap(m, config, weight_decay, decoupled, start_preconditioning_step=math.inf),
        lambda m: reference(m.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay),
    )
    assert_same_parameters(ours, ref)


@pytest.mark.parametrize(
    "amortized_config",
    [EighEigendecompositionConfig(), QREigendecompositionConfig()],
    ids=["eigh", "qr"],
)
@pytest.mark.parametrize("case", ["adam_l2", "adamw"])
def test_all_basis_changes_ignored_is_adam_while_refreshing(case: str, amortized_config: Any) -> None:
    weight_decay, decoupled, reference = ADAM_CASES[case]
    config = EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=amortized_config,
        ignored_basis_change_dims={1: [0], 2: [0, 1], 3: [0, 1, 2]},
    )
    optimizers: list[Shampoo] = []

    def make(m: nn.Module) -> Shampoo:
        optimizers.append(_soap(m, config, weight_decay, decoupled, precondition_frequency=1))
        return optimizers[-1]

    ours, ref = side_by_side(
        make,
        lambda m: reference(m.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay),
    )
    assert_same_parameters(ours, ref)
    # Refreshes did run (every step), on 1-, 2- and 3-D blocks.
    records = optimizers[0].health()
    assert {r.last_refresh_step for r in records} == {20}
    assert {len(r.shape) for r in records} == {1, 2, 3}


# ------------------------------------------------------------------ QR refresh permutes the moment


def _scrambled_state(
    seed: int = 0, rotate: bool = True
) -> tuple[SOAPPreconditioner, dict[str, Tensor], Tensor, list[Tensor]]:
    """A SOAP bucket (2 blocks of 5x4) whose stored bases are exact eigenvectors of its factors in
    scrambled column order, with a nonzero, non-uniform second moment."""
    config = EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=QREigendecompositionConfig(reference_soap=True, sort_eigenvectors=True),
        rotate_corrected_eigenvalues=rotate,
        **SOAP64,
    )
    shape = (5, 4)
    kernel = SOAPPreconditioner(config, shape, "test")
    n = 2
    state = kernel.init_state(n, torch.device("cpu"), F64)
    g = torch.Generator().manual_seed(seed)
    sorted_bases = []
    for i, d in enumerate(shape):
        bases, factors, sorted_ = [], [], []
        for b in range(n):
            q = _orthogonal(d, seed=10 * i + b)
            values = torch.arange(1.0, d + 1, dtype=F64) * (2.0 + b)  # distinct eigenvalues
            factors.append((q * values) @ q.mT)
            perm = torch.randperm(d, generator=g)
            while bool((perm == torch.arange(d)).all()) or bool((perm == torch.arange(d).flip(0)).all()):
                perm = torch.randperm(d, generator=g)
            bases.append(q[:, perm])
            sorted_.append(q.flip(-1))  # columns by descending eigenvalue
        state[f"factor.{i}"] = torch.stack(factors)
        state[f"eigenvectors.{i}"] = torch.stack(bases)
        sorted_bases.append(torch.stack(sorted_))
    state["corrected_eigenvalues"] = torch.rand(n, *shape, generator=g, dtype=F64) + 0.1
    grad = torch.randn(n, *shape, generator=g, dtype=F64)
    return kernel, state, grad, sorted_bases


def _refreshed_direction(
    kernel: SOAPPreconditioner, state: dict[str, Tensor], grad: Tensor
) -> tuple[Tensor, Tensor]:
    ctx = Context.uniform(
        step=7, beta2=1.0, epsilon=1e-8, use_bias_correction=True, live=torch.ones(2, dtype=F64)
    )
    before = kernel.precondition(state, grad, ctx)
    result = kernel.refresh(state, replace(ctx, warm=True), torch.ones(2, dtype=torch.bool))
    assert not bool(result.failed.any())
    return before, kernel.precondition(state, grad, ctx)


@pytest.mark.parametrize("rotate", [True, False])
def test_qr_refresh_sorts_columns_and_permutes_second_moment(rotate: bool) -> None:
    """Both ways of carrying the moment (rotating it, or permuting it like the columns) keep
    the direction of a fixed gradient when the basis only gets re-sorted."""
    kernel, state, grad, sorted_bases = _scrambled_state(rotate=rotate)
    scrambled = [state[f"eigenvectors.{i}"].clone() for i in range(2)]
    before, after = _refreshed_direction(kernel, state, grad)
    for i in range(2):
        vectors = state[f"eigenvectors.{i}"]
        # The columns were reordered (by descending eigenvalue): equal to the sorted basis up to signs.
        assert (vectors - scrambled[i]).abs().amax() > 0.1
        torch.testing.assert_close(vectors.abs(), sorted_bases[i].abs(), rtol=0, atol=1e-10)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)


def test_qr_refresh_without_permuting_the_moment_would_change_the_direction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The property above has teeth: without rotating the moment, dropping the permutation (as
    Distributed Shampoo's QR path does) changes the direction of the same gradient by a lot;
    the rotation needs no permutation (it is the permutation, squared signs and all)."""
    original = amortized.orthogonal_iteration

    def forgetful(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs)._replace(permutation=None)

    monkeypatch.setattr(amortized, "orthogonal_iteration", forgetful)
    kernel, state, grad, _ = _scrambled_state(rotate=False)
    before, after = _refreshed_direction(kernel, state, grad)
    assert (after - before).norm() > 0.1 * before.norm()
    kernel, state, grad, _ = _scrambled_state(rotate=True)
    before, after = _refreshed_direction(kernel, state, grad)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- exact, known eigenbasis


@pytest.mark.parametrize(
    "amortized_config",
    [
        EighEigendecompositionConfig(),
        QREigendecompositionConfig(reference_soap=True),
        # Distributed Shampoo's QR, from the identity on the first refresh: iterated to convergence.
        QREigendecompositionConfig(max_iterations=300),
    ],
    ids=["eigh", "qr-reference", "qr-converged"],
)
def test_known_eigenbasis_soap_is_adam_on_singular_values(amortized_config: Any) -> None:
    """``G_t = U diag(s_t) Vᵀ`` with fixed ``U, V``: the factors' eigenbases are ``U`` and ``V`` and
    SOAP's update is ``-lr · U diag(Adam(s_t)) Vᵀ`` with Adam applied to the vectors ``s_t``."""
    # epsilon well above round-off: entries that are zero in the exact basis carry ~1e-16 of noise
    # in both moments, and Adam maps noise/(|noise| + epsilon) — ~1e-10 here.
    d, lr, (beta1, beta2), eps = 5, 0.1, (0.9, 0.95), 1e-6
    u, v = _orthogonal(d, 1), _orthogonal(d, 2)
    param = nn.Parameter(torch.zeros(d, d, dtype=F64))
    config = EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=amortized_config, **SOAP64
    )
    optimizer = Shampoo(
        [param], lr=lr, betas=(beta1, beta2), epsilon=eps, use_merge_dims=False, preconditioner_config=config
    )
    g = torch.Generator().manual_seed(3)
    m = torch.zeros(d, dtype=F64)
    second = torch.zeros(d, dtype=F64)
    for t in range(1, 7):
        # Distinct singular values whose order never changes (so eigh never reorders the basis).
        s = torch.arange(1.0, d + 1, dtype=F64) + 0.4 * torch.rand(d, generator=g, dtype=F64)
        s = s * (1.0 + t % 3)
        param.grad = (u * s) @ v.mT
        before = param.detach().clone()
        optimizer.step()
        m = beta1 * m + (1 - beta1) * s
        second = beta2 * second + (1 - beta2) * s * s
        adam = (m / (1 - beta1**t)) / ((second / (1 - beta2**t)).sqrt() + eps)
        torch.testing.assert_close(param.detach() - before, -lr * (u * adam) @ v.mT, rtol=1e-7, atol=1e-8)
    state = next(iter(optimizer.state.values()))["precond"]
    for i, q in enumerate((u, v)):
        # Stored bases are U and V up to column order and signs: |basisᵀ q| is a permutation matrix.
        overlap = (state[f"eigenvectors.{i}"][0].mT @ q).abs()
        torch.testing.assert_close(overlap.amax(0), torch.ones(d, dtype=F64), rtol=0, atol=1e-8)
        torch.testing.assert_close(overlap.sum(0), torch.ones(d, dtype=F64), rtol=0, atol=1e-6)
        # eigh and Distributed Shampoo's QR store ascending eigenvalues; reference-SOAP QR
        # refreshes re-sort them descending, so the steps above went through a (reversing)
        # permutation of the second moment.
        order = overlap.argmax(1)
        ascending = torch.arange(d)
        reference = getattr(amortized_config, "reference_soap", False)
        expected = ascending.flip(0) if reference else ascending
        assert order.tolist() == expected.tolist()


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("tolerance", [None, 0.02])
def test_rotated_momentum_equals_rotating_the_filtered_gradient(
    monkeypatch: pytest.MonkeyPatch, beta1: float, tolerance: float | None
) -> None:
    """SOAP keeps the filtered gradient in its eigenbasis (carried into each new basis at a
    refresh) instead of keeping it in the parameter's basis and rotating it each step: the same
    directions (to rounding) as the reference — the optimizer's own filtered gradient, rotated
    in and out by the pure ``precondition`` every step — through refreshes (full and partial),
    skipped blocks (NaN gradients) and β₁ = 0."""

    class RotateEachStep(SOAPPreconditioner):
        keeps_first_moment = False
        update_after_refresh_many = Preconditioner.update_after_refresh_many  # one bucket at a time
        precondition_many = Preconditioner.precondition_many

        def state_schema(self, dtype: torch.dtype, options: Any) -> dict:
            schema = super().state_schema(dtype, options)
            schema.pop("rotated_momentum", None)
            return schema

        def update_after_refresh(self, state: dict, grad: Tensor, ctx: Context, scratch: Any = None) -> None:
            rotated = apply_along_dims(grad, self._bases(state), transpose=True)
            second = state["corrected_eigenvalues"]
            second.mul_(ctx.ema2.shaped("keep", second.ndim)).addcmul_(
                rotated, rotated, value=1 - ctx.ema2.beta
            )

        def precondition_into(
            self, state: dict, grad: Tensor, ctx: Context, out: Tensor, scratch: Tensor
        ) -> None:
            out.copy_(self.precondition(state, grad, ctx))

    def run(rotate_every_step: bool) -> list[Tensor]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(12, 8, dtype=F64)), nn.Parameter(torch.randn(8, 8, dtype=F64))]
        if rotate_every_step:
            registry = [
                (EigenvalueCorrectedShampooPreconditionerConfig, RotateEachStep),
                *preconditioners._REGISTRY,
            ]
            monkeypatch.setattr(preconditioners, "_REGISTRY", registry)
        opt = Shampoo(
            params,
            lr=0.01,
            betas=(beta1, 0.95),
            epsilon=1e-8,
            max_preconditioner_dim=4,
            precondition_frequency=4,
            refresh_tolerance=tolerance,
            preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig(**SOAP64),
        )
        assert all(isinstance(b.kernel, RotateEachStep) == rotate_every_step for b in opt.buckets)
        g = torch.Generator().manual_seed(1)
        for step in range(1, 19):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=F64)
            if step in (6, 7):
                params[0].grad[:4, :4] = math.nan  # one block skips two steps
            opt.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in params]

    kept, rotated = run(False), run(True)
    for a, b in zip(kept, rotated):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------- the moment follows the basis it lives in


def test_refresh_rotates_the_second_moment_into_the_new_basis() -> None:
    """Leaving the identity basis for exact eigenbases ``Q₀, Q₁`` maps a moment ``v`` (variances of
    uncorrelated coordinates) to ``(Q₀ᵀ∘Q₀ᵀ) v (Q₁ᵀ∘Q₁ᵀ)ᵀ``: the variances of the rotated
    coordinates. The map is doubly stochastic, so the total is kept; without the rotation the old
    per-coordinate values would simply stay where they were."""
    shape = (5, 3)
    config = EigenvalueCorrectedShampooPreconditionerConfig(rotate_corrected_eigenvalues=True, **SOAP64)
    kernel = SOAPPreconditioner(config, shape, "test")
    state = kernel.init_state(1, torch.device("cpu"), F64)
    bases = [_orthogonal(d, seed=3 + i) for i, d in enumerate(shape)]
    for i, (q, d) in enumerate(zip(bases, shape)):
        values = torch.arange(1.0, d + 1, dtype=F64)  # ascending, as eigh returns them
        state[f"factor.{i}"] = ((q * values) @ q.mT)[None]
    v = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.1
    state["corrected_eigenvalues"] = v.clone()
    ctx = Context.uniform(
        step=3, beta2=1.0, epsilon=1e-8, use_bias_correction=True, live=torch.ones(1, dtype=F64)
    )
    result = kernel.refresh(state, ctx, torch.ones(1, dtype=torch.bool))
    assert not bool(result.failed.any())
    left, right = (q.mT.square() for q in bases)
    expected = left @ v[0] @ right.mT
    torch.testing.assert_close(state["corrected_eigenvalues"][0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected.sum(), v.sum(), rtol=1e-12, atol=0)
    assert (expected - v[0]).abs().amax() > 0.05  # the rotation did move the values

    unrotated = SOAPPreconditioner(
        EigenvalueCorrectedShampooPreconditionerConfig(rotate_corrected_eigenvalues=False, **SOAP64),
        shape,
        "test",
    )
    state["corrected_eigenvalues"] = v.clone()
    for i in range(2):
        state[f"eigenvectors.{i}"] = torch.eye(shape[i], dtype=F64)[None].clone()
    unrotated.refresh(state, ctx, torch.ones(1, dtype=torch.bool))
    torch.testing.assert_close(state["corrected_eigenvalues"], v, rtol=0, atol=0)


def test_a_block_that_does_not_commit_keeps_its_moment() -> None:
    """Blocks outside ``commit`` (not due) keep their moment bit for bit."""
    kernel, state, _, _ = _scrambled_state()
    before = state["corrected_eigenvalues"].clone()
    ctx = Context.uniform(
        step=7, beta2=1.0, epsilon=1e-8, use_bias_correction=True, live=torch.ones(2, dtype=F64)
    )
    kernel.refresh(state, ctx, torch.tensor([True, False]))
    assert torch.equal(state["corrected_eigenvalues"][1], before[1])
    assert not torch.equal(state["corrected_eigenvalues"][0], before[0])
