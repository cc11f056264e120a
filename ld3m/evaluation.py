"""The evaluation protocol: train fresh networks on a synthetic set, test on real data.

The standard protocol, as the authors' ``evaluate_synset`` (VICO-UoE/DatasetCondensation):
SGD (momentum 0.9, weight decay 5e-4), batch 256, lr 0.01 (or the set's learned lr), ``E + 1``
epochs (``for ep in range(E + 1)``), after epoch ``E // 2 + 1`` (0-based) the lr x0.1 with a
*new* SGD optimiser (the momentum buffers dropped), DSA on every training batch (independent
per-sample draws; or DC's own non-differentiable augmentation for methods without DSA), and the
accuracy on the real test set once, at the end of training.

The DD protocol (for sets distilled by DD, chosen automatically): the set's network starts from
its initialisation family (fresh random weights, the stored ``theta_0``, or one of the stored
pre-trained networks) and takes the set's ``steps x epochs`` plain gradient steps with the
learned learning rates, exactly as during distillation (see :mod:`ld3m.unrolled`).

The GLaD protocol (``protocol="glad"``; the evaluation of GLaD's and LD3M's sets, as
``evaluate_synset`` in ``src/utils.py`` of Brian-Moser/prune_and_distill, called by
``eval_loop_ldm_encode`` in ``src/glad_utils.py``): SGD (momentum 0.9, weight decay 5e-4) at lr
0.001, VGG-11 0.0001 (their ``get_eval_lrs``; the set's learned lr is not used), batch 256
(``batch_train``), exactly ``E`` epochs (``for ep in range(Epoch)``, ``epoch_eval_train`` 1000 in
``src/shared_args.py``), DSA on every training batch; the lr per epoch is a linear warm-up over
the first ``E // 2`` epochs from 1e-7 x lr (``LinearLR(start_factor=1e-7, total_iters=E // 2)``),
then a cosine over ``E // 2`` epochs (``CosineAnnealingLR(T_max=E // 2)``), both stepped once per
epoch (:func:`glad_lr`); after every epoch an exponential moving average of the weights is
updated (``ema_pytorch.EMA(net, beta=0.995, power=1, update_after_step=0, update_every=1)``:
:func:`ema_decay`), and the real test accuracy is that of the averaged network, once at the end.

Every report also trains on ``ipc`` *random real* images per class with the same protocol, so
distilled-vs-random is always visible.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from ld3m.augment import DEFAULT_STRATEGY as DEFAULT_DSA
from ld3m.augment import DSA, DCAugment
from ld3m.datamodules.distilled import DistilledDataModule
from ld3m.datamodules.real import ZCA_INPUT, RealDataModule, describe_zca, zca_flags
from ld3m.fast import CompiledForward
from ld3m.networks import conv_backend, get_network, reset_parameters, xavier_init
from ld3m.stacked import STACK_PROTOCOLS, StackedClassifier, stackable
from ld3m.synthetic import SyntheticSet
from ld3m.unrolled import step_batches, unpack_pool, unpack_weights

#: Evaluation protocols: ``auto`` picks ``dd`` for DD sets, ``standard`` for the rest; ``glad``
#: is GLaD's and LD3M's (chosen explicitly).
PROTOCOLS = ("auto", "standard", "dd", "glad")

#: The GLaD protocol's learning rates (``get_eval_lrs`` in ``src/glad_utils.py`` of
#: Brian-Moser/prune_and_distill): 0.001 for every network but VGG-11's 0.0001.
GLAD_LR = 1e-3
GLAD_VGG_LR = 1e-4
#: Its warm-up start factor and EMA decay (``evaluate_synset`` in their ``src/utils.py``).
GLAD_WARMUP_START = 1e-7
GLAD_EMA_BETA = 0.995

log = logging.getLogger(__name__)



class Classifier(L.LightningModule):
    """A network trained with the distillation evaluation protocol.

    Args:
        network: Network name (see :func:`ld3m.networks.get_network`).
        channels: Input channels.
        num_classes: Number of classes.
        image_size: Input side length.
        lr: Initial SGD learning rate.
        epochs: The protocol's ``E``: ``E + 1`` epochs are trained, the lr x0.1 (a new optimiser,
            no momentum carried over) after epoch ``E // 2 + 1``, as the authors'.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        dsa: DSA strategy applied to every training batch ("none" to disable).
        seed: Seed of the network initialisation and the augmentation draws.
        dc_augment: DC's own augmentation (:class:`ld3m.augment.DCAugment`) of every training
            batch when ``dsa`` is off, e.g. ``crop_scale_rotate``; ``"none"`` disables it.

    The training forward runs through :attr:`fast` when it is set (a
    :class:`ld3m.fast.CompiledForward`, which :func:`evaluate` with ``compile=True`` shares
    between the networks it trains, so they compile once in all); the test forward is eager.
    """

    #: Whether the lr drops (with a new optimiser) after epoch ``E // 2 + 1``.
    drops_lr = True

    def __init__(self, network: str, channels: int, num_classes: int, image_size: int,
                 lr: float = 0.01, epochs: int = 1000, momentum: float = 0.9,
                 weight_decay: float = 5e-4, dsa: str = DEFAULT_DSA, seed: int = 0,
                 dc_augment: str = "none") -> None:
        super().__init__()
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr}")
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        self.save_hyperparameters()
        self.net = get_network(network, channels, num_classes, image_size)
        reset_parameters(self.net, torch.Generator().manual_seed(seed))
        self.dsa = DSA(dsa) if dsa not in ("", "none") else None
        self.dc_augment = DCAugment(dc_augment) if self.dsa is None else None
        self._generator = torch.Generator().manual_seed(seed + 1)
        # no sync: under DDP each rank trains its own networks, and a metric syncing on the
        # world group would pair with the other ranks' collectives (a hang)
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro", sync_on_compute=False)
        #: The compiled training forward (``None``: eager); not a submodule, no state.
        self.fast: CompiledForward | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.dsa is not None:
            x = self.dsa(x, generator=self._generator)
        elif self.dc_augment is not None and self.dc_augment.enabled:
            x = self.dc_augment(x, generator=self._generator)
        logits = self.net(x) if self.fast is None else self.fast(self.net, x)
        if y.is_floating_point():  # soft labels (logits)
            loss = torch.sum(-F.softmax(y, dim=1) * F.log_softmax(logits.float(), dim=1), dim=1).mean()
        else:
            loss = F.cross_entropy(logits.float(), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        with conv_backend(self.device):
            self.test_accuracy(self.net(x).argmax(1), y)
        self.log("test_acc", self.test_accuracy, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)

    def on_train_epoch_end(self) -> None:
        # the authors' lr_schedule = [E // 2 + 1]: after that epoch a new SGD at lr x0.1, which
        # is the same optimiser with its state (the momentum buffers) dropped
        if self.drops_lr and self.current_epoch == self.hparams.epochs // 2 + 1:
            optimizer = self.optimizers().optimizer
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] *= 0.1

    @property
    def training_epochs(self) -> int:
        """The epochs the protocol trains: ``E + 1``."""
        return self.hparams.epochs + 1


def glad_arch_lr(arch: str) -> float:
    """The GLaD protocol's learning rate of ``arch``: 0.0001 for VGG-11 (any VGG11 variant),
    0.001 otherwise (their ``get_eval_lrs``)."""
    return GLAD_VGG_LR if str(arch).lower().startswith("vgg11") else GLAD_LR


def glad_lr(epoch: int, epochs: int, lr: float) -> float:
    """The learning rate of training epoch ``epoch`` (0-based) of ``epochs`` in the GLaD protocol.

    Their loop builds ``LinearLR(start_factor=1e-7, end_factor=1, total_iters=E // 2)`` and
    ``CosineAnnealingLR(T_max=E // 2)`` on one SGD, steps the first after every epoch and, from
    the end of epoch ``E // 2`` on, the second. So epoch ``e <= E // 2`` trains at
    ``lr * (1e-7 + (1 - 1e-7) * e / (E // 2))`` (``lr`` from epoch ``E // 2``), and epoch
    ``e > E // 2`` at ``lr * (1 + cos(pi * (e - E // 2 - 1) / (E // 2))) / 2``.
    """
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    half = epochs // 2
    if epoch <= half:
        if half == 0:
            return lr * GLAD_WARMUP_START
        return lr * (GLAD_WARMUP_START + (1.0 - GLAD_WARMUP_START) * epoch / half)
    return lr * (1.0 + math.cos(math.pi * (epoch - half - 1) / half)) / 2.0


def ema_decay(update: int, beta: float = GLAD_EMA_BETA) -> float:
    """The decay of EMA update number ``update`` (1-based), as ``ema_pytorch.EMA`` with
    ``power=1, update_after_step=0, update_every=1`` (ema-pytorch 0.6.4 and later, what their
    unpinned ``requirements.txt`` installs): the first update copies the weights (0), the
    ``k``-th averages with ``min(beta, 1 - 1/k)``, so the first 200 updates are a plain mean of
    the networks seen (ema-pytorch before 0.6.4 copied at the second update as well)."""
    if update < 1:
        raise ValueError(f"update must be at least 1, got {update}")
    if update == 1:
        return 0.0
    return min(beta, 1.0 - 1.0 / update)


@torch.no_grad()
def ema_update(average: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """``average = decay * average + (1 - decay) * net`` for every floating-point parameter and
    buffer (integer buffers such as BatchNorm's batch counter are left alone, as ema-pytorch)."""
    pairs = [*zip(average.parameters(), net.parameters(), strict=True),
             *zip(average.buffers(), net.buffers(), strict=True)]
    for ours, theirs in pairs:
        if ours.is_floating_point() or ours.is_complex():
            ours.lerp_(theirs.to(ours.dtype), 1.0 - decay)


class GladClassifier(Classifier):
    """A network trained with the GLaD protocol (see the module docstring): exactly ``epochs``
    epochs, warm-up then cosine (:func:`glad_lr`, set at the start of every epoch), an EMA of
    the weights updated after every epoch (:func:`ema_decay`) and tested in place of the
    network.

    Args:
        network: Network name (see :func:`ld3m.networks.get_network`).
        channels: Input channels.
        num_classes: Number of classes.
        image_size: Input side length.
        lr: Peak SGD learning rate (the protocol's: :func:`glad_arch_lr`).
        epochs: Training epochs ``E`` (theirs: 1000).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        dsa: DSA strategy applied to every training batch ("none" to disable).
        seed: Seed of the network initialisation and the augmentation draws.
        dc_augment: DC's own augmentation when ``dsa`` is off; ``"none"`` disables it.
        ema_beta: The EMA's largest decay (theirs: 0.995).
    """

    drops_lr = False

    def __init__(self, network: str, channels: int, num_classes: int, image_size: int,
                 lr: float = GLAD_LR, epochs: int = 1000, momentum: float = 0.9,
                 weight_decay: float = 5e-4, dsa: str = DEFAULT_DSA, seed: int = 0,
                 dc_augment: str = "none", ema_beta: float = GLAD_EMA_BETA) -> None:
        if not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
        super().__init__(network, channels, num_classes, image_size, lr=lr, epochs=epochs,
                         momentum=momentum, weight_decay=weight_decay, dsa=dsa, seed=seed,
                         dc_augment=dc_augment)
        # their EMA starts as a copy of the untrained network; it is what gets tested
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
        self.ema_updates = 0

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD(self.net.parameters(), lr=glad_lr(0, hp.epochs, hp.lr),
                               momentum=hp.momentum, weight_decay=hp.weight_decay)

    def on_train_epoch_start(self) -> None:
        lr = glad_lr(self.current_epoch, self.hparams.epochs, self.hparams.lr)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = lr

    def on_train_epoch_end(self) -> None:
        self.ema_updates += 1
        ema_update(self.ema_net, self.net, ema_decay(self.ema_updates, self.hparams.ema_beta))

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        with conv_backend(self.device):
            self.test_accuracy(self.ema_net(x).argmax(1), y)
        self.log("test_acc", self.test_accuracy, on_epoch=True)

    @property
    def training_epochs(self) -> int:
        """The epochs the protocol trains: exactly ``E``."""
        return self.hparams.epochs


class UnrolledClassifier(Classifier):
    """DD's evaluation: plain gradient steps with a learned learning rate per step.

    Train it on a loader that yields the ``steps`` batches in order, for ``epochs`` epochs.

    Args:
        network: Network name (see :func:`ld3m.networks.get_network`).
        channels: Input channels.
        num_classes: Number of classes.
        image_size: Input side length.
        lrs: The learning rate of every step, in order (``epochs * steps`` values).
        initial: Initial parameters by name (default: random, from ``seed``).
        seed: Seed of the random initialisation.
    """

    drops_lr = False

    def __init__(self, network: str, channels: int, num_classes: int, image_size: int,
                 lrs: list[float], initial: dict[str, torch.Tensor] | None = None, seed: int = 0) -> None:
        super().__init__(network, channels, num_classes, image_size, lr=1.0, epochs=1, momentum=0.0,
                         weight_decay=0.0, dsa="none", seed=seed)
        if not lrs:
            raise ValueError("the DD protocol needs at least one learning rate")
        xavier_init(self.net, torch.Generator().manual_seed(seed))  # DD's random weights
        self.lrs = [float(lr) for lr in lrs]
        if initial is not None:
            names = {name for name, _ in self.net.named_parameters()}
            if set(initial) != names:
                raise ValueError(f"the stored initial weights do not fit {network} "
                                 f"(missing {sorted(names - set(initial))[:3]}, "
                                 f"unexpected {sorted(set(initial) - names)[:3]})")
            self.net.load_state_dict(initial, strict=False)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        last = len(self.lrs) - 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: self.lrs[min(i, last)])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def dd_settings(synthetic: SyntheticSet) -> dict:
    """The DD protocol's settings stored in a set (``network``, ``steps``, ``epochs``, ``init_mode``)."""
    dd = synthetic.meta.get("dd")
    if not isinstance(dd, dict) or synthetic.lr is None:
        raise ValueError(f"the {synthetic.method} set has no DD learning rates and settings; "
                         "evaluate it with the standard protocol")
    if synthetic.lr.numel() != dd["steps"] * dd["epochs"]:
        raise ValueError(f"the set stores {synthetic.lr.numel()} learning rates for "
                         f"{dd['steps']} steps x {dd['epochs']} epochs")
    return dd


@dataclass
class EvalResult:
    """Accuracies of one (set, architecture) pair over several runs."""

    name: str
    arch: str
    accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.accuracies).mean()) if self.accuracies else float("nan")

    @property
    def std(self) -> float:
        if len(self.accuracies) < 2:
            return 0.0
        return float(torch.tensor(self.accuracies).std(unbiased=False))

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.std:.2f}"


@dataclass
class EvalReport:
    """The results of :func:`evaluate`: one :class:`EvalResult` per (set, architecture)."""

    results: list[EvalResult]
    settings: dict

    def get(self, name: str, arch: str) -> EvalResult:
        for r in self.results:
            if r.name == name and r.arch == arch:
                return r
        raise KeyError((name, arch))

    def table(self) -> str:
        """A Markdown table: one row per set, one column per architecture (accuracy %, mean +- std)."""
        names = list(dict.fromkeys(r.name for r in self.results))
        archs = list(dict.fromkeys(r.arch for r in self.results))
        lines = ["| set | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
        for name in names:
            cells = [str(self.get(name, a)) for a in archs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"settings": self.settings, "results": [
            {"set": r.name, "arch": r.arch, "accuracies": r.accuracies, "mean": r.mean, "std": r.std}
            for r in self.results]}, indent=2)


def random_real_set(real: RealDataModule, ipc: int, seed: int = 0,
                    counts: Sequence[int] | None = None) -> SyntheticSet:
    """``ipc`` random real training images per class, as a synthetic set (the baseline); with
    ``counts``, ``counts[c]`` images of class ``c`` instead (a DQ fraction set's class counts)."""
    generator = torch.Generator().manual_seed(seed)
    if counts is not None and len(set(counts)) > 1:
        if len(counts) != real.num_classes:
            raise ValueError(f"counts gives {len(counts)} classes, the data has {real.num_classes}")
        parts = [real.sample_per_class(int(n), generator, classes=[c])[0]
                 for c, n in enumerate(counts)]
        labels = torch.arange(real.num_classes).repeat_interleave(torch.tensor(list(counts)))
        zca = getattr(real, "zca_settings", None)
        return SyntheticSet(torch.cat(parts), labels, real.mean, real.std, real.num_classes,
                            method="random", dataset=real.dataset_name, ipc=max(counts),
                            meta={"zca": zca} if zca is not None else {})
    images = real.sample_per_class(ipc, generator)
    labels = torch.arange(real.num_classes).repeat_interleave(ipc)
    zca = getattr(real, "zca_settings", None)
    return SyntheticSet(images.flatten(0, 1), labels, real.mean, real.std, real.num_classes,
                        method="random", dataset=real.dataset_name, ipc=ipc,
                        meta={"zca": zca} if zca is not None else {})


def check_zca(synthetic: SyntheticSet, real: RealDataModule) -> None:
    """Raise a ``ValueError`` unless ``synthetic`` and ``real`` are whitened alike (or both not)."""
    ours, theirs = synthetic.meta.get("zca"), getattr(real, "zca_settings", None)
    if ours != theirs:
        remedy = ("" if ours and ours.get("input") != ZCA_INPUT else
                  f"; evaluate it on {synthetic.dataset} with " + zca_flags(ours))
        raise ValueError(f"the synthetic set is {describe_zca(ours)} but the real data is "
                         f"{describe_zca(theirs)}{remedy}")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence the banner lines ("GPU available", tips) of the many short evaluation trainers."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNGs (layers that draw from them, e.g. dropout) for one training, and
    give the caller's RNG state back afterwards."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        yield


def trainer_device(accelerator: str = "auto",
                   device: str | torch.device | None = None) -> tuple[str, int | list[int]]:
    """``(accelerator, devices)`` of an evaluation ``Trainer``: ``device`` (e.g. this DDP rank's
    ``cuda:3``) wins over ``accelerator``; never a bare ``devices=1`` on a GPU rank other than 0
    (Lightning reads that as ``cuda:0``)."""
    if device is None:
        return accelerator, 1
    device = torch.device(device)
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    return device.type, 1


def _evaluation_trainer(max_epochs: int, accelerator: str, device: str | torch.device | None,
                        precision: str | None) -> L.Trainer:
    """A quiet single-device ``Trainer`` for one evaluation network."""
    accelerator, devices = trainer_device(accelerator, device)
    return L.Trainer(max_epochs=max_epochs, accelerator=accelerator, devices=devices,
                     precision=precision, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0)


def train_and_test(synthetic: SyntheticSet, real: RealDataModule, arch: str = "ConvNet",
                   epochs: int = 1000, lr: float | None = None, dsa: str = DEFAULT_DSA,
                   batch_size: int = 256, seed: int = 0, accelerator: str = "auto",
                   precision: str | None = None, device: str | torch.device | None = None,
                   dc_augment: str = "none", protocol: str = "standard",
                   fast: CompiledForward | None = None) -> float:
    """Train one fresh ``arch`` on ``synthetic`` with the protocol and return its real test
    accuracy (0-1) (``fast``: a compiled training forward, see :class:`Classifier`). ``standard``: ``E = epochs``, so ``epochs + 1`` epochs, lr default the set's
    learned lr, else 0.01; ``glad``: exactly ``epochs`` epochs, warm-up then cosine, the EMA
    tested, lr default :func:`glad_arch_lr` (see :class:`GladClassifier`)."""
    if protocol not in ("standard", "glad"):
        raise ValueError(f"train_and_test's protocol must be 'standard' or 'glad', got {protocol!r}")
    check_zca(synthetic, real)
    c, h, _ = synthetic.image_shape
    if protocol == "glad":
        lr = glad_arch_lr(arch) if lr is None else lr
        model: Classifier = GladClassifier(arch, c, synthetic.num_classes, h, lr=lr, epochs=epochs,
                                           dsa=dsa, seed=seed, dc_augment=dc_augment)
    else:
        if lr is None:
            lr = float(synthetic.lr.reshape(-1)[-1]) if synthetic.lr is not None else 0.01
        model = Classifier(arch, c, synthetic.num_classes, h, lr=lr, epochs=epochs, dsa=dsa,
                           seed=seed, dc_augment=dc_augment)
    model.fast = fast
    data = DistilledDataModule(synthetic, batch_size=batch_size, real=real, seed=seed + 2)
    with _quiet_lightning(), _seeded(seed + 3):
        trainer = _evaluation_trainer(model.training_epochs, accelerator, device, precision)
        trainer.fit(model, datamodule=data)
        (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return float(metrics["test_acc"])


#: Protocol epochs per Lightning step of a stacked evaluation (Lightning's per-step machinery is
#: then paid once per this many epochs).
STACK_EPOCHS_PER_STEP = 10


def train_and_test_stacked(synthetics: list[SyntheticSet], real: RealDataModule,
                           arch: str = "ConvNet", epochs: int = 1000, lr: float | None = None,
                           dsa: str = DEFAULT_DSA, batch_size: int = 256,
                           seeds: list[int] | tuple[int, ...] = (0,), accelerator: str = "auto",
                           precision: str | None = None, device: str | torch.device | None = None,
                           dc_augment: str = "none",
                           epochs_per_step: int = STACK_EPOCHS_PER_STEP) -> list[float]:
    """Train ``len(seeds)`` fresh ``arch`` networks at once (:class:`ld3m.stacked.StackedClassifier`,
    one ``Trainer``) with the standard protocol and return their real test accuracies (0-1), in
    order: network ``k`` as :func:`train_and_test` with ``seed=seeds[k]`` (its initialisation,
    minibatch order and augmentation draws), up to float rounding.

    Architectures with BatchNorm (see :func:`ld3m.stacked.stackable`) are not stacked: their
    networks train one after the other with :func:`train_and_test`.

    Args:
        synthetics: The training set of every network (``len(seeds)`` sets, e.g. the baseline's
            random draws, all of one size), or one set shared by all.
        real: The real dataset (its test split is the test set).
        arch: Architecture.
        epochs: The protocol's ``E`` (``E + 1`` epochs).
        lr: Learning rate (default: the sets' learned lr, else 0.01; it must be the same for all).
        dsa: DSA strategy ("none" to disable).
        batch_size: Minibatch size.
        seeds: Every network's seed.
        accelerator: Lightning accelerator.
        precision: Lightning precision.
        device: Train on this device (default: ``accelerator``'s).
        dc_augment: DC's augmentation when ``dsa`` is off.
        epochs_per_step: Protocol epochs per Lightning step.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_and_test_stacked needs at least one seed")
    if len(synthetics) not in (1, len(seeds)):
        raise ValueError(f"need one set or one per network ({len(seeds)}), got {len(synthetics)}")
    for one in synthetics:
        check_zca(one, real)
    first = synthetics[0]
    c, h, _ = first.image_shape
    if not stackable(arch, c, first.num_classes, h):
        log.debug("%s has BatchNorm: its %d networks train one at a time", arch, len(seeds))
        return [train_and_test(synthetics[k % len(synthetics)], real, arch, epochs=epochs, lr=lr,
                               dsa=dsa, batch_size=batch_size, seed=seed, accelerator=accelerator,
                               precision=precision, device=device, dc_augment=dc_augment)
                for k, seed in enumerate(seeds)]
    if lr is None:
        lrs = {float(one.lr.reshape(-1)[-1]) if one.lr is not None else 0.01 for one in synthetics}
        if len(lrs) > 1:
            raise ValueError(f"the stacked networks must share their lr, the sets have {sorted(lrs)}")
        (lr,) = lrs
    datasets = [one.as_dataset().tensors for one in synthetics]
    if len({(tuple(x.shape), tuple(y.shape), y.dtype) for x, y in datasets}) > 1:
        raise ValueError("the sets of stacked networks must have the same images and label shapes")
    if len(datasets) == 1 or all(one is first for one in synthetics):
        images, targets = datasets[0]
    else:
        images = torch.stack([x for x, _ in datasets])
        targets = torch.stack([y for _, y in datasets])
    model = StackedClassifier(arch, c, first.num_classes, h, seeds, images, targets, lr=lr,
                              epochs=epochs, dsa=dsa, dc_augment=dc_augment,
                              batch_size=batch_size, epochs_per_step=epochs_per_step)
    with _quiet_lightning(), _seeded(seeds[0] + 3):
        trainer = _evaluation_trainer(1, accelerator, device, precision)
        trainer.fit(model)
        trainer.test(model, dataloaders=real.test_dataloader(), verbose=False)
    return model.accuracies()


def _stacks(jobs: list[tuple], mine: list[int], stack: int) -> list[list[int]]:
    """``mine`` (job indices, in order) cut into runs of at most ``stack`` consecutive jobs of
    one (architecture, row, set)."""
    groups: list[list[int]] = []
    for j in mine:
        if groups and len(groups[-1]) < stack and jobs[groups[-1][0]][:2] == jobs[j][:2] \
                and jobs[groups[-1][0]][3] == jobs[j][3]:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups


def train_and_test_dd(synthetic: SyntheticSet, real: RealDataModule, seed: int = 0, run: int = 0,
                      accelerator: str = "auto", precision: str | None = None,
                      device: str | torch.device | None = None) -> float:
    """Train the set's network with DD's protocol (run ``run``) and return its test accuracy (0-1)."""
    dd = dd_settings(synthetic)
    initial = None
    if dd["init_mode"] in ("fixed", "fixed_pretrained"):
        initial = unpack_weights(synthetic.extra, "theta0")
    elif dd["init_mode"] == "random_pretrained":
        pool = unpack_pool(synthetic.extra)
        initial = pool[run % len(pool)] if pool else {}
    if initial is not None and not initial:
        raise ValueError(f"the DD set ({dd['init_mode']} init) stores no initial weights")
    c, h, _ = synthetic.image_shape
    model = UnrolledClassifier(dd["network"], c, synthetic.num_classes, h,
                               lrs=synthetic.lr.reshape(-1).tolist(), initial=initial, seed=seed)
    batches = step_batches(synthetic.images.detach().float().cpu(), synthetic.num_classes, dd["steps"])
    with _quiet_lightning(), _seeded(seed + 3):
        trainer = _evaluation_trainer(dd["epochs"], accelerator, device, precision)
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
        (metrics,) = trainer.test(model, dataloaders=real.test_dataloader(), verbose=False)
    return float(metrics["test_acc"])


def _all_gather_accuracies(local: dict[int, float], world_size: int) -> dict[int, float]:
    """Every rank's ``{network index: accuracy}``, merged (one ``all_gather_object``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"evaluate(world_size={world_size}) needs an initialised process group "
                         "(call it from every rank of a DDP run)")
    gathered: list[dict[int, float] | None] = [None] * world_size
    dist.all_gather_object(gathered, local)
    merged: dict[int, float] = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def dc_augment_for(dataset: str, arch: str) -> str:
    """The authors' ``get_daparam``: DC's augmentation for training ``arch`` on a non-DSA set of
    ``dataset``: ``crop_noise`` for a BatchNorm ConvNet, ``crop_scale_rotate`` on MNIST, else
    none (their code then trains 1000 epochs instead of 300)."""
    if arch.lower() == "convnetbn":
        return "crop_noise"
    return "crop_scale_rotate" if dataset == "MNIST" else "none"


def evaluate(synthetic: SyntheticSet | list[SyntheticSet] | None, real: RealDataModule,
             archs: list[str] | tuple[str, ...] = ("ConvNet",), runs: int = 20,
             epochs: int | None = None, lr: float | None = None, dsa: str = "auto",
             baseline: bool = True, ipc: int | None = None, seed: int = 0,
             accelerator: str = "auto", precision: str | None = None,
             protocol: str = "auto", progress: bool = True, device: str | torch.device | None = None,
             rank: int = 0, world_size: int = 1, dc_augment: str = "none",
             batch_size: int = 256, stack: int = 0, compile: bool = False) -> EvalReport:
    """Evaluate a synthetic set (or several) and the random-real baseline over fresh networks.

    Args:
        synthetic: The distilled set, or several sets of one method and IPC (the papers' ``num_exp``
            distilled sets: their networks are pooled into one row, mean and std over all of
            them), or ``None`` to evaluate only the baseline.
        real: The real dataset (its test split is the test set; its train split feeds the baseline).
        archs: Architectures to train.
        runs: Fresh networks per (set, architecture) (the DC/DM papers' ``num_eval``: 20).
        epochs: The protocol's ``E`` (``E + 1`` epochs are trained, as the authors'; ``glad``:
            exactly ``E``); ``None``: theirs, per network: 1000 with augmentation (DSA or DC's),
            300 without (``glad``: 1000).
        lr: Learning rate (default: the set's learned lr, else 0.01; ``glad``: 0.001, VGG-11
            0.0001, for the set and the baseline alike).
        dsa: DSA strategy during training ("none" to disable); ``"auto"``: the authors' per
            method, DSA's full strategy for every set but DC's, which gets none and DC's own
            augmentation (``dc_augment="auto"``).
        baseline: Also evaluate ``ipc`` random real images per class (a new draw each run).
        ipc: Images per class of the baseline (default: the set's IPC).
        seed: Base seed of networks, augmentation and baseline draws.
        accelerator: Lightning accelerator for the evaluation trainers.
        precision: Lightning precision for the evaluation trainers.
        protocol: ``standard``, ``dd`` (DD's unrolled protocol; ``archs``, ``epochs``, ``lr`` and
            ``dsa`` are then the set's own), ``glad`` (GLaD's and LD3M's: warm-up then cosine,
            EMA 0.995, lr 0.001 / VGG-11 0.0001; see the module docstring) or ``auto`` (``dd``
            for sets that carry DD settings, else ``standard``).
        progress: Show a progress bar (one tick per trained network, with its accuracy) on
            stderr; every network is also logged on the ``ld3m.evaluation`` logger.
        device: Train on this device (e.g. a DDP rank's ``cuda:3``; default: ``accelerator``'s).
        rank: This process's index among ``world_size`` processes sharing the work.
        world_size: With more than one, the networks are spread over the processes (network
            ``j`` of the list ordered by architecture, set and run trains on rank
            ``j % world_size``) and their accuracies all-gathered: every process must call
            :func:`evaluate` with the same arguments, and every one returns the whole report.
            The same seeds give the same report whatever ``world_size``.
        dc_augment: DC's own augmentation of the training batches when ``dsa`` is ``none``
            (:class:`ld3m.augment.DCAugment`): a strategy such as ``crop_scale_rotate``,
            ``"auto"`` for the authors' choice per dataset and network (:func:`dc_augment_for`),
            or ``"none"``.
        batch_size: Minibatch of the evaluation training (the DC/DM/MTT protocol's 256; DATM's
            recipes 128).
        stack: ``0`` or ``1``: every network trains alone (its own ``Trainer``); ``N > 1``: up to
            ``N`` networks of one architecture and set (the baseline: its runs' draws) train
            at once as one stacked model (:func:`train_and_test_stacked`), each with the seeds,
            batches and augmentation it would have had alone, so the same accuracies up to float
            rounding. The standard protocol only (``glad`` and ``dd`` always train one network
            at a time), and not for BatchNorm networks (see :mod:`ld3m.stacked`). Ranks stack
            the networks they own (network ``j`` still trains on rank ``j % world_size``).
        compile: Run the networks' training forward through ``torch.compile``
            (:class:`ld3m.fast.CompiledForward`, one per architecture shared by its networks:
            compiled once per batch shape, tens of seconds on a CPU; eager where compiling
            fails); the standard and glad protocols, one network at a time (not with ``stack``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    many = [] if synthetic is None else list(synthetic) if isinstance(synthetic, list | tuple) else [synthetic]
    if len({(s.method, s.ipc, s.dataset) for s in many}) > 1:
        raise ValueError("the sets evaluated together must share their method, IPC and dataset, "
                         f"got {sorted({(s.method, s.ipc, s.dataset) for s in many})}")
    first = many[0] if many else None
    if protocol == "auto":
        protocol = "dd" if first is not None and "dd" in first.meta else "standard"
    if protocol == "dd":
        if first is None:
            raise ValueError("the DD protocol needs a DD synthetic set")
        dd = dd_settings(first)
        if list(archs) != [dd["network"]]:
            log.warning("DD protocol: training %s (the set's network), not %s",
                        dd["network"], ", ".join(archs))
        archs = [dd["network"]]
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if stack < 0:
        raise ValueError(f"stack must be 0 (no stacking) or more, got {stack}")
    if first is None and not baseline:
        raise ValueError("nothing to evaluate: no synthetic set and baseline=False")
    for one in many:
        if one.dataset not in ("unknown", real.dataset_name):
            raise ValueError(f"the synthetic set was distilled from {one.dataset}, "
                             f"not {real.dataset_name}")
        check_zca(one, real)
    # a DQ fraction set keeps round(F x len(bin)) images of each class: its baseline draws as
    # many of each class (an explicit ipc draws ipc of every class instead)
    counts = None if ipc or first is None else (first.meta.get("dq") or {}).get("class_counts")
    counts = list(counts) if counts and len(set(counts)) > 1 else None
    ipc = ipc or (first.ipc if first is not None else 0)
    if baseline and ipc < 1:
        raise ValueError("the random-real baseline needs ipc >= 1")
    if dsa == "auto":  # the authors' evaluation per method: DC alone trains without DSA
        dc_set = first is not None and first.method == "DC" and protocol != "glad"
        dsa = "none" if dc_set else DEFAULT_DSA
        dc_augment = "auto" if dc_set and dc_augment == "none" else dc_augment
    augments = {arch: dc_augment_for(real.dataset_name, arch) if dc_augment == "auto" else dc_augment
                for arch in archs}
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    arch_epochs = {arch: epochs if epochs is not None else (
        1000 if protocol == "glad" or dsa not in ("", "none") or augments[arch] != "none" else 300)
        for arch in archs}
    arch_lrs = {arch: lr if lr is not None else glad_arch_lr(arch) for arch in archs}
    sets: list[tuple[str, SyntheticSet | None, int]] = []  # (row, set, index among the row's)
    if baseline:
        sets.append((f"random real (IPC {ipc})", None, 0))
    if first is not None:
        name = f"{first.method} (IPC {first.ipc}{f', {len(many)} sets' if len(many) > 1 else ''})"
        sets += [(name, one, k) for k, one in enumerate(many)]
    jobs = [(arch, name, syn, k, run) for arch in archs for name, syn, k in sets
            for run in range(runs)]
    mine = [j for j in range(len(jobs)) if j % world_size == rank]
    where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    bar = tqdm(total=len(mine), desc=f"evaluation{where}", unit="network", disable=not progress,
               leave=False)
    accuracies: dict[int, float] = {}
    fast = {arch: CompiledForward("forward") for arch in archs} if compile else {}
    for group in _stacks(jobs, mine, stack if protocol in STACK_PROTOCOLS else 1):
        arch, name, syn, k, _ = jobs[group[0]]
        net_seeds = [seed + jobs[j][4] + 1000 * k for j in group]
        datas = [syn if syn is not None else random_real_set(real, ipc, seed=seed + 7919 * jobs[j][4],
                                                             counts=counts)
                 for j in group]
        if len(group) > 1:  # the standard protocol, several networks at once
            accs = train_and_test_stacked(
                datas if syn is None else [syn], real, arch, epochs=arch_epochs[arch],
                lr=lr if syn is not None else 0.01, dsa=dsa, seeds=net_seeds,
                accelerator=accelerator, precision=precision, device=device,
                dc_augment=augments[arch], batch_size=batch_size)
        elif protocol == "dd":  # the baseline gets the set's learned steps and initial weights
            data = datas[0] if syn is not None else replace(
                datas[0], lr=first.lr, extra=first.extra, meta=first.meta)
            accs = [train_and_test_dd(data, real, seed=net_seeds[0], run=jobs[group[0]][4],
                                      accelerator=accelerator, precision=precision, device=device)]
        elif protocol == "glad":  # the set and the baseline: the same lr, schedule and EMA
            accs = [train_and_test(datas[0], real, arch, epochs=arch_epochs[arch],
                                   lr=arch_lrs[arch], dsa=dsa, seed=net_seeds[0],
                                   accelerator=accelerator, precision=precision, device=device,
                                   dc_augment=augments[arch], batch_size=batch_size,
                                   protocol="glad", fast=fast.get(arch))]
        else:
            accs = [train_and_test(datas[0], real, arch, epochs=arch_epochs[arch],
                                   lr=lr if syn is not None else 0.01, dsa=dsa,
                                   seed=net_seeds[0], accelerator=accelerator,
                                   precision=precision, device=device, dc_augment=augments[arch],
                                   batch_size=batch_size, fast=fast.get(arch))]
        for j, acc in zip(group, accs, strict=True):
            run = jobs[j][4]
            accuracies[j] = acc
            which = f", set {k + 1}" if syn is not None and len(many) > 1 else ""
            log.info("%s on %s%s, run %d/%d%s: %.2f%%", arch, name, which, run + 1, runs, where,
                     100 * acc)
            bar.set_postfix_str(f"{arch} on {name}: {100 * acc:.2f}%")
            bar.update()
    bar.close()
    if world_size > 1:
        accuracies = _all_gather_accuracies(accuracies, world_size)
    results = []
    for arch in archs:
        for name in dict.fromkeys(row for row, _, _ in sets):
            results.append(EvalResult(name, arch, [accuracies[j] for j, job in enumerate(jobs)
                                                   if job[0] == arch and job[1] == name]))
    settings = {"archs": list(archs), "runs": runs, "epochs": arch_epochs, "dsa": dsa, "ipc": ipc,
                "dataset": real.dataset_name, "precision": precision, "protocol": protocol,
                "sets": len(many), "dc_augment": augments, "batch_size": batch_size}
    if counts is not None and baseline:
        settings["baseline_counts"] = counts
    if protocol == "glad":
        settings.update(lr=arch_lrs, ema=GLAD_EMA_BETA, protocol_note=(
            f"{runs} x GLaD protocol (E epochs, linear warm-up over E // 2 then cosine, "
            f"EMA {GLAD_EMA_BETA} of the weights tested)"))
    if protocol == "dd":
        settings.update(epochs=dd["epochs"], dsa="none", protocol_note=(
            f"{runs} x DD protocol ({dd['steps']} steps x {dd['epochs']} epochs, learned lrs, "
            f"{dd['init_mode']} init)"))
    return EvalReport(results, settings)
