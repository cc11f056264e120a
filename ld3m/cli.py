"""The ``ld3m`` command line.

``ld3m fit|validate|test|predict`` is a ``LightningCLI`` (subclass mode): ``--model`` is any
``ld3m.modules`` method, ``--data`` any ``ld3m.datamodules`` real dataset, every ``--trainer.*``
flag is Lightning's. Three callbacks are always on and have their own flag groups:
``--export.*`` (the final ``.safetensors`` set), ``--grid.*`` (PNG image grids) and
``--evaluation.*`` (the evaluation protocol at the end of ``fit``).

``ld3m evaluate --distilled FILE`` runs the evaluation protocol on a saved set (DD's own
protocol for DD sets).

Bad input ends with one ``error:`` line on stderr and exit status 2 (set ``LD3M_DEBUG=1`` for
the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import ld3m.datamodules  # noqa: F401  (registers the data modules for --data NAME)
import ld3m.modules  # noqa: F401  (registers the methods for --model NAME)
from ld3m.callbacks import ExportSynthetic, ImageGrid, PeriodicEvaluation
from ld3m.datamodules import DATASETS, RealDataModule
from ld3m.evaluation import DEFAULT_DSA, evaluate
from ld3m.files import atomic_write
from ld3m.modules import DistillationModule
from ld3m.synthetic import SyntheticSet

log = logging.getLogger("ld3m")

#: The CPU-sized default run (``ld3m fit`` with no flags): DM on Fashion-MNIST, IPC 10.
DEFAULT_FIT = {
    "model": {"class_path": "ld3m.modules.DM", "init_args": {"ipc": 10}},
    "data": {"class_path": "ld3m.datamodules.FashionMNIST", "init_args": {"batch_per_class": 64}},
}
TRAINER_DEFAULTS = {
    "max_steps": 150,
    "default_root_dir": "runs/default",
    "log_every_n_steps": 10,
}


def trainer_defaults() -> dict:
    """``TRAINER_DEFAULTS`` plus a *fresh* ``ModelCheckpoint`` (every 100 steps and ``last.ckpt``).

    A new instance per run: a callback keeps state between runs (a ModelCheckpoint remembers its
    ``dirpath``), so a shared one would send a second in-process run's checkpoints to the first's.
    """
    return {**TRAINER_DEFAULTS,
            "callbacks": [ModelCheckpoint(every_n_train_steps=100, save_last=True)]}


class Ld3mCLI(LightningCLI):
    """``LightningCLI`` with ld3m's defaults and always-on export/grid/evaluation callbacks."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportSynthetic, "export")
        parser.add_lightning_class_args(ImageGrid, "grid")
        parser.add_lightning_class_args(PeriodicEvaluation, "evaluation")
        parser.set_defaults(DEFAULT_FIT)
        parser.set_defaults({"evaluation.epochs": 120, "evaluation.runs": 3})


def _setup_logging() -> None:
    # main() may run several times in one process (tests, notebooks): replace, don't stack, the
    # handler, and bind it to the current sys.stderr
    for old in [h for h in log.handlers if h.get_name() == "ld3m-cli"]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("ld3m-cli")
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def evaluate_main(argv: list[str]) -> int:
    """``ld3m evaluate``: the evaluation protocol on a saved synthetic set."""
    parser = ArgumentParser(prog="ld3m evaluate",
                            description="Train fresh networks on a distilled set and report real "
                                        "test accuracy next to random real images of the same IPC.")
    parser.add_argument("--distilled", type=str, required=True, help="synthetic set (.safetensors)")
    parser.add_argument("--data_dir", type=str | None, default=None, help="real dataset folder")
    parser.add_argument("--archs", type=str, default="ConvNet",
                        help="comma-separated networks, e.g. ConvNet,AlexNet,VGG11,ResNet18")
    parser.add_argument("--runs", type=int, default=5, help="fresh networks per architecture")
    parser.add_argument("--epochs", type=int, default=1000, help="training epochs (lr x0.1 at half)")
    parser.add_argument("--lr", type=float | None, default=None, help="default: learned lr or 0.01")
    parser.add_argument("--dsa", type=str, default=DEFAULT_DSA, help="DSA strategy or 'none'")
    parser.add_argument("--baseline", type=bool, default=True, help="also random real images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--precision", type=str | None, default=None)
    parser.add_argument("--protocol", type=str, default="auto",
                        help="standard, dd (DD's learned unrolled steps; --archs/--epochs/--lr/--dsa "
                             "are then the set's own) or auto (dd for DD sets)")
    parser.add_argument("--output", type=str | None, default=None, help="write the report as JSON")
    args = parser.parse_args(argv)
    synthetic = SyntheticSet.load(args.distilled)
    if synthetic.dataset not in DATASETS:
        raise ValueError(f"{args.distilled} was distilled from {synthetic.dataset!r}; "
                         f"ld3m evaluate knows {', '.join(DATASETS)}")
    real: RealDataModule = DATASETS[synthetic.dataset](data_dir=args.data_dir)
    report = evaluate(synthetic, real, archs=[a.strip() for a in args.archs.split(",")],
                      runs=args.runs, epochs=args.epochs, lr=args.lr, dsa=args.dsa,
                      baseline=args.baseline, seed=args.seed, accelerator=args.accelerator,
                      precision=args.precision, protocol=args.protocol)
    print(report.table())
    if args.output:
        with atomic_write(args.output) as tmp:
            tmp.write_text(report.to_json())
    return 0


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "evaluate":
        return evaluate_main(argv[1:])
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    Ld3mCLI(DistillationModule, RealDataModule, subclass_mode_model=True, subclass_mode_data=True,
            trainer_defaults=trainer_defaults(), args=argv or ["fit"],
            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ld3m`` console script; returns the exit status."""
    _setup_logging()
    torch.set_float32_matmul_precision("high")
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get("LD3M_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
