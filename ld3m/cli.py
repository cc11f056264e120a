"""The ``ld3m`` command line.

``ld3m fit|validate|test|predict`` is a ``LightningCLI`` (subclass mode): ``--model`` is any
``ld3m.modules`` method, ``--data`` any ``ld3m.datamodules`` real dataset, every ``--trainer.*``
flag is Lightning's. Three callbacks are always on and have their own flag groups:
``--export.*`` (the final ``.safetensors`` set), ``--grid.*`` (PNG image grids) and
``--evaluation.*`` (the evaluation protocol at the end of ``fit``).

``ld3m evaluate --distilled FILE`` runs the evaluation protocol on a saved set (DD's own
protocol for DD sets). ``ld3m buffer`` trains expert networks and records their trajectories
(MTT/DATM's buffer, see :mod:`ld3m.experts`). ``ld3m prior`` trains a small latent diffusion
model on real data for LD3M (see :mod:`ld3m.prior`).

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
    zca = synthetic.meta.get("zca")  # a whitened set is evaluated on equally whitened data
    real: RealDataModule = DATASETS[synthetic.dataset](
        data_dir=args.data_dir, zca=zca is not None, zca_eps=(zca or {}).get("eps", 0.1))
    report = evaluate(synthetic, real, archs=[a.strip() for a in args.archs.split(",")],
                      runs=args.runs, epochs=args.epochs, lr=args.lr, dsa=args.dsa,
                      baseline=args.baseline, seed=args.seed, accelerator=args.accelerator,
                      precision=args.precision, protocol=args.protocol)
    print(report.table())
    if args.output:
        with atomic_write(args.output) as tmp:
            tmp.write_text(report.to_json())
    return 0


def buffer_main(argv: list[str]) -> int:
    """``ld3m buffer``: train expert networks and record their trajectories (MTT/DATM)."""
    from ld3m.experts import train_experts

    parser = ArgumentParser(prog="ld3m buffer",
                            description="Train expert networks on real data and record their "
                                        "parameters after every epoch (MTT/DATM's buffer). "
                                        "Experts already in --folder are kept (resume).")
    parser.add_argument("--data", type=str, default="FashionMNIST",
                        help=f"dataset: {', '.join(DATASETS)}")
    parser.add_argument("--data_dir", type=str | None, default=None, help="real dataset folder")
    parser.add_argument("--folder", type=str | None, default=None,
                        help="where the shards go (default runs/buffer/<data>_<network>)")
    parser.add_argument("--experts", type=int, default=100, help="experts in the buffer")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs per expert")
    parser.add_argument("--network", type=str, default="ConvNet")
    parser.add_argument("--lr_teacher", type=float, default=0.01, help="SGD lr (no momentum)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--dsa", type=str, default=DEFAULT_DSA, help="DSA strategy or 'none'")
    parser.add_argument("--zca", type=bool, default=False,
                        help="ZCA-whiten the images (distil with --data.zca true then)")
    parser.add_argument("--zca_eps", type=float, default=0.1, help="ZCA regulariser")
    parser.add_argument("--logits", type=bool, default=False,
                        help="also store the final logits on the training images (DATM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--precision", type=str | None, default=None)
    parser.add_argument("--limit_train_batches", type=int | float | None, default=None,
                        help="batches per epoch (default: the whole training set)")
    parser.add_argument("--progress_bar", type=bool, default=True)
    parser.add_argument("--rank", type=int | None, default=None,
                        help="this process's share of the experts (default: $RANK or "
                             "$SLURM_PROCID, else 0)")
    parser.add_argument("--world_size", type=int | None, default=None,
                        help="processes sharing the experts (default: $WORLD_SIZE or "
                             "$SLURM_NTASKS, else 1)")
    args = parser.parse_args(argv)
    rank, world_size = _launcher_rank(args.rank, args.world_size)
    if args.data not in DATASETS:
        raise ValueError(f"unknown dataset {args.data!r}; choose one of: {', '.join(DATASETS)}")
    data: RealDataModule = DATASETS[args.data](data_dir=args.data_dir, zca=args.zca,
                                               zca_eps=args.zca_eps)
    folder = args.folder or f"runs/buffer/{args.data.lower()}_{args.network.lower()}"
    trainer_kwargs = {"accelerator": args.accelerator, "devices": 1, "precision": args.precision,
                      "enable_progress_bar": args.progress_bar}
    if world_size > 1 and torch.cuda.is_available():  # one GPU per local process
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        trainer_kwargs["devices"] = [local % torch.cuda.device_count()]
    if args.limit_train_batches is not None:
        trainer_kwargs["limit_train_batches"] = args.limit_train_batches
    buffer = train_experts(data, folder, experts=args.experts, epochs=args.epochs,
                           network=args.network, lr_teacher=args.lr_teacher,
                           batch_size=args.batch_size, dsa=args.dsa, logits=args.logits,
                           seed=args.seed, trainer_kwargs=trainer_kwargs, rank=rank,
                           world_size=world_size)
    if buffer is None:
        log.info("rank %d of %d: its experts are in %s", rank, world_size, folder)
    else:
        log.info("buffer %s: %d experts x %d epochs of %s on %s", folder, len(buffer),
                 buffer.epochs, args.network, args.data)
    return 0


def prior_main(argv: list[str]) -> int:
    """``ld3m prior``: train a small latent diffusion prior for LD3M on a real dataset."""
    from ld3m.prior import train_prior

    parser = ArgumentParser(prog="ld3m prior",
                            description="Train a small class-conditional latent diffusion model on "
                                        "real data for LD3M: an AutoencoderKL (stage 1), then a "
                                        "class-conditional UNet2DModel denoiser on its latents "
                                        "(stage 2), saved as a diffusers folder that "
                                        "LatentGenerator.from_pretrained (and --model LD3M) loads. "
                                        "Finished stages are kept in <folder>.parts and an "
                                        "interrupted stage resumes from its last epoch: rerun the "
                                        "same command to resume.")
    parser.add_argument("--data", type=str, default="FashionMNIST",
                        help=f"dataset: {', '.join(DATASETS)}")
    parser.add_argument("--data_dir", type=str | None, default=None, help="real dataset folder")
    parser.add_argument("--folder", type=str | None, default=None,
                        help="output folder (default runs/prior/<data>)")
    parser.add_argument("--latent_channels", type=int, default=4, help="channels of the latent")
    parser.add_argument("--downsample", type=int, default=2,
                        help="autoencoder downsampling, 2 or 4 (28x28 -> 14x14 or 7x7 latents)")
    parser.add_argument("--vae_channels", type=str, default="32,64",
                        help="comma-separated autoencoder channels, one per level "
                             "(2 levels for --downsample 2, 3 for 4)")
    parser.add_argument("--unet_channels", type=str, default="64,128",
                        help="comma-separated UNet channels, one per level; the latent side must "
                             "divide by 2^(levels-1) (14x14: up to 2 levels, 7x7: 1)")
    parser.add_argument("--ae_epochs", type=int, default=10, help="autoencoder epochs")
    parser.add_argument("--denoiser_epochs", type=int, default=30, help="denoiser epochs")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both stages)")
    parser.add_argument("--kl_weight", type=float, default=1e-4,
                        help="weight of the autoencoder's per-pixel KL term")
    parser.add_argument("--num_train_timesteps", type=int, default=1000,
                        help="diffusion timesteps of the noise schedule")
    parser.add_argument("--null_class", type=bool, default=True,
                        help="train a null class (label dropout 0.1) for classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--precision", type=str | None, default=None)
    parser.add_argument("--limit_train_batches", type=int | float | None, default=None,
                        help="batches per epoch, or a fraction (default: the whole training set)")
    parser.add_argument("--progress_bar", type=bool, default=True)
    args = parser.parse_args(argv)
    if args.data not in DATASETS:
        raise ValueError(f"unknown dataset {args.data!r}; choose one of: {', '.join(DATASETS)}")
    data: RealDataModule = DATASETS[args.data](data_dir=args.data_dir)
    folder = args.folder or f"runs/prior/{args.data.lower()}"
    trainer_kwargs = {"accelerator": args.accelerator, "devices": 1, "precision": args.precision,
                      "enable_progress_bar": args.progress_bar}
    generator = train_prior(data, folder, latent_channels=args.latent_channels,
                            downsample=args.downsample, vae_channels=args.vae_channels,
                            unet_channels=args.unet_channels, ae_epochs=args.ae_epochs,
                            denoiser_epochs=args.denoiser_epochs, batch_size=args.batch_size,
                            lr=args.lr, kl_weight=args.kl_weight,
                            num_train_timesteps=args.num_train_timesteps,
                            null_class=args.null_class, seed=args.seed,
                            trainer_kwargs=trainer_kwargs,
                            limit_train_batches=args.limit_train_batches)
    meta = generator.meta
    log.info("prior %s: latent %s, test reconstruction MSE %.4f, test denoising MSE %.4f", folder,
             "x".join(map(str, generator.latent_shape)),
             meta.get("autoencoder", {}).get("test_rec_mse", float("nan")),
             meta.get("denoiser", {}).get("test_denoising_mse", float("nan")))
    return 0


def _launcher_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` from the flags, else from torchrun's or SLURM's variables.

    The launcher's variables are then removed from this process's environment: each process
    trains its experts alone, and a Lightning ``Trainer`` that saw them would try to join a
    process group.
    """
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        env.pop(var, None)
    return rank, world_size


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "evaluate":
        return evaluate_main(argv[1:])
    if argv and argv[0] == "buffer":
        return buffer_main(argv[1:])
    if argv and argv[0] == "prior":
        return prior_main(argv[1:])
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
