"""``configure_shampoo``: param groups, preset defaults and an optional LR schedule in one call.

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

Param groups: matrices and conv kernels (two or more dims of size > 1) get the preset's
preconditioner and ``weight_decay``; biases, norm weights, scalars and matrices with a size-1 dim
get Adam (``AdamPreconditionerConfig``) without weight decay; frozen parameters are skipped and
tied ones appear once. ``param_groups={pattern: options}`` overrides by parameter name.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ._checks import require_choice, require_float, require_int, require_pair
from ._validation import CONSTRUCTOR_ONLY, validate_constructor_options
from .optim import Shampoo
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
from .schedules import WarmupConstant, WarmupCosine, WarmupLinear

__all__ = [
    "EPSILON_RTOL",
    "FACTOR_RATIO",
    "PRESET_NAMES",
    "Preset",
    "configure_shampoo",
    "device_refresh_config",
    "module_device_type",
    "resolve_preset",
    "with_epsilon_rtol",
]

PRESET_NAMES = ("shampoo", "eigen", "kl_shampoo", "soap", "psgd_kron", "adam", "muon")
SCHEDULES = {"cosine": WarmupCosine, "linear": WarmupLinear, "constant": WarmupConstant}
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


#: Shampoo param-group keys (everything ``Shampoo.__init__`` takes except ``params`` and the
#: constructor-only switches).
_CONSTRUCTOR_ONLY = CONSTRUCTOR_ONLY
GROUP_KEYS = tuple(
    name
    for name in inspect.signature(Shampoo.__init__).parameters
    if name not in ("self", "params", *_CONSTRUCTOR_ONLY)
)


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


def _is_matrix(p: torch.Tensor) -> bool:
    return sum(d > 1 for d in p.shape) >= 2


_HEAD_NAMES = {"head", "lm_head", "classifier", "fc_out", "output", "output_layer", "readout"}


def _embeddings_and_head(module: nn.Module) -> set[int]:
    """Muon keeps these on Adam: embedding tables, and the output head — a ``Linear`` whose own
    name is a usual head name, else the last ``Linear`` registered (override by pattern if the
    model registers its head elsewhere)."""
    ids: set[int] = set()
    named_heads, last_linear = [], None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag):
            ids.add(id(sub.weight))
        if isinstance(sub, nn.Linear):
            last_linear = sub
            if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
                named_heads.append(sub)
    for head in named_heads or ([last_linear] if last_linear is not None else []):
        ids.add(id(head.weight))
    return ids


def _matcher(pattern: str) -> Callable[[str], bool]:
    """``re:<regex>`` (``re.fullmatch``) or a glob (``fnmatch``, case-sensitive)."""
    if pattern.startswith("re:"):
        try:
            compiled = re.compile(pattern[3:])
        except re.error as error:
            raise ValueError(f"param_groups pattern {pattern!r} is not a valid regex: {error}") from None
        return lambda name: compiled.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _check_pair(name: str, value: Any) -> tuple[float, float]:
    b1, b2 = require_pair(name, value, lambda n, v: require_float(n, v), ("beta1", "beta2"))
    require_float(f"{name}[0]", b1, low=0.0, high=1.0, high_open=True)
    require_float(f"{name}[1]", b2, low=0.0, high=1.0, low_open=True)
    return float(b1), float(b2)


class _Layout:
    """The option dicts of each kind of parameter under one preset and the caller's arguments."""

    def __init__(self, preset: Preset, args: dict[str, Any], kwargs: dict[str, Any]) -> None:
        betas = args["betas"] if args["betas"] is not None else preset.betas
        self.betas = _check_pair("betas", betas)
        adam = args["adam_betas"]
        if adam is None:
            b1 = self.betas[0] if preset.tie_beta1 else preset.adam_betas[0]
            adam = (b1, preset.adam_betas[1])
        self.adam_betas = _check_pair("adam_betas", adam)
        eps = require_float("adam_epsilon", args["adam_epsilon"], low=0.0, low_open=True)
        self.adam = AdamPreconditionerConfig(beta2=self.adam_betas[1], epsilon=float(eps))
        self.args, self.kwargs = args, kwargs
        frequency = args.get("precondition_frequency")
        self.frequency = preset.precondition_frequency if frequency is None else frequency

    def preconditioned(self, preset: Preset, *, main: bool) -> dict[str, Any]:
        """Options of a parameter under ``preset``'s preconditioner (``main``: the caller's
        arguments apply; for a preset named in an override, its own defaults do)."""
        args = self.args if main else {}

        def pick(key: str, default: Any) -> Any:
            value = args.get(key)
            return default if value is None else value

        config = preset.config
        if preset.name == "adam" and config == AdamPreconditionerConfig():
            config = self.adam  # the Adam side's β₂ and epsilon
        opts = {
            "preconditioner_config": config,
            "grafting_config": self.adam if preset.graft else None,
            "betas": self.betas if main else (self.betas[0], preset.betas[1]),
            "epsilon": float(pick("epsilon", preset.epsilon)),
            "precondition_frequency": pick("precondition_frequency", preset.precondition_frequency),
            "start_preconditioning_step": pick(
                "start_preconditioning_step", preset.start_preconditioning_step
            ),
            "max_preconditioner_dim": pick("max_preconditioner_dim", preset.max_preconditioner_dim),
            "use_merge_dims": preset.use_merge_dims,
            "refresh_stagger": True,  # the same refreshes, spread over the interval
            "target_parameter_dimensionality": preset.target_parameter_dimensionality,
            "max_factor_dim": preset.max_factor_dim,
            "max_factor_ratio": preset.max_factor_ratio,
        }
        return {**opts, **self.kwargs}

    def diagonal(self) -> dict[str, Any]:
        """Adam on parameters a Kronecker factorisation does not serve."""
        common = {k: v for k, v in self.kwargs.items() if k not in ("grafting_config", "betas", "epsilon")}
        return {
            "refresh_stagger": True,  # moot for Adam (no refresh); the caller's value wins
            **common,
            "preconditioner_config": self.adam,
            "grafting_config": None,
            "betas": self.adam_betas,
            "precondition_frequency": self.frequency,
            "start_preconditioning_step": -1,
        }


