"""``ShampooCallback``: Shampoo for any LightningModule, without changing the module.

``Trainer(callbacks=[ShampooCallback()])`` wraps the module's ``configure_optimizers``: every
torch optimizer it returns (AdamW, Adam, SGD, RMSprop, Adagrad) becomes a ``Shampoo`` that grafts
from exactly that optimizer — before ``start_preconditioning_step`` it *is* that optimizer, param
group by param group — and the LR schedulers returned with it are re-pointed at the replacement
with their state intact. A module without ``configure_optimizers`` gets ``configure_shampoo``'s
defaults. The callback also adds ``PreconditionFrequencyScheduler``, ``SGDFallback`` and
``PreconditionerHealthMonitor`` to the trainer (each replaceable or switchable off), and runs an
``IterateAveragingSwitch`` from its own hooks (evaluation and checkpoints see iterate averaging's
averaged weights).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from .._checks import require_float
from .._translate import translate_optimizer, translate_output
from .._validation import validate_constructor_options
from ..configure import (
    _CONSTRUCTOR_ONLY,
    EPSILON_RTOL,
    GROUP_KEYS,
    Preset,
    configure_shampoo,
    device_refresh_config,
    module_device_type,
    resolve_preset,
    with_epsilon_rtol,
)
from ..optim import Shampoo
from ..preconditioners import (
    AdamPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    PreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)
from ..schedules import FrequencyScheduleSpec, LogFrequency
from .averaging import IterateAveragingSwitch
from .fallback import SGDFallback
from .frequency import PreconditionFrequencyScheduler
from .health import PreconditionerHealthMonitor

__all__ = ["ShampooCallback"]

#: Presets whose ``betas[1]`` is a Kronecker-factor EMA (KL-Shampoo's config subclasses the
#: eigendecomposed one).
_FACTORED = (
    RootInvShampooPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
)

# Group keys the wrapped optimizer decides (the translation sets them from its param groups);
# ``iterate_averaging_config`` too when it is ClassicMomentumConfig (GPA / Schedule-Free are ours).
_FROM_SOURCE = (
    "lr",
    "betas",
    "weight_decay",
    "momentum",
    "dampening",
    "use_nesterov",
    "grafting_config",
    "use_decoupled_weight_decay",
    "use_bias_correction",
    "use_torch_momentum",
    "weight_decay_type",
)


class ShampooCallback(pl.Callback):
    """Replace the module's torch optimizers by Shampoo grafted on them; add the helper callbacks.

    Args:
        preconditioner: a preset name of ``configure_shampoo`` (``"shampoo"``, ``"eigen"``,
            ``"kl_shampoo"``, ``"soap"``, ``"psgd_kron"``, ``"adam"``) or a preconditioner config
            (used as given). On CUDA a preset refreshes with matmuls only (coupled Newton,
            warm-started QR; ``configure.device_refresh_config``), and every preset staggers its
            refreshes (``refresh_stagger=True``). The Shampoo presets get the relative damping
            ``ε + EPSILON_RTOL·λ_max`` per factor here (``configure.EPSILON_RTOL``): a
            rounding-level change of the data then moves the run ~1e-5, not ~1e-2, at the same
            steps on the convergence suite.
            ``"muon"`` needs per-parameter groups (spectral descent takes matrices only) and is
            only available through ``configure_shampoo``.
        precondition_frequency, start_preconditioning_step, max_preconditioner_dim, epsilon: the
            Shampoo settings (``None``: the preset's). ``start_preconditioning_step=math.inf``
            gives back the wrapped optimizer exactly.
        beta2: ``betas[1]``; ``None``: for the Kronecker-factor presets (``"shampoo"``,
            ``"eigen"``, ``"kl_shampoo"``, ``"soap"``) the preset's factor EMA β (0.95, from the
            convergence suite: Adam's 0.999 averages factors over too long a past), for the
            others the wrapped optimizer's second-moment β (Adam's β₂, RMSprop's α), which is
            what ``betas[1]`` means for a diagonal preconditioner.
        frequency_scheduler: ``True`` (a ``"log"`` schedule ramping from a quarter of
            ``precondition_frequency`` up to it,
            for the optimizers this callback makes; a ``Shampoo`` the module returns itself keeps
            its own settings), a schedule accepted by ``PreconditionFrequencyScheduler`` (applied
            to every Shampoo), an instance, or ``False``/``None``.
        health_monitor: ``True`` (``PreconditionerHealthMonitor()``), an instance, or off.
        fallback: ``True`` (``SGDFallback()``), an instance, or off.
        averaging_switch: ``True`` (an ``IterateAveragingSwitch()`` that this callback's hooks run:
            with ``iterate_averaging_config=ScheduleFreeConfig()`` /
            ``GeneralizedPrimalAveragingConfig()`` in ``shampoo_kwargs``, validation, test,
            prediction and checkpoints see the averaged weights), an instance, or off. It does
            nothing for optimizers that do not average; a trainer's own switch is used instead.
        shampoo_kwargs: further Shampoo options for every group (``beta3``, ``use_bucketing``,
            ``refresh_tolerance``, …); the ones the wrapped optimizer decides (lr, betas, weight
            decay, momentum, grafting) are refused. ``skip_preconditioning_rank_lt`` defaults to
            2: biases and norm scales keep exactly the wrapped optimizer's update (0: they get
            Kronecker factors too, as in Distributed Shampoo).
    """

    def __init__(
        self,
        preconditioner: str | PreconditionerConfig = "shampoo",
        *,
        precondition_frequency: int | None = None,
        start_preconditioning_step: int | float | None = None,
        max_preconditioner_dim: int | float | None = None,
        epsilon: float | None = None,
        beta2: float | None = None,
        frequency_scheduler: PreconditionFrequencyScheduler | FrequencyScheduleSpec | bool | None = True,
        health_monitor: PreconditionerHealthMonitor | bool | None = True,
        fallback: SGDFallback | bool | None = True,
        averaging_switch: IterateAveragingSwitch | bool | None = True,
        **shampoo_kwargs: Any,
    ) -> None:
        self.preset: Preset = resolve_preset(preconditioner)
        if isinstance(preconditioner, str):  # the drop-in's recipe: damping relative to each factor
            self.preset = replace(self.preset, config=with_epsilon_rtol(self.preset.config, EPSILON_RTOL))
        if isinstance(self.preset.config, SpectralDescentPreconditionerConfig):
            raise ValueError(
                "preconditioner: spectral descent (muon) takes matrices only, and the wrapped optimizer's "
                "param groups mix them with biases; use configure_shampoo(module, preconditioner='muon') "
                "in configure_optimizers instead"
            )
        for key in shampoo_kwargs:
            averaging = shampoo_kwargs[key] if key == "iterate_averaging_config" else None
            if key in _FROM_SOURCE or type(averaging).__name__ == "ClassicMomentumConfig":
                raise ValueError(f"{key} comes from the wrapped optimizer; set it there")
            if (key not in GROUP_KEYS and key not in _CONSTRUCTOR_ONLY) or key == "preconditioner_config":
                raise ValueError(f"unknown argument {key!r} (not a ShampooCallback or Shampoo argument)")
        require_float("beta2", beta2, low=0.0, high=1.0, low_open=True, allow_none=True)
        self.preconditioner = preconditioner
        self.beta2 = beta2

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        self.options: dict[str, Any] = {
            "preconditioner_config": self.preset.config,
            "precondition_frequency": pick(precondition_frequency, self.preset.precondition_frequency),
            "start_preconditioning_step": pick(
                start_preconditioning_step, self.preset.start_preconditioning_step
            ),
            "max_preconditioner_dim": pick(max_preconditioner_dim, self.preset.max_preconditioner_dim),
            "epsilon": pick(epsilon, self.preset.epsilon),
            "use_merge_dims": self.preset.use_merge_dims,
            "target_parameter_dimensionality": self.preset.target_parameter_dimensionality,
            "max_factor_dim": self.preset.max_factor_dim,
            "max_factor_ratio": self.preset.max_factor_ratio,
            # Biases and norm scales get the wrapped optimizer's own update, as configure_shampoo
            # gives them Adam: a Kronecker factor of a vector is one d x d matrix (6-19% of the
            # transformer's step time in the convergence suite) for no measured gain.
            "skip_preconditioning_rank_lt": 2,
            # The same refreshes spread over the interval (no step pays for all of them).
            "refresh_stagger": True,
            **shampoo_kwargs,
        }
        self._check_options()
        #: The Shampoo optimizers this callback created (the last fit's).
        self.optimizers: list[Shampoo] = []
        self.frequency_scheduler = self._make_frequency_scheduler(frequency_scheduler)
        self.health_monitor = _component("health_monitor", health_monitor, PreconditionerHealthMonitor)
        self.fallback = _component("fallback", fallback, SGDFallback)
        self.averaging_switch = _component("averaging_switch", averaging_switch, IterateAveragingSwitch)
        self._installed: tuple[pl.LightningModule, Any] | None = None
        self._log: Any = None

    def _check_options(self) -> None:
        """Fail at construction, naming the argument, rather than at ``fit``."""
        probe = torch.zeros(2, 2, requires_grad=True)
        options = dict(self.options)
        constructor = {k: options.pop(k) for k in _CONSTRUCTOR_ONLY if k in options}
        validate_constructor_options(**{"use_bucketing": True, "max_bucket_numel": 2**21, **constructor})
        graft = AdamPreconditionerConfig()  # the translation always grafts (from the source)
        Shampoo([{"params": [probe], "grafting_config": graft, **options}], **constructor)

    def _make_frequency_scheduler(self, spec: Any) -> PreconditionFrequencyScheduler | None:
        if spec is None or spec is False:
            return None
        if isinstance(spec, PreconditionFrequencyScheduler):
            return spec
        if spec is True:  # the default manages only the optimizers this callback makes
            top = self.options["precondition_frequency"]
            # From a quarter of the target spacing (every 2 steps for 10): on the convergence
            # suite as many steps to AdamW's loss as starting at every step, with fewer refreshes.
            schedule = LogFrequency(min_frequency=max(1, top // 4), max_frequency=top)
            return PreconditionFrequencyScheduler(schedule, only=self.optimizers)
        return PreconditionFrequencyScheduler(spec)

    @property
    def callbacks(self) -> list[pl.Callback]:
        """The helper callbacks this one adds to the trainer (those switched on)."""
        parts = (self.frequency_scheduler, self.fallback, self.health_monitor)
        return [c for c in parts if c is not None]

    # ----------------------------------------------------------------------------- lightning

    @property
    def log(self) -> Any:
        return self._log

    @log.setter
    def log(self, function: Any) -> None:
        """Lightning attaches ``pl_module.log`` to every callback just before it checks that the
        module defines ``configure_optimizers`` — before any callback hook runs. This is the one
        point where a callback can give a module without one ``configure_shampoo``'s defaults."""
        self._log = function
        module = getattr(function, "__self__", None)
        if isinstance(module, pl.LightningModule) and not is_overridden("configure_optimizers", module):
            self._install(module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._refuse_another(trainer)
        self._install(pl_module)
        # Before the checkpoint callbacks (Lightning keeps them last so that a checkpoint saved in
        # a hook sees the other callbacks' state of that step), and before checkpoint restore
        # (which follows ``setup``), so their state is saved and restored by their state_key.
        callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]
        here = next((i for i, c in enumerate(callbacks) if c is self), len(callbacks) - 1)
        at = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
        at = max(at, here + 1)
        for component in self.callbacks:
            if any(c is component for c in callbacks):
                continue
            if any(type(c) is type(component) for c in callbacks):
                rank_zero_info(f"ShampooCallback: using the trainer's own {type(component).__name__}")
                continue
            if isinstance(component, PreconditionerHealthMonitor):
                component.added_by = type(self).__name__
            callbacks.insert(at, component)
            at += 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._distributed_hand_off(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say what a resume from another optimizer's checkpoint took (the restore ran by now);
        averaging optimizers go to their train point."""
        for optimizer in self.optimizers:
            if optimizer.resume_note:
                rank_zero_info(optimizer.resume_note)
        if (switch := self._switch(trainer)) is not None:
            switch.on_train_start(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Under plain ``"ddp"`` Lightning saves rank 0's own ``optimizer.state_dict()``, which for
        a sharded Shampoo holds rank 0's blocks only: gather every block into it (a collective;
        this hook runs on every rank). Averaging optimizers are saved in eval mode (the switch)."""
        from ..strategies.ddp import consolidate_checkpoint

        switch = self._switch(trainer)
        if switch is None or not switch.on_save_checkpoint(trainer, pl_module, checkpoint):
            consolidate_checkpoint(trainer, checkpoint)
        # An entry under this callback's key, so that resuming the checkpoint without it makes
        # Lightning name ShampooCallback among the callbacks the checkpoint was created with.
        # Written here rather than by a ``state_dict`` method: that would make the callback
        # "stateful" and Lightning would refuse a second instance before ``setup`` can explain.
        origins = [optimizer.origin for optimizer in self.optimizers]
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"translated": origins}

    # Iterate averaging: the switch's hooks, run from here (see ``IterateAveragingSwitch``).

    def _switch(self, trainer: pl.Trainer) -> IterateAveragingSwitch | None:
        own = any(isinstance(c, IterateAveragingSwitch) for c in trainer.callbacks)  # type: ignore[attr-defined]
        return None if own else self.averaging_switch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (switch := self._switch(trainer)) is not None:
            switch.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (switch := self._switch(trainer)) is not None:
            switch.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (switch := self._switch(trainer)) is not None:
            switch.on_train_end(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (switch := self._switch(trainer)) is not None:
            switch.on_validation_start(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (switch := self._switch(trainer)) is not None:
            switch.on_test_start(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (switch := self._switch(trainer)) is not None:
            switch.on_predict_start(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    # ------------------------------------------------------------------------------ internals

    def _refuse_another(self, trainer: pl.Trainer) -> None:
        """One drop-in per Trainer: a second would wrap the first one's Shampoo (or be ignored)."""
        mine = [c for c in trainer.callbacks if isinstance(c, ShampooCallback)]  # type: ignore[attr-defined]
        if len(mine) > 1:
            for callback in reversed(mine):  # unwrap the module (the log setter may have wrapped it)
                callback._uninstall()
            raise ValueError(
                f"Trainer(callbacks=...) holds {len(mine)} ShampooCallback instances; keep one: a "
                "single ShampooCallback already replaces every optimizer that configure_optimizers returns"
            )

    def _install(self, module: pl.LightningModule) -> None:
        """Replace ``module.configure_optimizers`` (an instance attribute; removed at teardown)."""
        current = module.__dict__.get("configure_optimizers")
        if getattr(current, "_shampoo_callback", None) is self:
            return
        self._uninstall()
        if is_overridden("configure_optimizers", module):
            original = module.configure_optimizers

            def configure_optimizers() -> Any:
                return self.translate(original(), module)
        else:

            def configure_optimizers() -> Any:
                return self.default_optimizer(module)

        configure_optimizers._shampoo_callback = self  # type: ignore[attr-defined]
        self._installed = (module, current)
        self.optimizers.clear()  # in place: the default frequency scheduler reads this list
        module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    def _uninstall(self) -> None:
        if self._installed is None:
            return
        module, previous = self._installed
        self._installed = None
        if previous is None:
            module.__dict__.pop("configure_optimizers", None)
        else:
            module.configure_optimizers = previous  # type: ignore[method-assign]

    def translate(self, output: Any, module: torch.nn.Module) -> Any:
        """``output`` of ``configure_optimizers`` with each torch optimizer replaced by Shampoo."""
        names: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)

        options = self._device_options(module)

        def translate(optimizer: torch.optim.Optimizer) -> Shampoo:
            shampoo = translate_optimizer(
                optimizer, options, names, self._factor_beta(), default_factor_beta=self.preset.betas[1]
            )
            self.optimizers.append(shampoo)
            return shampoo

        return translate_output(output, translate)

    def _device_options(self, module: torch.nn.Module) -> dict[str, Any]:
        """``self.options`` with a preset's refresh chosen for the module's device (matmul-only
        on CUDA: ``configure.device_refresh_config``); a config given as ``preconditioner`` is
        kept as it is."""
        options = dict(self.options)
        if isinstance(self.preconditioner, str):
            config = device_refresh_config(options["preconditioner_config"], module_device_type(module))
            options["preconditioner_config"] = config
        return options

    def _factor_beta(self) -> float | None:
        """``betas[1]`` of the translated groups (``None``: the source's second-moment β)."""
        if self.beta2 is not None:
            return self.beta2
        return self.preset.betas[1] if isinstance(self.preset.config, _FACTORED) else None

    def default_optimizer(self, module: torch.nn.Module) -> Shampoo | dict[str, Any]:
        """``configure_shampoo`` with this callback's settings (modules without an optimizer)."""
        options = self._device_options(module)
        config = options.pop("preconditioner_config")
        options.pop("skip_preconditioning_rank_lt")  # moot: configure_shampoo puts vectors on Adam
        betas = None if self.beta2 is None else (self.preset.betas[0], self.beta2)
        result = configure_shampoo(module, config, betas=betas, **options)
        self.optimizers.append(result if isinstance(result, Shampoo) else result["optimizer"])
        return result

    def _distributed_hand_off(self, trainer: pl.Trainer) -> None:
        """HAND-OFF to the distributed layer (see the distributed issue).

        Under plain ``"ddp"`` with more than one rank, shard every Shampoo's preconditioner blocks
        across the ranks via ``lightning_shampoo.distributed.shard_optimizer(optimizer,
        strategy)`` once that function exists; until then (or for optimizers already sharded,
        e.g. by the ``shampoo_ddp`` strategy) this does nothing.
        """
        if trainer.world_size <= 1 or not isinstance(trainer.strategy, DDPStrategy):
            return
        try:
            distributed = importlib.import_module("lightning_shampoo.distributed")
        except ModuleNotFoundError as error:
            if error.name != "lightning_shampoo.distributed":
                raise
            return
        shard = getattr(distributed, "shard_optimizer", None)
        if shard is None:
            return
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, Shampoo) and not optimizer.sharded:
                shard(optimizer, trainer.strategy)


def _component(argument: str, spec: Any, cls: type[pl.Callback]) -> Any:
    """``True`` → a default ``cls()``; an instance as is; ``False``/``None`` → off."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return cls()
    if not isinstance(spec, cls):
        raise ValueError(
            f"{argument} must be a {cls.__name__}, True, False or None, got {type(spec).__name__}"
        )
    return spec
