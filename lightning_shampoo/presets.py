"""Presets: the defaults of each preconditioner family for ``configure_shampoo`` and
``ShampooCallback``, and the config rewrites they apply (relative damping, CUDA refreshes).

Presets (``preconditioner=`` name; a config object picks the preset of its family), set from
the convergence suite (``benchmarks/convergence.py``, ``docs/convergence.md``) so that one ``lr``
means what it means for AdamW (Adam grafting; on that suite the best lr of Shampoo and SOAP was
AdamW's best or one half-decade above it):

==============  ============================================================================
``shampoo``     root-inverse Shampoo grafted on Adam (β₂ 0.999, epsilon 1e-8), β₁ 0.9,
                factor EMA β 0.95, epsilon 1e-12, refresh every 10 steps, blocks ≤ 256. The
                factor β 0.95 (Distributed Shampoo uses 0.999) lowered the final loss of every
                task of the suite at the same step cost; epsilon 1e-8/1e-6, refreshes every
                5/20 steps and the exponent ½ per factor were no better. Not damped relative
                to the factors' scale (``EigenConfig(epsilon_rtol=EPSILON_RTOL)``, which the
                drop-in ``ShampooCallback`` uses): that makes the run ~1000× less sensitive to
                rounding-level changes of the data, but moved this preset's best lr on the
                suite's CNN down a grid step (steps to AdamW's loss 0.45–0.62× → 0.60–0.68× over
                three seeds; docs/benchmarks.md, "Perturbation sensitivity")
``eigen``       the same with a stored eigendecomposition (cheaper partial refreshes, drift test)
``kl_shampoo``  KL-Shampoo grafted on Adam, factor β 0.95 (better than 0.999 on every task),
                epsilon 1e-8 (its factor updates apply the other factors' inverse roots, which a
                1e-12 damping lets blow up on rank-deficient early statistics) plus the relative
                damping ``EPSILON_RTOL·λ_max`` (input-change sensitivity 1e-3 → 1e-4, and fewer
                steps to AdamW's loss on every digits task)
``soap``        SOAP: betas (0.95, 0.95), epsilon 1e-8, refresh every 10 steps, no grafting (it
                is Adam in the eigenbasis), dims not merged (``use_merge_dims=False``, as in the
                reference SOAP: merging a ``[16, 1, 3, 3]`` kernel into one 144-long block
                gives a full-matrix basis fitted to a rank-deficient factor, which cost 1.6×
                the steps on the suite's CNN); 1-D parameters on Adam with the same betas. On
                the suite betas (0.9, 0.95) or (0.9, 0.99), epsilon 1e-10, refreshes every 5 or
                every step and warm-started QR were no better
``psgd_kron``   PSGD-Kron defaults, β₁ 0.9, no grafting (whitened updates have unit RMS and are
                RMS-clipped, i.e. already Adam-scaled); it fits its preconditioner inside the step,
                so precondition_frequency does not apply (1)
``adam``        AdamW through the same optimizer (a baseline with identical plumbing)
``muon``        spectral descent (Newton–Schulz) on hidden matrices and conv kernels with
                ``scale="rms"`` (update RMS of AdamW, so AdamW learning rates carry over), β₁ 0.95,
                whole matrices (max_preconditioner_dim = inf); embeddings, the output head and
                every non-matrix parameter on Adam with betas (0.9, 0.95), as Muon practice does
==============  ============================================================================

On CUDA the presets refresh with matmuls only (``device_refresh_config``), unless the caller
chose the refresh: root-inverse Shampoo (``shampoo``) takes the coupled Newton iteration
(``CoupledNewtonConfig``) instead of ``eigh``, and the eigenbases (``eigen``, ``kl_shampoo``,
``soap``) a warm-started QR refresh (``QREigendecompositionConfig(reference_soap=True)``: ``eigh``
at a block's first refresh, then one ``Q ← qr(A Q)`` step from the stored basis). A GPU ``eigh``
is a slow, host-synchronising solver (~17 ms for 512², far more than the matmuls of a step);
Newton and QR are a few batched matmuls. On other devices ``eigh`` stays. Passing a config
object (``preconditioner=RootInvShampooPreconditionerConfig()``, or one with
``EigenConfig()``) keeps its refresh on every device. Every preset also staggers its refreshes
(``refresh_stagger=True``: the same refreshes, spread over the interval).

Block rules of every preset (and of ``ShampooCallback``; raw ``Shampoo`` keeps Distributed
Shampoo's): dims merge only down to a matrix (``target_parameter_dimensionality=2``), and a block
dim whose factor would hold over ``max_factor_ratio`` times the block's numbers (5; SOAP: 3) gets
no full factor — Shampoo keeps its diagonal, SOAP its original basis (``factoring.py``). On the
suite's models and a 4096-token LM this keeps the Shampoo and SOAP presets' state at 1.1–2.9×
AdamW's (docs/benchmarks.md, "Optimizer state memory").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import nn

from .preconditioners import (
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigenConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    EighEigendecompositionConfig,
    KLShampooPreconditionerConfig,
    PreconditionerConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)

__all__ = [
    "EPSILON_RTOL",
    "FACTOR_RATIO",
    "PRESET_NAMES",
    "SHAMPOO_BETAS",
    "SHAMPOO_BLOCK_DIM",
    "SOAP_FACTOR_RATIO",
    "Preset",
    "device_refresh_config",
    "module_device_type",
    "resolve_preset",
    "with_epsilon_rtol",
]

PRESET_NAMES = ("shampoo", "eigen", "kl_shampoo", "soap", "psgd_kron", "adam", "muon")
#: ``(β₁, factor EMA β)`` of the Shampoo presets (the convergence suite's recipe).
SHAMPOO_BETAS = (0.9, 0.95)
#: Relative damping ``ε_rtol`` (``ε + ε_rtol·λ_max`` per factor) of the ``kl_shampoo`` preset and
#: of ``ShampooCallback``'s Shampoo presets: above the float32 rounding of a factor's spectrum
#: (a 1e-7 input change then moves the parameters ~1e-5, not ~1e-2), below what cost the drop-in
#: steps on the convergence suite (1e-4 did, on the CNN).
EPSILON_RTOL = 3e-5
#: Block size of the ``shampoo`` preset (and so of ``ShampooCallback``'s default): a 512-wide dim
#: is cut into 256-wide blocks, whose factors stay within ``max_factor_ratio`` and are kept, where
#: one 512-wide block would lose its factor to the memory rule. On the suite's CNN (a 64×512 layer)
#: the drop-in then took 0.45× AdamW's steps instead of 0.93× at 3.1× AdamW's state (1.4×); its
#: time to AdamW's loss 1.03× instead of 1.39× (docs/convergence.md).
SHAMPOO_BLOCK_DIM = 256
#: ``max_factor_ratio`` of the Shampoo presets and the drop-in: a block dim ``d`` with
#: ``d² > ratio·numel`` (more than ``ratio`` times the product of the block's other dims) keeps only
#: its factor's diagonal. 5 from the convergence suite (docs/benchmarks.md, "Optimizer state
#: memory"): it drops the vocabulary sides of embeddings and heads (ratio 8-16 there) and the CNN's
#: [64, 512] layer, and keeps the CNN's [32, 144] conv kernel whole (at 4 it lost it: steps to
#: AdamW's loss 0.62x -> 0.93x).
FACTOR_RATIO = 5.0
#: SOAP's: each factor keeps its statistics packed and a full eigenbasis (1.5·d² numbers, Shampoo's
#: d²), so the same memory bound comes at a smaller ratio; any value in [3, 4) gives the suite's
#: models the same blocks (the byte-level transformer's [256, 64] blocks lose the 256 side: state
#: 3.86x -> 1.77x AdamW's).
SOAP_FACTOR_RATIO = 3.0
_INVERTS_FACTORS = (RootInvShampooPreconditionerConfig, EigendecomposedShampooPreconditionerConfig)


def with_epsilon_rtol(config: PreconditionerConfig, epsilon_rtol: float) -> PreconditionerConfig:
    """``config`` with its ``amortized_computation_config.epsilon_rtol`` set; configs that
    invert no factor (SOAP, the diagonal and descent families) are returned as they are."""
    if not isinstance(config, _INVERTS_FACTORS):
        return config
    amortized = replace(config.amortized_computation_config, epsilon_rtol=epsilon_rtol)
    return replace(config, amortized_computation_config=amortized)  # type: ignore[arg-type]  # same family


def device_refresh_config(config: PreconditionerConfig, device_type: str) -> PreconditionerConfig:
    """``config`` with the refresh a preset uses on ``device_type`` (pure; see the module
    docstring): on ``"cuda"``, ``eigh`` refreshes become matmul-only ones — coupled Newton for
    root-inverse Shampoo, warm-started QR for eigenbases (eigendecomposed and KL-Shampoo, SOAP) —
    keeping the damping options. Left as they are: other devices, other refreshes, and what
    Newton cannot compute (``pseudo_inverse``, inverse exponents overridden to any value)."""
    if device_type != "cuda":
        return config
    amortized = getattr(config, "amortized_computation_config", None)
    if isinstance(config, RootInvShampooPreconditionerConfig):
        if type(amortized) is not EigenConfig or amortized.pseudo_inverse or config.inverse_exponent_override:
            return config
        newton = CoupledNewtonConfig(epsilon_rtol=amortized.epsilon_rtol)
        return replace(config, amortized_computation_config=newton)
    bases = (EigendecomposedShampooPreconditionerConfig, EigenvalueCorrectedShampooPreconditionerConfig)
    if isinstance(config, bases) and type(amortized) is EighEigendecompositionConfig:
        qr = QREigendecompositionConfig(
            reference_soap=True,
            epsilon_rtol=amortized.epsilon_rtol,
            pseudo_inverse=amortized.pseudo_inverse,
            rank_rtol=amortized.rank_rtol,
        )
        return replace(config, amortized_computation_config=qr)
    return config


def module_device_type(module: nn.Module) -> str:
    """Device type of ``module``'s first parameter (``"cpu"`` without any): where its
    optimizer's refreshes run (Lightning moves the module before ``configure_optimizers``)."""
    for p in module.parameters():
        return p.device.type
    return "cpu"


