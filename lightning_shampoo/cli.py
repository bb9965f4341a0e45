"""``lightning-shampoo``: the demo, and a LightningCLI for any module and data module.

    lightning-shampoo demo [--output-dir runs/demo] [--max-epochs 12] ...
    lightning-shampoo fit --config examples/digits.yaml [--trainer.max_steps=100 ...]

The LightningCLI subcommands (fit, validate, test, predict) take the model and data module by
``class_path`` (``lightning_shampoo.demo.DigitsClassifier`` and ``DigitsDataModule`` are ready to
use). Importing ``lightning_shampoo`` first makes its callbacks (and strategies) available by name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")

_USAGE = """\
usage: lightning-shampoo demo [-h] [options]
       lightning-shampoo {fit,validate,test,predict} [-h] [--config CONFIG] [LightningCLI options]

  demo       train the digits CNN with ShampooCallback and with AdamW side by side; write
             TensorBoard and CSV logs and a plot (see `lightning-shampoo demo -h`)
  fit, ...   Lightning's CLI, e.g. `lightning-shampoo fit --config examples/digits.yaml`
"""


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-shampoo demo",
        description="Shampoo (ShampooCallback) vs AdamW on scikit-learn's digits; writes logs and a plot.",
    )
    parser.add_argument(
        "--output-dir", default="runs/demo", help="where logs and demo.png go (default: %(default)s)"
    )
    parser.add_argument("--max-epochs", type=int, default=12, help="epochs per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed for both runs (default: %(default)s)")
    parser.add_argument(
        "--limit-train-batches", type=int, default=None, help="train batches per epoch (default: all)"
    )
    parser.add_argument(
        "--max-preconditioner-dim",
        type=int,
        default=None,
        help="Shampoo's block size (default: ShampooCallback's, 256)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _run_demo(argv: Sequence[str]) -> int:
    args = _demo_parser().parse_args(argv)
    from .demo import run_demo

    run_demo(
        args.output_dir,
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        limit_train_batches=args.limit_train_batches,
        progress=not args.no_progress,
        max_preconditioner_dim=args.max_preconditioner_dim,
    )
    return 0


def _run_lightning_cli(argv: Sequence[str] | None) -> int:
    """``argv=None`` lets LightningCLI read ``sys.argv`` itself (as a console script)."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    import lightning_shampoo  # noqa: F401  (callbacks and strategies by name)

    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if argv is None else list(argv),
        save_config_kwargs={"overwrite": True},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-shampoo`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        return _run_demo(args[1:])
    if args and args[0] in _SUBCOMMANDS:
        return _run_lightning_cli(None if argv is None else args)
    print(_USAGE, end="", file=sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr)
    return 0 if args[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
