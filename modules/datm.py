"""DATM: difficulty-aligned trajectory matching (Guo et al., ICLR 2024).

MTT (see :mod:`ld3m.modules.mtt`) plus:

1. *Sequential generation*: start epochs come from ``[min_start_epoch, upper)`` where ``upper``
   grows linearly from ``current_max_start_epoch`` to ``max_start_epoch`` over
   ``expansion_end`` steps (the :class:`ld3m.callbacks.StartEpochSchedule` callback, added by
   :meth:`DATM.configure_callbacks`; ``current_max_start_epoch=None`` switches it off);
2. *soft labels*: one learnable logit vector per synthetic image, initialised, as the authors'
   ``distill/DATM.py``, to the mean over every expert of the buffer that classifies the image
   correctly (at its final epoch) of that expert's logits; the student's steps use the soft
   cross-entropy against their softmax, and the logits are trained too (SGD ``lr_y``, momentum
   0.9);
3. images start, with ``init="correct"`` (their ``pix_init: samples_predicted_correctly``,
   the default), from real images that expert 0 classifies correctly (its logits on the
   training set: the buffer's stored ones, ``ld3m buffer --logits true``, else computed once
   with its final parameters and stored back); with ``init="real"`` (their ``pix_init: real``,
   e.g. ``configs/CIFAR-100/ConvIN/IPC50.yaml``) from random real images, the soft labels then
   starting as expert 0's final logits on them (``buffer[0][-1]`` in their ``distill/DATM.py``);
4. a step whose matching loss exceeds ``threshold`` is skipped (on every rank).

The exported set carries the soft labels, which ``ld3m evaluate`` trains against. The
defaults are the authors' (their ``utils/cfg.py``); their recipes also whiten the data
(``--data.zca true``) and train the experts with GSAM (``ld3m buffer --optimizer gsam``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from ld3m.callbacks.datm import StartEpochSchedule
from ld3m.modules.mtt import MTT
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ld3m.augment import DEFAULT_STRATEGY
from ld3m.networks import conv_backend
from ld3m.trajectories import unflatten

log = logging.getLogger("ld3m")

#: DATM's initialisations (their ``pix_init``: ``samples_predicted_correctly`` and ``real``).
DATM_INITS = ("correct", "real")


class DATM(MTT):
    """Difficulty-aligned trajectory matching with learnable soft labels.

    Args:
        buffer: Folder of expert trajectories (``ld3m buffer``, ideally with ``--logits true``).
        ipc: Synthetic images per class.
        init: ``"correct"``: real images expert 0 classifies correctly, soft labels the mean
            logits of the experts that classify each correctly (their
            ``samples_predicted_correctly``); ``"real"``: random real images, soft labels expert
            0's logits (their ``pix_init: real``).
        syn_steps: Student SGD steps per iteration.
        expert_epochs: Expert epochs the student must cover.
        max_start_epoch: Final upper bound of the start epochs.
        min_start_epoch: Lower bound of the start epochs.
        current_max_start_epoch: Upper bound at step 0 (``None``: no sequential generation).
        expansion_end: Steps over which the upper bound grows to ``max_start_epoch``.
        lr_img: SGD learning rate of the images.
        lr_lr: SGD learning rate of the student's learnable lr.
        lr_teacher: Initial student learning rate.
        lr_y: SGD learning rate (momentum 0.9) of the soft labels' logits.
        momentum: Momentum of the images' and the lr's SGD.
        batch_syn: Synthetic images per student step (default: all).
        dsa: DSA strategy of the student's minibatches; ``"none"`` disables it.
        gradient: ``unroll``, ``recompute`` or ``auto`` (see MTT).
        threshold: Skip the update when the matching loss exceeds this.
        student_autocast: Run the student under the trainer's autocast (see MTT).
        seed: Seed of every draw.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
        experts: ``shuffled`` (every expert once per pass, as the authors') or ``random`` (see
            MTT).
    """

    method_name = "DATM"

    def __init__(self, buffer: str, ipc: int = 10, init: str = "correct", syn_steps: int = 80,
                 expert_epochs: int = 2, max_start_epoch: int = 25, min_start_epoch: int = 0,
                 current_max_start_epoch: int | None = 20, expansion_end: int = 3000,
                 lr_img: float = 1000.0, lr_lr: float = 1e-5, lr_teacher: float = 0.01,
                 lr_y: float = 2.0, momentum: float = 0.5, batch_syn: int | None = None,
                 dsa: str = DEFAULT_STRATEGY, gradient: str = "auto", threshold: float = 1.0,
                 student_autocast: bool = False, seed: int = 0, num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None,
                 experts: str = "shuffled") -> None:
        if init not in DATM_INITS:
            raise ValueError(f"DATM starts from real images: init must be one of "
                             f"{', '.join(DATM_INITS)}, got {init!r}")
        if not lr_y > 0:
            raise ValueError(f"lr_y must be positive, got {lr_y}")
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        if current_max_start_epoch is not None and not (
                min_start_epoch < current_max_start_epoch <= max_start_epoch):
            raise ValueError(f"need min_start_epoch < current_max_start_epoch <= max_start_epoch, "
                             f"got {min_start_epoch}, {current_max_start_epoch}, {max_start_epoch}")
        self.soft_labels: nn.Parameter | None = None
        super().__init__(buffer=buffer, ipc=ipc, init="real", syn_steps=syn_steps,
                         expert_epochs=expert_epochs, max_start_epoch=max_start_epoch,
                         min_start_epoch=min_start_epoch, lr_img=lr_img, lr_lr=lr_lr,
                         lr_teacher=lr_teacher, momentum=momentum, batch_syn=batch_syn, dsa=dsa,
                         gradient=gradient, student_autocast=student_autocast, seed=seed,
                         num_classes=num_classes, image_shape=image_shape, experts=experts)
        self.save_hyperparameters()
        self.init = init
        self.current_max_start_epoch = current_max_start_epoch
        self.expansion_end = expansion_end
        self.lr_y = lr_y
        self.threshold = threshold
        #: The current upper bound of the start epochs (moved by StartEpochSchedule).
        self.upper_start_epoch = current_max_start_epoch or max_start_epoch

    def _allocate(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        super()._allocate(num_classes, image_shape)
        self.soft_labels = nn.Parameter(torch.zeros(num_classes * self.ipc, num_classes))

    def configure_callbacks(self):
        if self.current_max_start_epoch is None:
            return []
        return [StartEpochSchedule(self.current_max_start_epoch, self.max_start_epoch,
                                   self.expansion_end)]

    def start_epoch_range(self) -> tuple[int, int]:
        return self.min_start_epoch, max(self.min_start_epoch + 1, self.upper_start_epoch)

    # ------------------------------------------------------------------------------ init
    def expert_logits(self, dm) -> torch.Tensor:
        """Expert 0's logits on the training images (stored in the buffer, else computed)."""
        expert = self.buffer[0]
        if expert.logits is not None:
            if expert.logits.shape[0] != len(dm.train_split):
                raise ValueError(f"the buffer's logits cover {expert.logits.shape[0]} images, the "
                                 f"training set has {len(dm.train_split)}")
            return expert.logits
        log.info("DATM: the buffer has no logits (ld3m buffer --logits true); computing expert "
                 "0's logits on the %d training images once", len(dm.train_split))
        net = self.build_network(self.buffer.info["network"])
        net.load_state_dict(expert.parameters_at(expert.epochs), strict=False)
        net.eval()
        loader = torch.utils.data.DataLoader(dm.train_split.dataset(dm), batch_size=1024)
        with torch.no_grad(), conv_backend(torch.device("cpu")):
            logits = torch.cat([net(x).float() for x, _ in tqdm(
                loader, desc="DATM: expert logits", unit="batch", leave=False,
                disable=not self.show_progress)])
        self._store_logits(expert, logits)
        return logits

    def _store_logits(self, expert, logits: torch.Tensor) -> None:
        """Write computed logits back into the expert's shard (rank 0), so the next run on this
        buffer reads them; a read-only buffer is left as it is."""
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        path = self.buffer.paths[0]
        try:
            type(expert)(expert.trajectory, expert.info, logits).save(path)
            log.info("DATM: the logits are stored in %s for the next run", path)
        except OSError as err:
            log.warning("DATM: could not store the logits in %s (%s); they are recomputed "
                        "next time", path, err.strerror or err)

    @torch.no_grad()
    def initial_soft_labels(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The authors' soft-label initialisation: per image, the mean of the logits of the
        experts (all of the buffer's, at their final epoch) that classify it correctly
        (``(N, classes)``; an image none gets right keeps expert 0's logits)."""
        net = self.build_network(self.buffer.info["network"]).eval()
        layout = self.buffer.info["params"]
        last = self.buffer.epochs
        total = torch.zeros(len(images), self.num_classes)
        count = torch.zeros(len(images), 1)
        first = None
        with conv_backend(torch.device("cpu")):
            for index in tqdm(range(len(self.buffer)), desc="DATM: soft labels", unit="expert",
                              leave=False, disable=not self.show_progress):
                flat = self.buffer.rows(index, [last])[0]
                logits = torch.cat([functional_call(net, unflatten(flat, layout), (part,)).float()
                                    for part in images.float().split(1024)])
                first = logits if first is None else first
                right = (logits.argmax(1) == labels).unsqueeze(1)
                total += logits * right
                count += right
        assert first is not None
        return torch.where(count > 0, total / count.clamp(min=1), first)

    @torch.no_grad()
    def expert0_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Expert 0's logits at its final epoch on ``images`` (``init="real"``'s soft labels)."""
        net = self.build_network(self.buffer.info["network"]).eval()
        flat = self.buffer.rows(0, [self.buffer.epochs])[0]
        params = unflatten(flat, self.buffer.info["params"])
        with conv_backend(torch.device("cpu")):
            return torch.cat([functional_call(net, params, (part,)).float()
                              for part in images.float().split(1024)])

    def initialise(self, dm) -> None:
        """``init="correct"``: correctly classified real images of every class (expert 0's), and
        their soft labels (the mean over the experts that classify each correctly);
        ``init="real"``: random real images, and expert 0's logits on them."""
        if self.init == "real":
            super().initialise(dm)
            with torch.no_grad():
                self.soft_labels.copy_(self.expert0_logits(self.images.detach().cpu()))
            return
        logits = self.expert_logits(dm)
        labels = dm.train_split.labels
        correct = logits.argmax(1) == labels
        generator = torch.Generator().manual_seed(self.seed)
        picks = []
        for c in range(self.num_classes):
            members = torch.nonzero((labels == c) & correct).flatten()
            if len(members) < self.ipc:
                raise ValueError(f"the expert classifies only {len(members)} training images of "
                                 f"class {c} correctly; DATM needs ipc={self.ipc}")
            picks.append(members[torch.randperm(len(members), generator=generator)[:self.ipc]])
        index = torch.cat(picks)
        images = dm.train_split.images(index, dm)
        with torch.no_grad():
            self.images.copy_(images)
            self.soft_labels.copy_(self.initial_soft_labels(images.cpu(), labels[index]))

    # ------------------------------------------------------------------------------ training
    def student_targets(self) -> torch.Tensor:
        return F.softmax(self.soft_labels.float(), dim=1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        generator = self.step_generator()
        start, target = self.draw_expert(generator)
        loss = self.check_finite(self.matching_loss(start, target, generator))
        self.log("loss", loss.detach(), prog_bar=True)
        self.log("syn_lr", self.syn_lr.detach())
        self.log("upper_start_epoch", float(self.upper_start_epoch))
        # Skipped when over the threshold, on every rank if on one (a max all-reduce). The flag
        # stays on the device (reading it would stop the host every step): the step is taken
        # and then undone where the flag is set (see optimizer_step), which leaves the images,
        # the lr, the soft labels and the momentum exactly as a skipped step does.
        over = (loss.detach() > self.threshold).float()
        if self._trainer is not None:
            over = self.trainer.strategy.reduce(over, reduce_op="max")
        self._skip = over > 0
        self.log("skipped", over)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for group in optimizer.param_groups:  # SGD's first step from a zero buffer is the same
            if group.get("momentum", 0):
                for p in group["params"]:
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        kept = [t.detach().clone() for p in params
                for t in (p, optimizer.state[p].get("momentum_buffer")) if t is not None]
        optimizer.step(closure=optimizer_closure)
        skip = getattr(self, "_skip", None)
        if skip is None:
            return
        now = [t for p in params for t in (p, optimizer.state[p].get("momentum_buffer"))
               if t is not None]
        with torch.no_grad():
            for current, before in zip(now, kept, strict=True):
                current.copy_(torch.where(skip, before, current))

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": [self.images], "lr": self.lr_img},
                                {"params": [self.syn_lr], "lr": self.lr_lr},
                                {"params": [self.soft_labels], "lr": self.lr_y, "momentum": 0.9}],
                               lr=self.lr_img, momentum=self.momentum)

    def export_extra(self) -> dict[str, Any]:
        return {**super().export_extra(), "soft_labels": self.soft_labels.detach().float().cpu().clone()}