@dataclass(frozen=True)
class Preset:
    """Defaults of one preconditioner family (see the module docstring for the reasons)."""

    name: str
    config: PreconditionerConfig
    betas: tuple[float, float] = (0.9, 0.999)
    epsilon: float = 1e-12
    graft: bool = True  # Adam grafting (β₂ and epsilon of the Adam side)
    precondition_frequency: int = 10
    start_preconditioning_step: int | float = -1
    max_preconditioner_dim: int | float = 1024
    use_merge_dims: bool = True
    # The lean rules (issue 12; ``factoring.py``): merge a conv kernel's trailing dims but never a
    # matrix into a vector (one d₁d₂-long factor instead of a d₁ and a d₂ one), and no factor along
    # a dim whose factor would be over ``max_factor_ratio`` times its block (a vocabulary side).
    target_parameter_dimensionality: int | float = 2
    max_factor_dim: int | float = math.inf
    max_factor_ratio: float = FACTOR_RATIO
    adam_betas: tuple[float, float] = (0.9, 0.999)
    tie_beta1: bool = True  # the Adam side's β₁ follows ``betas[0]``
    adam_embeddings_and_head: bool = False


def _psgd_kron_config() -> PreconditionerConfig:
    try:
        from .preconditioners.psgd_kron import PSGDKronPreconditionerConfig
    except ImportError as error:  # the family ships separately
        raise ImportError(
            "preconditioner='psgd_kron' needs lightning_shampoo.preconditioners.psgd_kron "
            "(PSGDKronPreconditionerConfig), which this installation does not have"
        ) from error
    return PSGDKronPreconditionerConfig()


