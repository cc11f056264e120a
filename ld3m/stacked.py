"""Many evaluation networks trained at once, as one stacked (vmapped) model.

The standard evaluation protocol (:class:`ld3m.evaluation.Classifier`) trains one fresh network
per run; its networks are tiny and a distilled set is a handful of images, so one network per
``Trainer`` leaves a GPU (and, at one image per class, even a CPU core) mostly idle and pays
Lightning's per-epoch machinery ``E + 1`` times per network. :class:`StackedClassifier` trains
``K`` networks of one architecture together: their parameters are stacked along a new leading
dimension (:func:`torch.func.stack_module_state`) and the network runs once per minibatch for all
of them (:func:`torch.func.functional_call` under :func:`torch.vmap`).

Every network keeps what it would have had alone, with the seeds of
:func:`ld3m.evaluation.train_and_test`'s network ``seed``:

* its initialisation: :func:`ld3m.networks.reset_parameters` with ``Generator(seed)``;
* its minibatch order: a shuffling ``DataLoader`` with ``Generator(seed + 2)``, iterated once per
  epoch, as :class:`ld3m.datamodules.distilled.DistilledDataModule` (``seed=seed + 2``) with
  the same batch size, so network ``k`` sees exactly the batches it would have seen;
* its augmentation: DSA (or DC's augmentation) drawn from its own ``Generator(seed + 1)``, applied
  to its own batch;
* its optimiser state: SGD with momentum and weight decay is elementwise, so one SGD over the
  stacked parameters *is* ``K`` SGDs (each slice has its own momentum buffer slice); the lr drop
  after epoch ``E // 2 + 1`` clears the state and scales the lr for all of them, as each
  network's own drop would. The summed loss gives each slice its own network's gradient.

So network ``k`` of a stack follows the sequential ``Classifier`` with its seed up to float
rounding (a batched convolution may sum in another order).

Lightning's per-epoch machinery (epoch hooks, dataloader set-up, loop bookkeeping: several ms per
epoch, against well under a millisecond for one step of a small network on a GPU) is paid once:
the whole protocol is one Lightning epoch whose every step trains ``epochs_per_step`` protocol
epochs (all their minibatches) with manual optimisation.

Limits:

* Networks with BatchNorm (``ConvNetBN``, ``AlexNetBN``, ``VGG11BN``, ``ResNet18BN``, ...) are
  not stacked: their running statistics are updated in place, which the stacked model does not
  carry per network; :func:`stackable` says no and :func:`ld3m.evaluation.evaluate` trains them
  one by one (the sequential path).
* Only the standard protocol is stacked: the GLaD protocol (per-epoch schedule and an EMA) and
  DD's unrolled protocol (learned per-step lrs, stored initial weights) keep the sequential path.
* The ``K`` networks share one learning rate (the networks of one set, or of the random-real
  baseline, do).
* With ``precision="16-mixed"`` one gradient scaler serves the stack: a step with non-finite
  gradients in any network is skipped for all of them (alone, only that network would skip).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ld3m.augment import DEFAULT_STRATEGY as DEFAULT_DSA
from ld3m.augment import DSA, DCAugment
from ld3m.networks import conv_backend, get_network, has_batchnorm, reset_parameters

__all__ = ["StackedClassifier", "StackedEpochs", "stackable"]

log = logging.getLogger(__name__)

#: The evaluation protocols that can be stacked.
STACK_PROTOCOLS = ("standard",)


def stackable(network: str, channels: int, num_classes: int, image_size: int) -> bool:
    """Whether ``network`` can be trained as a stack: every network without BatchNorm.

    Args:
        network: Network name (see :func:`ld3m.networks.get_network`).
        channels: Input channels.
        num_classes: Number of classes.
        image_size: Input side length.
    """
    with torch.device("meta"):
        net = get_network(network, channels, num_classes, image_size)
    return not has_batchnorm(net)


def _indices(batch: list[int]) -> torch.Tensor:
    return torch.tensor(batch, dtype=torch.long)


def _loader_orders(size: int, batch_size: int, generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """Every epoch's batches of a shuffling ``DataLoader(range(size), batch_size,
    shuffle=True, generator=generator)``, one epoch per item (the reference)."""
    loader = DataLoader(range(size), batch_size=batch_size, shuffle=True, generator=generator,
                        collate_fn=_indices)
    while True:
        yield list(loader)


def _direct_orders(size: int, batch_size: int, generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """The same batches as :func:`_loader_orders` drawn directly (a tenth of the time): per epoch
    the loader iterator's base seed (one int64), the sampler's permutation, and the second
    ``randperm`` its ``RandomSampler`` draws (and drops) on running out."""
    while True:
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(size, generator=generator)
        torch.randperm(size, generator=generator)
        yield list(order.split(batch_size))


def _direct_matches_loader(size: int, batch_size: int, epochs: int = 3) -> bool:
    """Whether :func:`_direct_orders` reproduces the installed torch's ``DataLoader``."""
    ours = _direct_orders(size, batch_size, torch.Generator().manual_seed(12345))
    theirs = _loader_orders(size, batch_size, torch.Generator().manual_seed(12345))
    for _ in range(epochs):
        a, b = next(ours), next(theirs)
        if len(a) != len(b) or not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
            return False
    return True


