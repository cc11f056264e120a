"""The ``ld3m`` subcommands besides ``fit``, one typed function each.

``ld3m.cli`` builds each subcommand's parser from its function's signature and docstring
(jsonargparse), so the flags, their types, defaults and help live here once: ``ld3m evaluate
--help`` shows this docstring's ``Args``, and ``--config``/``--print_config`` work as for ``fit``.
The functions can also be called from Python.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from ld3m.augment import DEFAULT_STRATEGY as DEFAULT_DSA
from ld3m.datamodules.imagenet import IMAGENET_SUBSETS, ImageNetSubset
from ld3m.datamodules.real import DATASETS, ImageFolderData, RealDataModule
from ld3m.evaluation import EvalReport
from ld3m.evaluation import evaluate as run_evaluation
from ld3m.files import atomic_write
from ld3m.synthetic import SyntheticSet

log = logging.getLogger("ld3m")

__all__ = ["buffer", "evaluate", "prior"]


def evaluate(distilled: list[str] | str, data_dir: str | None = None,
             archs: list[str] | str = "ConvNet", runs: int = 20, epochs: int | None = None,
             lr: float | None = None, dsa: str = "auto", dc_augment: str = "none",
             baseline: bool = True, seed: int = 0, accelerator: str = "auto",
             precision: str | None = None, protocol: str = "auto", batch_size: int = 256,
             stack: int = 0, compile: bool = False, output: str | None = None) -> EvalReport:
    """Train fresh networks on a distilled set and report their real test accuracy. Random
    real images of the same IPC are trained the same way beside it (the baseline).

    Args:
        distilled: The synthetic set (a ``.safetensors`` file written by ``ld3m fit``), or several
            sets of one method and IPC (a list, or comma-separated): the papers' protocol of
            several distilled sets, their networks pooled into one mean +- std.
        data_dir: Folder of the real dataset the set was distilled from (default:
            ``$LD3M_DATA_DIR`` or the user cache).
        archs: Networks to train, a list or comma-separated (e.g. ConvNet,AlexNet,VGG11,ResNet18).
        runs: Fresh networks per set and architecture (the DC/DM papers': 20).
        epochs: The protocol's ``E``: ``E + 1`` epochs, the lr x0.1 (a new optimiser) after
            epoch ``E // 2 + 1``, as the authors'; default theirs: 1000 with augmentation, 300
            without (``--protocol glad``: exactly ``E`` epochs, default 1000).
        lr: Learning rate (default: the set's learned lr, else 0.01; ``--protocol glad``: 0.001,
            VGG-11 0.0001).
        dsa: DSA strategy while training, ``none``, or ``auto`` (the authors' per method: DSA
            for every set but DC's, which gets DC's own augmentation).
        dc_augment: With ``--dsa none``: DC's own augmentation (``crop_scale_rotate``,
            ``crop_noise``...), ``auto`` for the authors' choice per dataset and network, or
            ``none``.
        baseline: Also train on random real images of the same IPC.
        seed: Seed of every draw (networks, augmentation, shuffling, baseline images): the same
            seed gives the same table.
        accelerator: Lightning accelerator of the evaluation trainers.
        precision: Lightning precision of the evaluation trainers.
        protocol: ``standard``, ``dd`` (DD's learned unrolled steps; archs, epochs, lr and dsa
            are then the set's own), ``glad`` (GLaD's and LD3M's evaluation, as
            ``evaluate_synset`` of Brian-Moser/prune_and_distill: SGD at lr 0.001, VGG-11
            0.0001, a linear warm-up over the first E // 2 epochs then a cosine, DSA, and the
            test accuracy of an EMA (0.995) of the weights) or ``auto`` (``dd`` for DD sets,
            else ``standard``).
        batch_size: Minibatch of the evaluation training (the papers' 256; DATM's recipes 128).
        stack: Train up to N networks of an architecture at once as one stacked model
            (``torch.func.vmap``: the same accuracies as one by one, for GPUs, where one small
            network leaves the device idle; slower on CPUs); 0: one at a time. The standard
            protocol and networks without BatchNorm only.
        compile: Compile the networks' training forward (``torch.compile``, one compiled
            function per architecture; the first batches compile, tens of seconds on a CPU;
            eager where compiling fails). Not with ``--stack``.
        output: Also write the report as JSON to this file.
    """
    paths = [p.strip() for p in distilled.split(",")] if isinstance(distilled, str) else distilled
    sets = [SyntheticSet.load(path) for path in paths]
    synthetic = sets[0]
    # an ImageNet subset's sets say which subset: ImageNetSubset-imagewoof
    family, _, subset = synthetic.dataset.partition("-")
    if synthetic.dataset not in DATASETS and not (subset and family == ImageNetSubset.dataset_name):
        raise ValueError(f"{paths[0]} was distilled from {synthetic.dataset!r}; "
                         f"ld3m evaluate knows {', '.join(DATASETS)}")
    zca = synthetic.meta.get("zca")  # a whitened set is evaluated on equally whitened data
    kwargs = {"zca": zca is not None, "zca_eps": (zca or {}).get("eps", 0.1)}
    data_class = DATASETS[family if subset else synthetic.dataset]
    if subset:
        if subset not in IMAGENET_SUBSETS:
            raise ValueError(f"{paths[0]} was distilled from {synthetic.dataset!r}, an unknown "
                             f"ImageNet subset (known: {', '.join(IMAGENET_SUBSETS)})")
        kwargs.update(subset=subset, image_size=synthetic.image_shape[-1])
    own = (tuple(data_class.mean), tuple(data_class.std))
    if zca is None and len(synthetic.mean) == len(own[0]) and not all(
            math.isclose(a, b, abs_tol=1e-6) for a, b in zip(synthetic.mean + synthetic.std,
                                                             own[0] + own[1], strict=True)):
        # distilled with --data.mean/--data.std: the real data is normalised as the set was
        kwargs.update(mean=list(synthetic.mean), std=list(synthetic.std))
    if issubclass(data_class, ImageFolderData):
        if data_dir is None:
            raise ValueError(f"{paths[0]} was distilled from an image folder: pass --data_dir")
        kwargs["image_size"] = synthetic.image_shape[-1]
    real: RealDataModule = data_class(data_dir=data_dir, **kwargs)
    names = [a.strip() for a in archs.split(",")] if isinstance(archs, str) else list(archs)
    report = run_evaluation(sets if len(sets) > 1 else synthetic, real, archs=names, runs=runs,
                            epochs=epochs, lr=lr, dsa=dsa, baseline=baseline, seed=seed,
                            accelerator=accelerator, precision=precision, protocol=protocol,
                            progress=False, dc_augment=dc_augment, batch_size=batch_size,
                            stack=stack, compile=compile)
    print(report.table())
    if output:
        with atomic_write(output) as tmp:
            tmp.write_text(report.to_json())
    return report


def buffer(data: RealDataModule, folder: str | None = None, experts: int = 100, epochs: int = 50,
           network: str = "ConvNet", lr_teacher: float = 0.01, batch_size: int = 256,
           dsa: str = DEFAULT_DSA, logits: bool = False, seed: int = 0, accelerator: str = "auto",
           precision: str | None = None, limit_train_batches: int | float | None = None,
           progress_bar: bool = True, rank: int | None = None,
           world_size: int | None = None, optimizer: str = "sgd", rho: float = 0.01,
           alpha: float = 0.3, momentum: float = 0.0, weight_decay: float = 0.0,
           compile: bool = False) -> None:
    """Train expert networks on real data and record their parameters after every epoch
    (MTT/DATM's buffer). Experts already in the folder are kept, and an interrupted expert
    resumes from its last finished epoch: rerun the same command. ``--optimizer gsam`` trains
    DATM's sharpness-aware experts (their buffer_FTD.py: ``--optimizer gsam --epochs 100
    --data.zca true``, the other defaults theirs).

    Args:
        data: The real dataset (``--data NAME``, its settings as ``--data.*``; e.g.
            ``--data.zca true`` for a whitened buffer, to distil with ``--data.zca true`` then).
        folder: Where the shards go (default ``runs/buffer/<data>_<network>``, plus ``_gsam``
            with ``--optimizer gsam``).
        experts: Experts in the finished buffer.
        epochs: Training epochs per expert.
        network: The experts' network (see ``ld3m.networks``).
        lr_teacher: SGD learning rate of the experts.
        batch_size: Minibatch size.
        dsa: DSA strategy of the training batches, or ``none``.
        logits: Also store each expert's final logits on the training images (DATM).
        seed: Base seed (expert ``i`` uses ``seed + 1000 i``).
        accelerator: Lightning accelerator.
        precision: Lightning precision.
        limit_train_batches: Batches per epoch (default: the whole training set).
        progress_bar: Show Lightning's progress bars.
        rank: This process's share of the experts (default: ``$RANK`` or ``$SLURM_PROCID``, else 0).
        world_size: Processes sharing the experts (default: ``$WORLD_SIZE`` or ``$SLURM_NTASKS``,
            else 1).
        optimizer: The experts' optimiser: ``sgd`` (MTT) or ``gsam`` (DATM: GSAM around the
            SGD, two forward/backward passes per minibatch; not with ``--precision 16-mixed``).
        rho: GSAM's perturbation radius (DATM's ``--rho_max = --rho_min``: 0.01).
        alpha: GSAM's surrogate-gap weight (DATM's ``--alpha``: 0.3).
        momentum: SGD momentum (MTT's and DATM's ``--mom``: 0).
        weight_decay: SGD weight decay (their ``--l2``: 0).
        compile: Compile the experts' training forward (``torch.compile``, one compiled
            function for every expert; the first batches compile, tens of seconds on a CPU; eager
            where compiling fails).
    """
    from ld3m.experts import train_experts

    local = _local_rank()  # before _launcher_rank removes the launcher's variables
    rank, world_size = _launcher_rank(rank, world_size)
    suffix = "_gsam" if optimizer == "gsam" else ""
    folder = folder or f"runs/buffer/{data.dataset_name.lower()}_{network.lower()}{suffix}"
    trainer_kwargs = {"accelerator": accelerator, "devices": 1, "precision": precision,
                      "enable_progress_bar": progress_bar}
    if world_size > 1 and accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        trainer_kwargs["devices"] = [local % torch.cuda.device_count()]  # one GPU per process
    if limit_train_batches is not None:
        trainer_kwargs["limit_train_batches"] = limit_train_batches
    result = train_experts(data, folder, experts=experts, epochs=epochs, network=network,
                           lr_teacher=lr_teacher, batch_size=batch_size, dsa=dsa, logits=logits,
                           seed=seed, trainer_kwargs=trainer_kwargs, rank=rank,
                           world_size=world_size, optimizer=optimizer, rho=rho, alpha=alpha,
                           momentum=momentum, weight_decay=weight_decay, compile=compile)
    if result is None:
        log.info("rank %d of %d: its experts are in %s", rank, world_size, folder)
    else:
        log.info("buffer %s: %d experts x %d epochs of %s on %s", folder, len(result),
                 result.epochs, network, data.dataset_name)


def prior(data: RealDataModule, folder: str | None = None, latent_channels: int = 4,
          downsample: int = 2, vae_channels: list[int] | str = "32,64",
          unet_channels: list[int] | str = "64,128", ae_epochs: int = 10,
          denoiser_epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
          kl_weight: float = 1e-4, num_train_timesteps: int = 1000, null_class: bool = True,
          seed: int = 0, accelerator: str = "auto", precision: str | None = None,
          limit_train_batches: int | float | None = None, progress_bar: bool = True) -> None:
    """Train a small class-conditional latent diffusion model on real data for LD3M. It is an
    AutoencoderKL (stage 1), then a class-conditional UNet2DModel denoiser on its latents
    (stage 2), saved as a diffusers folder that ``--model LD3M --model.generator`` loads.
    Finished stages are kept in ``<folder>.parts`` and an interrupted stage resumes from its
    last epoch: rerun the same command.

    Args:
        data: The real dataset (``--data NAME``, its settings as ``--data.*``; not ZCA-whitened).
        folder: Output folder (default ``runs/prior/<data>``).
        latent_channels: Channels of the latent.
        downsample: Autoencoder downsampling, 2 or 4 (28x28 -> 14x14 or 7x7 latents).
        vae_channels: Autoencoder channels, one per level (2 levels for downsample 2, 3 for 4).
        unet_channels: UNet channels, one per level; the latent side must divide by
            2^(levels-1) (14x14: up to 2 levels, 7x7: 1).
        ae_epochs: Autoencoder epochs.
        denoiser_epochs: Denoiser epochs.
        batch_size: Minibatch size of both stages.
        lr: AdamW learning rate of both stages.
        kl_weight: Weight of the autoencoder's per-pixel KL term.
        num_train_timesteps: Diffusion timesteps of the noise schedule.
        null_class: Train a null class (label dropout 0.1) for classifier-free guidance.
        seed: Seed of the initialisations, shuffling and noise.
        accelerator: Lightning accelerator.
        precision: Lightning precision.
        limit_train_batches: Batches per epoch, or a fraction (default: the whole training set).
        progress_bar: Show Lightning's progress bars.
    """
    from ld3m.prior import train_prior

    folder = folder or f"runs/prior/{data.dataset_name.lower()}"
    trainer_kwargs = {"accelerator": accelerator, "devices": 1, "precision": precision,
                      "enable_progress_bar": progress_bar}
    generator = train_prior(data, folder, latent_channels=latent_channels, downsample=downsample,
                            vae_channels=vae_channels, unet_channels=unet_channels,
                            ae_epochs=ae_epochs, denoiser_epochs=denoiser_epochs,
                            batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                            num_train_timesteps=num_train_timesteps, null_class=null_class,
                            seed=seed, trainer_kwargs=trainer_kwargs,
                            limit_train_batches=limit_train_batches)
    meta = generator.meta
    log.info("prior %s: latent %s, test reconstruction MSE %.4f, test denoising MSE %.4f", folder,
             "x".join(map(str, generator.latent_shape)),
             meta.get("autoencoder", {}).get("test_rec_mse", float("nan")),
             meta.get("denoiser", {}).get("test_denoising_mse", float("nan")))


def _local_rank() -> int:
    """This process's index on its node, from torchrun's or SLURM's variables (0 if neither)."""
    env = os.environ
    return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))


def _launcher_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` from the arguments, else from torchrun's or SLURM's variables.

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