def _lr_scheduler(
    module: nn.Module,
    optimizer: Shampoo,
    schedule: str,
    warmup_steps: int | float,
    total_steps: int | None,
    min_lr_ratio: float,
) -> dict[str, Any]:
    if total_steps is None:
        try:
            trainer: Any = getattr(module, "trainer", None)
        except RuntimeError:  # a LightningModule not attached to a Trainer
            trainer = None
        if trainer is None:
            raise ValueError(
                "total_steps is required for an LR schedule when the module is not attached to a Trainer"
            )
        estimated = trainer.estimated_stepping_batches
        if not math.isfinite(estimated):
            raise ValueError(
                "total_steps is required: the Trainer's estimated_stepping_batches is infinite "
                "(set max_steps or max_epochs)"
            )
        total_steps = int(estimated)
    require_int("total_steps", total_steps, low=1)
    if isinstance(warmup_steps, float):
        warmup_steps = round(warmup_steps * total_steps)
    multiplier = SCHEDULES[schedule](total_steps, min(warmup_steps, total_steps), float(min_lr_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}


def _check_schedule_arguments(schedule: Any, warmup_steps: Any, total_steps: Any, min_lr_ratio: Any) -> None:
    """Checked whether or not a schedule is asked for: a bad value is a mistake either way."""
    require_choice("schedule", schedule, (*SCHEDULES, None))
    if isinstance(warmup_steps, float):
        require_float("warmup_steps", warmup_steps, low=0.0, high=1.0, high_open=True)
    else:
        require_int("warmup_steps", warmup_steps, low=0)
    require_int("total_steps", total_steps, low=1, allow_none=True)
    require_float("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)


def configure_shampoo(
    module: nn.Module,
    preconditioner: str | PreconditionerConfig = "shampoo",
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    epsilon: float | None = None,
    adam_betas: tuple[float, float] | None = None,
    adam_epsilon: float = 1e-8,
    precondition_frequency: int | None = None,
    start_preconditioning_step: int | float | None = None,
    max_preconditioner_dim: int | float | None = None,
    param_groups: Mapping[str, Mapping[str, Any]] | None = None,
    schedule: str | None = None,
    warmup_steps: int | float = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    **shampoo_kwargs: Any,
) -> Shampoo | dict[str, Any]:
    """What ``configure_optimizers`` returns for a Shampoo-family optimizer over ``module``.

    Args:
        preconditioner: a preset name (module docstring) or a preconditioner config.
        lr, weight_decay: as for AdamW (decay is decoupled, on matrices only).
        betas: ``(β₁, factor β₂)`` of the preconditioned groups; ``None``: the preset's.
        epsilon, precondition_frequency, start_preconditioning_step, max_preconditioner_dim:
            Shampoo's; ``None``: the preset's.
        adam_betas, adam_epsilon: the Adam side (non-matrix parameters and Adam grafting);
            ``adam_betas=None``: ``(betas[0], preset β₂)`` (Muon: ``(0.9, 0.95)``).
        param_groups: ``{pattern: options}``, first match wins. Patterns are globs on parameter
            names (``"encoder.*.bias"``) or ``"re:<regex>"``; options are Shampoo group keys
            (``lr``, ``weight_decay``, ``preconditioner_config``, …) and ``preconditioner`` (a
            preset name or config; ``"adam"`` gives the diagonal Adam treatment).
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after ``warmup_steps`` (an int, or a
            fraction of the total); ``None`` with ``warmup_steps > 0`` means ``"constant"``.
        total_steps: default ``module.trainer.estimated_stepping_batches``.
        min_lr_ratio: final LR of the decay as a fraction of ``lr``.
        shampoo_kwargs: further ``Shampoo`` arguments (``momentum``, ``beta3``, ``use_bucketing``…).

    Returns:
        the ``Shampoo``, or ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval":
        "step"}}`` when a schedule is asked for. Every bad argument raises ``ValueError`` naming it.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    preset = resolve_preset(preconditioner)
    device_type = module_device_type(module)
    if isinstance(preconditioner, str):  # a preset's refresh follows the device; a config is kept
        preset = replace(preset, config=device_refresh_config(preset.config, device_type))
    for key in shampoo_kwargs:
        if key in ("preconditioner_config", "params"):
            raise ValueError(f"{key} is not an argument of configure_shampoo; use preconditioner=...")
        if key not in GROUP_KEYS and key not in _CONSTRUCTOR_ONLY:
            raise ValueError(f"unknown argument {key!r} (not a configure_shampoo or Shampoo argument)")
    _check_schedule_arguments(schedule, warmup_steps, total_steps, min_lr_ratio)
    require_float("epsilon", epsilon, low=0.0, allow_none=True)
    if schedule is None and warmup_steps:
        schedule = "constant"
    constructor = {k: shampoo_kwargs.pop(k) for k in _CONSTRUCTOR_ONLY if k in shampoo_kwargs}
    validate_constructor_options(**{"use_bucketing": True, "max_bucket_numel": 2**21, **constructor})
    args = {
        "betas": betas,
        "adam_betas": adam_betas,
        "adam_epsilon": adam_epsilon,
        "epsilon": epsilon,
        "precondition_frequency": precondition_frequency,
        "start_preconditioning_step": start_preconditioning_step,
        "max_preconditioner_dim": max_preconditioner_dim,
    }
    layout = _Layout(preset, args, shampoo_kwargs)
    overrides = _parse_overrides(param_groups)
    adam_matrices = _embeddings_and_head(module) if preset.adam_embeddings_and_head else set()

    groups: dict[str, dict[str, Any]] = {}
    used = [False] * len(overrides)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        matrix = _is_matrix(p)
        if matrix and id(p) not in adam_matrices:
            label, opts = preset.name, layout.preconditioned(preset, main=True)
        else:  # Adam; Muon's embeddings and head keep their weight decay
            label, opts = ("adam" if matrix else "adam_no_decay"), layout.diagonal()
        opts["weight_decay"] = weight_decay if matrix else 0.0
        opts["lr"] = lr
        hits = [i for i, (_, match, _) in enumerate(overrides) if match(name)]
        for i in hits:
            used[i] = True
        for pattern, _, override in (overrides[i] for i in hits[:1]):  # the first match wins
            override = dict(override)
            chosen = override.pop("preconditioner", None)
            if chosen is not None:
                chosen_preset = resolve_preset(chosen)
                if isinstance(chosen, str):
                    config = device_refresh_config(chosen_preset.config, device_type)
                    chosen_preset = replace(chosen_preset, config=config)
                if isinstance(chosen_preset.config, AdamPreconditionerConfig):
                    base = layout.diagonal()
                    if chosen_preset.config != AdamPreconditionerConfig():  # a config object
                        base["preconditioner_config"] = chosen_preset.config
                else:
                    base = layout.preconditioned(chosen_preset, main=chosen_preset.name == preset.name)
                opts.update(base)
            opts.update(override)
            label = f"{pattern} ({label})"
        group = groups.setdefault(label, {**opts, "name": label, "params": []})
        group["params"].append((name, p))
    for (pattern, _, _), hit in zip(overrides, used):
        if not hit:
            raise ValueError(f"param_groups pattern {pattern!r} matches no trainable parameter")
    if not groups:
        raise ValueError("module has no trainable parameters")
    optimizer = Shampoo(list(groups.values()), **constructor)
    optimizer.configure_new_groups(
        _new_group_defaults(preset, layout, lr, weight_decay),
        names={id(p): name for name, p in module.named_parameters(remove_duplicate=False)},
    )
    optimizer.origin = f"configure_shampoo(preconditioner={preset.name!r})"
    if schedule is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": _lr_scheduler(module, optimizer, schedule, warmup_steps, total_steps, min_lr_ratio),
    }


def _new_group_defaults(preset: Preset, layout: _Layout, lr: float, weight_decay: float) -> dict[str, Any]:
    """What a group added later (``add_param_group``: a fine-tuning callback unfreezing a
    backbone) gets for the keys it leaves out: the preset's matrix options, ``lr`` and
    ``weight_decay``; where the preset grafts, its vectors (biases, norm scales) are left to the
    Adam grafting alone (``skip_preconditioning_rank_lt=2``), as the preset's own Adam group
    steps them. One added group stays one group (its LR schedule and the callback's bookkeeping
    are per group), so its weight decay applies to all its parameters, as torch's does."""
    defaults = {**layout.preconditioned(preset, main=True), "lr": lr, "weight_decay": weight_decay}
    if defaults.get("grafting_config") is not None:
        defaults["skip_preconditioning_rank_lt"] = 2
    return defaults


def _parse_overrides(
    param_groups: Mapping[str, Mapping[str, Any]] | None,
) -> list[tuple[str, Callable[[str], bool], Mapping[str, Any]]]:
    if param_groups is None:
        return []
    if not isinstance(param_groups, Mapping):
        raise ValueError(
            f"param_groups must be a mapping {{pattern: options}}, got {type(param_groups).__name__}"
        )
    out = []
    for pattern, options in param_groups.items():
        if not isinstance(pattern, str) or not isinstance(options, Mapping):
            raise ValueError(
                f"param_groups must map str patterns to option dicts, got {pattern!r}: {options!r}"
            )
        for key in options:
            if key not in GROUP_KEYS and key != "preconditioner":
                raise ValueError(f"param_groups[{pattern!r}]: unknown option {key!r}")
        out.append((pattern, _matcher(pattern), options))
    return out
