"""Train expert networks on real data and record their trajectories (``ld3m buffer``).

An expert is a freshly initialised network trained for ``epochs`` epochs with plain SGD
(``lr_teacher``, no momentum, no weight decay, batch 256) on DSA-augmented real minibatches
(independent per-sample draws, not Siamese), MTT's teacher; or, with ``optimizer="gsam"``, with
GSAM around that SGD (:mod:`ld3m.gsam`: two forward/backward passes on each minibatch),
DATM's sharpness-aware teacher (their ``buffer/buffer_FTD.py``). Its flat parameters are recorded at
initialisation and after every epoch; DATM additionally wants the final expert's logits on the
training images. Each expert is one Lightning ``fit`` (progress bar, any accelerator), written as
one shard of the format in :mod:`ld3m.trajectories` as soon as it is done. An interrupted run,
rerun with the same arguments, skips the finished experts and continues the unfinished one from
its last finished epoch: after every epoch its Lightning checkpoint (snapshots and augmentation
generator included) is kept in ``<folder>/.partial/`` and removed once the shard is written.
All randomness (initialisation, the per-epoch shuffling, augmentation) comes from generators
seeded by ``seed``, the expert's index and the epoch, so a resumed buffer equals an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ld3m.augment import DEFAULT_STRATEGY
from ld3m.datamodules.real import RealDataModule
from ld3m.evaluation import Classifier
from ld3m.fast import CompiledForward
from ld3m.gsam import GSAM
from ld3m.networks import conv_backend, get_network
from ld3m.trajectories import (
    ExpertTrajectory,
    TrajectoryBuffer,
    flatten_parameters,
    parameter_layout,
    shard_name,
)

log = logging.getLogger("ld3m")

#: Where the running experts' epoch checkpoints live, inside the buffer folder.
PARTIAL = ".partial"
#: The experts' optimisers: MTT's plain SGD, DATM's GSAM around SGD.
OPTIMIZERS = ("sgd", "gsam")
#: Precisions whose gradient scaler cannot step GSAM (it steps without the closure).
FP16 = ("16", "16-mixed", 16)


class EpochShuffle(Sampler[int]):
    """A new permutation every epoch, drawn from ``(seed, epoch)`` alone (Lightning calls
    :meth:`set_epoch`), so the order of an epoch does not depend on the epochs before it: a run
    resumed at an epoch boundary shuffles exactly as an uninterrupted one."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class Expert(Classifier):
    """One expert (teacher) network whose parameters are recorded after every epoch.

    The evaluation protocol's :class:`ld3m.evaluation.Classifier` (seeded initialisation,
    independent DSA draws) with MTT's teacher optimiser: SGD (by default no momentum, no weight
    decay), no schedule; or DATM's: :class:`ld3m.gsam.GSAM` around that SGD, trained with
    manual optimisation (each minibatch, augmented once, is evaluated at ``w`` and at the
    perturbed ``w + e``).

    Args:
        network: Network name (see :func:`ld3m.networks.get_network`).
        channels: Input channels.
        num_classes: Number of classes.
        image_size: Input side length.
        lr_teacher: SGD learning rate.
        dsa: DSA strategy of the training batches (independent draws); ``"none"`` disables it.
        seed: Seed of the initialisation and the augmentation draws.
        optimizer: ``"sgd"`` (MTT) or ``"gsam"`` (DATM: GSAM around the SGD).
        rho: GSAM's perturbation radius (constant, as the learning rate).
        alpha: GSAM's surrogate-gap weight.
        momentum: SGD momentum (MTT's and DATM's ``--mom``, 0 in their commands).
        weight_decay: SGD weight decay (their ``--l2``, 0 by default).
        compile: Run the training forward through ``torch.compile``
            (:class:`ld3m.fast.CompiledForward`; its backward is compiled with it), falling back
            to eager with a warning where compiling fails. The first minibatches compile (one
            graph per batch shape); the trajectories equal the eager ones to float tolerance.
    """

    def __init__(self, network: str, channels: int, num_classes: int, image_size: int,
                 lr_teacher: float = 0.01, dsa: str = DEFAULT_STRATEGY, seed: int = 0,
                 optimizer: str = "sgd", rho: float = 0.01, alpha: float = 0.3,
                 momentum: float = 0.0, weight_decay: float = 0.0, compile: bool = False) -> None:
        if not lr_teacher > 0:
            raise ValueError(f"lr_teacher must be positive, got {lr_teacher}")
        optimizer_settings(optimizer, rho, alpha, momentum, weight_decay)  # validates
        super().__init__(network, channels, num_classes, image_size, lr=lr_teacher, epochs=1,
                         momentum=momentum, weight_decay=weight_decay, dsa=dsa, seed=seed)
        self.optimizer_name, self.rho, self.alpha = optimizer, float(rho), float(alpha)
        # GSAM's two forward/backward passes per step: the step is written out (manual)
        self.automatic_optimization = optimizer == "sgd"
        #: The compiled training forward, or ``None`` (eager). Not a submodule: no state; one
        #: instance may be shared by successive experts (they then compile once in all).
        self.fast: CompiledForward | None = CompiledForward("forward") if compile else None
        #: Flat parameters at initialisation and after every finished epoch (CPU).
        self.snapshots: list[torch.Tensor] = [flatten_parameters(self.net)]

    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision)
        if not self.automatic_optimization and precision in FP16:
            raise ValueError(f"GSAM experts do not train in {precision} precision (the gradient "
                             "scaler steps without GSAM's closure); use 32-true or bf16-mixed")

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward ``net(x)``, compiled with ``compile``."""
        return self.net(x) if self.fast is None else self.fast(self.net, x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization and self.fast is None:
            return super().training_step(batch, batch_idx)
        x, y = batch
        if self.dsa is not None:  # one draw per minibatch: both GSAM passes see the same images
            x = self.dsa(x, generator=self._generator)
        if self.automatic_optimization:  # the Classifier's step (hard labels, DSA or none)
            loss = F.cross_entropy(self.train_logits(x).float(), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss
        optimizer = self.optimizers()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(self.train_logits(x).float(), y)
            self.manual_backward(loss)
            return loss.detach()

        loss = optimizer.step(closure=closure)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.snapshots.append(flatten_parameters(self.net).cpu())

    # the epoch checkpoints of an unfinished expert carry what the Lightning state does not
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ld3m_expert"] = {"snapshots": torch.stack(self.snapshots),
                                     "dsa_generator": self._generator.get_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ld3m_expert")
        if state is None:
            raise ValueError("the checkpoint was not written by an ld3m expert")
        self.snapshots = list(state["snapshots"].unbind(0))
        self._generator.set_state(state["dsa_generator"])

    def configure_optimizers(self):
        hp = self.hparams
        sgd = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                              weight_decay=hp.weight_decay)
        if self.optimizer_name == "sgd":
            return sgd
        return GSAM(sgd, rho=self.rho, alpha=self.alpha, adaptive=True, model=self.net)

    @torch.no_grad()
    def logits(self, loader: DataLoader, progress: bool = False) -> torch.Tensor:
        """Logits of every image of ``loader`` (in its order), float32 on the CPU."""
        self.net.eval()
        batches = tqdm(loader, desc="expert logits", unit="batch", leave=False, disable=not progress)
        with conv_backend(self.device):
            out = [self.net(x.to(self.device)).float().cpu() for x, _ in batches]
        self.net.train()
        return torch.cat(out)


def optimizer_settings(optimizer: str = "sgd", rho: float = 0.01, alpha: float = 0.3,
                       momentum: float = 0.0, weight_decay: float = 0.0) -> dict | None:
    """The experts' optimiser as recorded in a buffer's shards (key ``optimizer``): ``None``
    for MTT's plain SGD (no momentum, no weight decay; what buffers without the key hold), else
    ``{"name", "momentum", "weight_decay"}`` plus GSAM's ``{"rho", "alpha", "adaptive"}``.

    Raises:
        ValueError: for an unknown optimiser or a negative or non-finite value.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    for name, value in (("rho", rho), ("alpha", alpha), ("momentum", momentum),
                        ("weight_decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if optimizer == "sgd" and momentum == 0 and weight_decay == 0:
        return None
    settings = {"name": optimizer, "momentum": float(momentum), "weight_decay": float(weight_decay)}
    if optimizer == "gsam":
        settings.update(rho=float(rho), alpha=float(alpha), adaptive=True)
    return settings


def train_experts(data: RealDataModule, folder: str | Path, experts: int = 100, epochs: int = 50,
                  network: str = "ConvNet", lr_teacher: float = 0.01, batch_size: int = 256,
                  dsa: str = DEFAULT_STRATEGY, logits: bool = False, seed: int = 0,
                  trainer_kwargs: dict | None = None, rank: int = 0, world_size: int = 1,
                  optimizer: str = "sgd", rho: float = 0.01, alpha: float = 0.3,
                  momentum: float = 0.0, weight_decay: float = 0.0,
                  compile: bool = False) -> TrajectoryBuffer | None:
    """Train ``experts`` experts (skipping those already in ``folder``) and return the buffer.

    With ``world_size > 1`` this process trains only the experts ``i`` with
    ``i % world_size == rank`` (one process per GPU or node, each writing its own shards) and
    returns ``None``: the buffer is complete when every rank is done.

    Args:
        data: The real dataset.
        folder: Where the shards go (created if needed).
        experts: Number of experts in the finished buffer.
        epochs: Training epochs of each expert (``epochs + 1`` snapshots).
        network: Network name.
        lr_teacher: SGD learning rate of the experts.
        batch_size: Minibatch size.
        dsa: DSA strategy of the training batches (``"none"``: no augmentation).
        logits: Also store the final expert's logits on the training images (DATM).
        seed: Base seed (expert ``i`` uses ``seed + 1000 * i``).
        trainer_kwargs: Extra ``lightning.Trainer`` arguments (accelerator, precision,
            limit_train_batches, ...).
        rank: This process's index among ``world_size`` processes sharing the work.
        world_size: Number of processes sharing the work.
        optimizer: ``"sgd"`` (MTT's teacher) or ``"gsam"`` (DATM's: GSAM around the SGD).
        rho: GSAM's perturbation radius (DATM: ``--rho_max = --rho_min = 0.01``).
        alpha: GSAM's surrogate-gap weight (DATM: 0.3).
        momentum: SGD momentum (MTT's and DATM's ``--mom``: 0).
        weight_decay: SGD weight decay (their ``--l2``: 0).
        compile: Compile the experts' training forward (:class:`ld3m.fast.CompiledForward`,
            one compiled function shared by all experts: compiled once per batch shape).

    Raises:
        ValueError: on bad arguments, or if ``folder`` already holds experts of another setting.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    if experts < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(f"experts, epochs and batch_size must be at least 1, got "
                         f"{experts}, {epochs} and {batch_size}")
    recorded = optimizer_settings(optimizer, rho, alpha, momentum, weight_decay)
    precision = str((trainer_kwargs or {}).get("precision") or "32-true")
    if optimizer == "gsam" and precision in FP16:  # before any training, not at its start
        raise ValueError(f"GSAM experts do not train in {precision} precision (the gradient "
                         "scaler steps without GSAM's closure); use 32-true or bf16-mixed")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data.setup("fit")
    c, h, w = data.image_shape
    info = {"network": network, "dataset": data.dataset_name, "channels": c,
            "num_classes": data.num_classes, "image_shape": [c, h, w], "epochs": epochs,
            "lr_teacher": lr_teacher, "batch_size": batch_size, "dsa": dsa,
            "zca": getattr(data, "zca_settings", None),
            "params": parameter_layout(get_network(network, c, data.num_classes, h))}
    if recorded is not None:  # absent: MTT's plain SGD (so older buffers keep resuming)
        info["optimizer"] = recorded
    if any(folder.glob("expert_*.safetensors")):
        stored = TrajectoryBuffer(folder)
        existing = {**stored.info, "optimizer": _stored_optimizer(stored.paths)}
        different = {k: (existing.get(k), info.get(k)) for k in {*info, "optimizer"}
                     if existing.get(k) != info.get(k)}
        if different:
            raise ValueError(f"{folder} holds experts of another setting ({different}); "
                             "use another folder")
    train_set = data.train_split.dataset(data)
    partial = folder / PARTIAL
    fast = CompiledForward("forward") if compile else None
    for index in range(experts):
        path = folder / shard_name(index)
        if path.exists() or index % world_size != rank:
            continue
        expert_seed = seed + 1000 * index
        model = Expert(network, c, data.num_classes, h, lr_teacher=lr_teacher, dsa=dsa,
                       seed=expert_seed, optimizer=optimizer, rho=rho, alpha=alpha,
                       momentum=momentum, weight_decay=weight_decay)
        model.fast = fast  # None, or the one compiled forward of every expert
        loader = DataLoader(train_set, batch_size=batch_size,
                            sampler=EpochShuffle(len(train_set), expert_seed + 2))
        settings = {**info, "expert": index, "seed": expert_seed}
        checkpoint = partial / f"{path.stem}.ckpt"
        resume = _resumable(checkpoint, settings)
        kwargs = {"logger": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                  **(trainer_kwargs or {})}
        saver = ModelCheckpoint(dirpath=partial, filename=path.stem, every_n_epochs=1,
                                save_top_k=1, enable_version_counter=False)
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), saver, _Settings(settings)]
        trainer = L.Trainer(max_epochs=epochs, **kwargs)
        if resume:
            log.info("expert %d: resuming from its last finished epoch (%s)", index, checkpoint)
        with warnings.catch_warnings():  # the partial folder may hold other experts' checkpoints
            warnings.filterwarnings("ignore", message=".*exists and is not empty")
            trainer.fit(model, train_dataloaders=loader,
                        ckpt_path=str(checkpoint) if resume else None)
        if len(model.snapshots) != epochs + 1:
            raise RuntimeError(f"expert {index} stopped after {len(model.snapshots) - 1} of "
                               f"{epochs} epochs; nothing was written for it")
        final_logits = None
        if logits:
            log.info("expert %d: logits on the %d training images", index, len(train_set))
            final_logits = model.logits(DataLoader(train_set, batch_size=1024, shuffle=False),
                                        progress=kwargs.get("enable_progress_bar", True) is not False)
        ExpertTrajectory(torch.stack(model.snapshots), settings, final_logits).save(path)
        checkpoint.unlink(missing_ok=True)
        log.info("expert %d/%d written to %s", index + 1, experts, path)
    if partial.is_dir() and not any(partial.iterdir()):
        try:  # another rank may be writing its expert's checkpoint there right now
            partial.rmdir()
        except OSError:
            pass
    return TrajectoryBuffer(folder) if world_size == 1 else None


def _stored_optimizer(paths: list[Path]) -> dict | None:
    """The ``optimizer`` every shard of ``paths`` records (``None``: plain SGD).

    Raises:
        ValueError: if the shards disagree.
    """
    found = [ExpertTrajectory.read_info(path).get("optimizer") for path in paths]
    for path, value in zip(paths[1:], found[1:], strict=True):
        if value != found[0]:
            raise ValueError(f"{path} has optimizer={value!r} but {paths[0].name} has "
                             f"{found[0]!r}: one buffer, one setting")
    return found[0]


class _Settings(L.Callback):
    """Records the expert's settings in its epoch checkpoints (checked before resuming)."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["ld3m_expert_settings"] = self.settings


def _resumable(checkpoint: Path, settings: dict) -> bool:
    """Whether ``checkpoint`` holds an unfinished run of this very expert.

    Raises:
        ValueError: if it holds another setting's expert (nothing is deleted).
    """
    if not checkpoint.is_file():
        return False
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (a torn or foreign file: start the expert again)
        log.warning("expert checkpoint %s is unreadable (%s); training that expert from the start",
                    checkpoint, type(err).__name__)
        return False
    if saved.get("ld3m_expert_settings") != settings:
        raise ValueError(f"{checkpoint} is an unfinished expert of another setting; delete it or "
                         "use another folder")
    return True