def _preset(name: str) -> Preset:
    if name == "shampoo":
        config = RootInvShampooPreconditionerConfig()
        return Preset(name, config, betas=SHAMPOO_BETAS, max_preconditioner_dim=SHAMPOO_BLOCK_DIM)
    if name == "eigen":
        return Preset(name, EigendecomposedShampooPreconditionerConfig(), betas=SHAMPOO_BETAS)
    if name == "kl_shampoo":
        basis = EighEigendecompositionConfig(epsilon_rtol=EPSILON_RTOL)
        kl = KLShampooPreconditionerConfig(amortized_computation_config=basis)
        return Preset(name, kl, betas=SHAMPOO_BETAS, epsilon=1e-8)
    if name == "soap":
        return Preset(
            name,
            # Our improvement over Distributed Shampoo's default: carry the second moment into each
            # new basis (soap.py), which kept the suite's CNN from diverging at AdamW's lr.
            EigenvalueCorrectedShampooPreconditionerConfig(rotate_corrected_eigenvalues=True),
            betas=(0.95, 0.95),
            epsilon=1e-8,
            graft=False,
            use_merge_dims=False,
            max_factor_ratio=SOAP_FACTOR_RATIO,
            adam_betas=(0.95, 0.95),
        )
    if name == "psgd_kron":
        return Preset(name, _psgd_kron_config(), betas=(0.9, 1.0), graft=False, precondition_frequency=1)
    if name == "adam":
        return Preset(name, AdamPreconditionerConfig(), epsilon=1e-8, graft=False, precondition_frequency=1)
    if name == "muon":
        return Preset(
            name,
            SpectralDescentPreconditionerConfig(scale="rms"),
            betas=(0.95, 1.0),
            epsilon=1e-8,
            graft=False,
            precondition_frequency=1,
            max_preconditioner_dim=math.inf,
            adam_betas=(0.9, 0.95),
            tie_beta1=False,
            adam_embeddings_and_head=True,
        )
    raise ValueError(f"preconditioner must be a config or one of {list(PRESET_NAMES)}, got {name!r}")


def resolve_preset(preconditioner: str | PreconditionerConfig) -> Preset:
    """The preset for a name, or for a config object (its family's preset with that config)."""
    if isinstance(preconditioner, str):
        return _preset(preconditioner)
    if not isinstance(preconditioner, PreconditionerConfig):
        raise ValueError(
            f"preconditioner must be a config or one of {list(PRESET_NAMES)}, "
            f"got {type(preconditioner).__name__}"
        )
    family = {
        KLShampooPreconditionerConfig: "kl_shampoo",
        EigendecomposedShampooPreconditionerConfig: "eigen",
        RootInvShampooPreconditionerConfig: "shampoo",
        EigenvalueCorrectedShampooPreconditionerConfig: "soap",
        AdamPreconditionerConfig: "adam",
        SpectralDescentPreconditionerConfig: "muon",
    }
    for config_type, name in family.items():
        if isinstance(preconditioner, config_type):
            return replace(_preset(name), config=preconditioner)
    if type(preconditioner).__name__ == "PSGDKronPreconditionerConfig":
        return replace(_preset("psgd_kron"), config=preconditioner)
    # Anything else (SGD, AdaGrad, RMSprop, sign descent, a registered family): no grafting.
    return Preset(type(preconditioner).__name__, preconditioner, graft=False, precondition_frequency=1)