class StackedEpochs:
    """The training schedule of a stack as Lightning steps: every item is a list of
    ``(epoch, indices)`` minibatches, ``indices`` ``(K, b)`` the images of every network's batch,
    covering ``epochs_per_step`` protocol epochs (the last item fewer).

    Network ``k``'s indices are those of a shuffling ``DataLoader`` over ``size`` items seeded
    with ``Generator(seeds[k])`` and iterated once per epoch, exactly as the ``DataLoader`` of
    :class:`ld3m.datamodules.distilled.DistilledDataModule` (``seed=seeds[k]``): same
    permutations, same batches. They are drawn directly from the generator (the loader's own
    draws, checked once against a real ``DataLoader``; if the installed torch draws otherwise,
    real loaders serve them). Every iteration starts again from the seeds.

    Args:
        size: Images in the set.
        batch_size: Minibatch size.
        seeds: Shuffling seed of every network.
        epochs: Protocol epochs to cover.
        epochs_per_step: Protocol epochs per item.
    """

    def __init__(self, size: int, batch_size: int, seeds: list[int], epochs: int,
                 epochs_per_step: int = 1) -> None:
        for name, value in (("size", size), ("batch_size", batch_size), ("epochs", epochs),
                            ("epochs_per_step", epochs_per_step)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not seeds:
            raise ValueError("StackedEpochs needs at least one seed")
        self.size, self.batch_size, self.seeds = size, batch_size, [int(s) for s in seeds]
        self.epochs, self.epochs_per_step = epochs, epochs_per_step
        self.direct = _direct_matches_loader(size, batch_size)
        if not self.direct:
            log.debug("torch's DataLoader draws its order differently: stacked evaluation "
                      "iterates real DataLoaders")

    def __len__(self) -> int:
        return math.ceil(self.epochs / self.epochs_per_step)

    def __iter__(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        orders = _direct_orders if self.direct else _loader_orders
        streams = [orders(self.size, self.batch_size, torch.Generator().manual_seed(seed))
                   for seed in self.seeds]
        for start in range(0, self.epochs, self.epochs_per_step):
            steps = []
            for epoch in range(start, min(start + self.epochs_per_step, self.epochs)):
                batches = [next(stream) for stream in streams]  # one epoch of every network
                steps += [(epoch, torch.stack(batch)) for batch in zip(*batches, strict=True)]
            yield steps


class StackedClassifier(L.LightningModule):
    """``K`` networks of one architecture trained with the standard evaluation protocol at once
    (see the module docstring), each as :class:`ld3m.evaluation.Classifier` with its seed.

    Train it with ``Trainer(max_epochs=1)``: :meth:`train_dataloader` serves the whole protocol
    (``E + 1`` epochs) as one Lightning epoch. Test it on real batches ``(x, y)``: every network
    is scored; :meth:`accuracies` returns their accuracies after ``Trainer.test``.

    Args:
        network: Network name (see :func:`ld3m.networks.get_network`); no BatchNorm
            (:func:`stackable`).
        channels: Input channels.
        num_classes: Number of classes.
        image_size: Input side length.
        seeds: Every network's seed (``K`` of them): its initialisation ``seed``, augmentation
            draws ``seed + 1`` and minibatch order ``seed + 2``, as
            :func:`ld3m.evaluation.train_and_test`.
        images: The training images: ``(N, C, H, W)`` shared by every network, or
            ``(K, N, C, H, W)``, one set per network (e.g. the random-real baseline's draws).
        targets: Their labels, ``(N,)`` class indices or ``(N, num_classes)`` soft-label logits,
            with a leading ``K`` when ``images`` has one.
        lr: Initial SGD learning rate (shared).
        epochs: The protocol's ``E``: ``E + 1`` epochs, the lr x0.1 and the momentum dropped
            after epoch ``E // 2 + 1``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        dsa: DSA strategy applied to every training batch ("none" to disable).
        dc_augment: DC's augmentation of every training batch when ``dsa`` is off.
        batch_size: Minibatch size.
        epochs_per_step: Protocol epochs per Lightning step (their minibatches run in one
            :meth:`training_step`).
        record_losses: Keep every minibatch's per-network losses in :attr:`losses`
            (``(epoch, (K,) tensor)``; a device-to-host copy per minibatch: for tests).
    """

    def __init__(self, network: str, channels: int, num_classes: int, image_size: int,
                 seeds: list[int], images: torch.Tensor, targets: torch.Tensor,
                 lr: float = 0.01, epochs: int = 1000, momentum: float = 0.9,
                 weight_decay: float = 5e-4, dsa: str = DEFAULT_DSA, dc_augment: str = "none",
                 batch_size: int = 256, epochs_per_step: int = 1,
                 record_losses: bool = False) -> None:
        super().__init__()
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr}")
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        if batch_size < 1 or epochs_per_step < 1:
            raise ValueError(f"batch_size and epochs_per_step must be at least 1, got "
                             f"{batch_size} and {epochs_per_step}")
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("StackedClassifier needs at least one seed (one network)")
        if not stackable(network, channels, num_classes, image_size):
            raise ValueError(f"{network} has BatchNorm and cannot be stacked; train it with "
                             "ld3m.evaluation.Classifier")
        per_network = images.dim() == 5
        if images.dim() not in (4, 5) or (per_network and images.shape[0] != len(seeds)):
            raise ValueError(f"images must be (N, C, H, W) or ({len(seeds)}, N, C, H, W), got "
                             f"{tuple(images.shape)}")
        if targets.shape[:1 + per_network] != images.shape[:1 + per_network]:
            raise ValueError(f"targets {tuple(targets.shape)} do not fit images "
                             f"{tuple(images.shape)}")
        if tuple(images.shape[-3:]) != (channels, image_size, image_size):
            raise ValueError(f"images {tuple(images.shape)} are not {channels}x{image_size}x"
                             f"{image_size}")
        self.save_hyperparameters(ignore=["images", "targets", "record_losses"])
        self.automatic_optimization = False
        nets = [reset_parameters(get_network(network, channels, num_classes, image_size),
                                 torch.Generator().manual_seed(seed)) for seed in seeds]
        params, buffers = torch.func.stack_module_state(nets)
        self._names = list(params)
        self._buffer_names = list(buffers)
        self.weights = nn.ParameterList([nn.Parameter(params[n]) for n in self._names])
        for i, name in enumerate(self._buffer_names):
            self.register_buffer(f"_stacked_buffer_{i}", buffers[name])
        # the architecture without weights: functional_call swaps the stacked slices in; kept
        # out of the module tree so Lightning neither moves nor counts it
        object.__setattr__(self, "_skeleton", copy.deepcopy(nets[0]).to("meta"))
        self.register_buffer("images", images.detach().float().clone(), persistent=False)
        self.register_buffer("targets", targets.detach().clone(), persistent=False)
        self.per_network = per_network
        self.dsa = DSA(dsa) if dsa not in ("", "none") else None
        self.dc_augment = DCAugment(dc_augment) if self.dsa is None else None
        self._generators = [torch.Generator().manual_seed(seed + 1) for seed in seeds]
        self._epoch = -1
        self.record_losses = record_losses
        self.losses: list[tuple[int, torch.Tensor]] = []
        self.register_buffer("_correct", torch.zeros(len(seeds), dtype=torch.long),
                             persistent=False)
        self.register_buffer("_seen", torch.zeros((), dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------------------ the stack
    @property
    def size(self) -> int:
        """``K``, the networks in the stack."""
        return len(self.hparams.seeds)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params = dict(zip(self._names, self.weights, strict=True))
        buffers = {name: getattr(self, f"_stacked_buffer_{i}")
                   for i, name in enumerate(self._buffer_names)}
        return params, buffers

    def _call(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self._skeleton, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every network's logits: ``x`` ``(B, C, H, W)`` shared, or ``(K, B, C, H, W)`` one batch
        per network; returns ``(K, B, num_classes)``."""
        self._skeleton.train(self.training)
        params, buffers = self._state()
        shared = x.dim() == 4
        return torch.vmap(self._call, in_dims=(0, 0, None if shared else 0))(params, buffers, x)

    def network(self, k: int) -> nn.Module:
        """Network ``k`` of the stack as a plain module (a copy of its current weights)."""
        if not 0 <= k < self.size:
            raise ValueError(f"the stack has {self.size} networks, got k={k}")
        hp = self.hparams
        net = get_network(hp.network, hp.channels, hp.num_classes, hp.image_size)
        params, buffers = self._state()
        state = {name: value[k].detach().clone() for name, value in {**params, **buffers}.items()}
        net.load_state_dict(state)
        return net.to(self.device)

    # --------------------------------------------------------------------------------- training
    def train_dataloader(self) -> StackedEpochs:
        """The whole protocol (``E + 1`` epochs) as one Lightning epoch of index batches."""
        hp = self.hparams
        return StackedEpochs(self.images.shape[-4], hp.batch_size, [s + 2 for s in hp.seeds],
                             self.training_epochs, hp.epochs_per_step)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Every network's batch ``x[k]`` augmented with its own generator, as alone."""
        if self.dsa is not None:
            return torch.stack([self.dsa(x[k], generator=g) for k, g in enumerate(self._generators)])
        if self.dc_augment is not None and self.dc_augment.enabled:
            return torch.stack([self.dc_augment(x[k], generator=g)
                                for k, g in enumerate(self._generators)])
        return x

    def _losses(self, params: dict, buffers: dict, x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        logits = self._call(params, buffers, x)
        if y.is_floating_point():  # soft labels (logits)
            return torch.sum(-F.softmax(y, dim=1) * F.log_softmax(logits.float(), dim=1), dim=1).mean()
        return F.cross_entropy(logits.float(), y)

    def _begin_epoch(self, epoch: int) -> None:
        """The authors' lr_schedule = [E // 2 + 1]: after that epoch a new SGD at lr x0.1 (the
        momentum buffers dropped), as :meth:`ld3m.evaluation.Classifier.on_train_epoch_end`."""
        if epoch == self._epoch:
            return
        if epoch == self.hparams.epochs // 2 + 2:
            optimizer = self.optimizers().optimizer
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        self._epoch = epoch

    def on_train_start(self) -> None:
        self._epoch = -1
        self.losses = []
        self._generators = [torch.Generator().manual_seed(s + 1) for s in self.hparams.seeds]

    def training_step(self, batch: list[tuple[int, torch.Tensor]], batch_idx: int) -> None:
        optimizer = self.optimizers()
        rows = torch.arange(self.size, device=self.device)[:, None]
        self._skeleton.train(True)
        losses = None
        for epoch, index in batch:
            self._begin_epoch(int(epoch))
            index = index.to(self.device)
            if self.per_network:  # network k's batch from its own set
                x, y = self.images[rows, index], self.targets[rows, index]
            else:
                x, y = self.images[index], self.targets[index]
            x = self._augment(x)
            params, buffers = self._state()
            losses = torch.vmap(self._losses)(params, buffers, x, y)
            optimizer.zero_grad()
            self.manual_backward(losses.sum())  # each slice gets its own network's gradient
            optimizer.step()
            if self.record_losses:
                self.losses.append((int(epoch), losses.detach().cpu()))
        if losses is not None:
            self.log("train_loss", losses.detach().mean(), prog_bar=True)

    # ---------------------------------------------------------------------------------- testing
    def on_test_epoch_start(self) -> None:
        self._correct.zero_()
        self._seen.zero_()

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        with conv_backend(self.device):
            predictions = self(x).argmax(-1)
        self._correct += (predictions == y).sum(1)
        self._seen += y.numel()

    def accuracies(self) -> list[float]:
        """Every network's accuracy (0-1) over the last test, in float32 as torchmetrics'
        micro accuracy (so the numbers equal the sequential ``Classifier``'s)."""
        if int(self._seen) == 0:
            raise ValueError("no test batches seen: run Trainer.test first")
        return (self._correct.float() / self._seen.float()).tolist()

    @property
    def training_epochs(self) -> int:
        """The epochs the protocol trains: ``E + 1``."""
        return self.hparams.epochs + 1
