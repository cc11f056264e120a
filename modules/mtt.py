"""MTT: matching training trajectories (Cazenavette et al., CVPR 2022).

Each training step picks an expert of the buffer (see ``ld3m buffer``) and a start epoch
``t ~ U[min_start_epoch, max_start_epoch)``; a student starts at the expert's parameters
``theta*_t`` and takes ``syn_steps`` SGD steps on DSA-augmented minibatches of the synthetic
images with a *learnable* learning rate ``alpha``; the loss is

    ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2     (M = expert_epochs)

and its gradient updates the images (SGD ``lr_img``, momentum 0.5) and ``alpha`` (SGD
``lr_lr``, momentum 0.5). The student runs functionally on flat parameters
(``torch.func.functional_call``).

Sampling as the authors' ``distill.py``: the experts are walked in a shuffled order, each once
per pass over the buffer, a new order every pass (``experts="shuffled"``; their ``--load_all``
draws one at random every step: ``experts="random"``); the student's minibatches of
``batch_syn`` images are consecutive chunks of one random permutation of the synthetic set, the
remainder chunk first, a new permutation once the chunks are used up, so every image is used
once per pass.

Two ways to get the gradient (``gradient``):

- ``unroll``: keep the autograd graph through all ``syn_steps`` (the authors'); its memory grows
  linearly with ``syn_steps`` (every step's activations and double-backward graph);
- ``recompute``: run the student without a graph, keep only the ``syn_steps + 1`` flat
  parameter vectors, then sweep backwards: at step ``i`` rebuild that one step's graph (the
  same minibatch and the same replayed DSA parameters) and propagate the adjoint
  ``lambda_i = lambda_{i+1} - alpha * H_i lambda_{i+1}`` (a Hessian-vector product), adding
  ``-alpha * (d g_i / d X)^T lambda_{i+1}`` to the images' gradient and ``-g_i . lambda_{i+1}``
  to ``alpha``'s. This is the *exact* gradient of the same loss (second-order terms included;
  TESLA's idea of recomputing each step's contribution), with activation memory of one step;
- ``auto`` (default): ``unroll`` when its estimated memory fits comfortably, else ``recompute``.

By default the student runs in float32 even under ``--trainer.precision bf16-mixed`` (autocast
is switched off around it); ``student_autocast=True`` lets the trainer's autocast reach it.
Measured (ConvNetW32, IPC 10, syn_steps 10, bf16 autocast on the CPU): the loss agrees to 1e-5,
the lr's gradient to 0.5%, the images' gradient has a relative error of 4.8% (cosine 0.999) --
sound enough to offer, not enough to make it the default.

Under DDP the ranks of a step take consecutive places of the experts' walk (different experts)
and draw their own start epochs and minibatches (``step_generator``); DDP averages the
gradients, so the images and ``alpha`` stay identical across ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from ld3m.datamodules.real import ZCA_INPUT, describe_zca, zca_flags
from ld3m.modules.base import DistillationModule
from torch import nn
from torch.func import functional_call

from ld3m.augment import DEFAULT_STRATEGY, DSAParams
from ld3m.augment import DSA as Augment
from ld3m.trajectories import TrajectoryBuffer, unflatten

log = logging.getLogger("ld3m")

GRADIENT_MODES = ("auto", "unroll", "recompute")
#: How the expert of a step is chosen (see :class:`MTT`'s ``experts``).
EXPERT_ORDERS = ("shuffled", "random")

#: ``auto`` picks ``unroll`` when its estimate is below this fraction of the free memory.
AUTO_MEMORY_FRACTION = 0.5


class _Student:
    """A network run functionally on flat parameters: ``student(flat, x) -> logits``."""

    def __init__(self, net: nn.Module, layout: list[list]) -> None:
        self.net = net
        self.layout = layout
        self.buffers = dict(net.named_buffers())

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, {**unflatten(flat, self.layout), **self.buffers}, (x,))


def _step_gradient(student: _Student, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   create_graph: bool) -> torch.Tensor:
    loss = F.cross_entropy(student(theta, x).float(), y)
    return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]


class _RecomputedStudent(torch.autograd.Function):
    """The MTT loss with the constant-activation-memory backward sweep (see the module notes)."""

    @staticmethod
    def forward(ctx, images, syn_lr, targets, student, start, target, batches, augment):  # noqa: D102
        theta = start
        thetas = [theta]
        for index, params in batches:
            x = images[index]
            x = augment.apply(x, params) if augment is not None else x
            with torch.enable_grad():
                leaf = theta.detach().requires_grad_()
                g = _step_gradient(student, leaf, x, targets[index], create_graph=False)
            theta = theta - syn_lr * g
            thetas.append(theta)
        denominator = ((start - target) ** 2).sum()
        ctx.save_for_backward(images, syn_lr, targets, target, denominator, *thetas)
        ctx.student, ctx.batches, ctx.augment = student, batches, augment
        # the backward sweep rebuilds each step under the forward's autocast state
        device = images.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return ((theta - target) ** 2).sum() / denominator

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        images, syn_lr, targets, target, denominator, *thetas = ctx.saved_tensors
        soft = targets.is_floating_point()  # soft labels get a gradient too (DATM)
        lam = grad_output * 2 * (thetas[-1] - target) / denominator  # dL/dtheta_N
        d_images = torch.zeros_like(images)
        d_targets = torch.zeros_like(targets) if soft else None
        d_lr = torch.zeros_like(syn_lr)
        for i in range(len(ctx.batches) - 1, -1, -1):
            index, params = ctx.batches[i]
            device, dtype, enabled = ctx.autocast
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                theta = thetas[i].detach().requires_grad_()
                source = images.detach().requires_grad_()
                labels = targets.detach().requires_grad_(soft)
                x = source[index]
                x = ctx.augment.apply(x, params) if ctx.augment is not None else x
                g = _step_gradient(ctx.student, theta, x, labels[index], create_graph=True)
                inputs = (theta, source, labels) if soft else (theta, source)
                grads = torch.autograd.grad((g * lam).sum(), inputs, allow_unused=True)
            d_lr = d_lr - (g.detach() * lam).sum()
            if grads[1] is not None:
                d_images = d_images - syn_lr * grads[1]
            if soft and grads[2] is not None:
                d_targets = d_targets - syn_lr * grads[2]
            lam = lam - syn_lr * grads[0]
        return d_images, d_lr, d_targets, None, None, None, None, None


class MTT(DistillationModule):
    """Matching training trajectories.

    Args:
        buffer: Folder of expert trajectories (``ld3m buffer``); its network is the student's.
        ipc: Synthetic images per class.
        init: ``"real"`` (random real images, the paper's) or ``"noise"``.
        syn_steps: Student SGD steps per iteration (N).
        expert_epochs: Expert epochs the student must cover (M).
        max_start_epoch: Start epochs are drawn from ``[min_start_epoch, max_start_epoch)``.
        min_start_epoch: Lower end of the start epochs.
        lr_img: SGD learning rate of the images (their default 1000; CIFAR-10: 100 at IPC 1/10,
            1000 at IPC 50).
        lr_lr: SGD learning rate of the learnable student lr (CIFAR-10: 1e-7 at IPC 1, else 1e-5).
        lr_teacher: Initial student learning rate (the experts' lr).
        momentum: Momentum of both SGD optimisers.
        batch_syn: Synthetic images per student step (default: all of them): consecutive chunks
            of one permutation, the remainder first.
        dsa: DSA strategy of the student's minibatches (independent draws); ``"none"`` disables it.
        gradient: ``unroll``, ``recompute`` (constant activation memory, same gradient) or ``auto``.
        experts: ``shuffled`` (the authors' default: every expert once per pass over the buffer,
            in a new random order each pass; under DDP the ranks take consecutive places of the
            same walk) or ``random`` (one drawn with replacement every step, their
            ``--load_all``).
        student_autocast: Run the student under the trainer's autocast (e.g. bf16-mixed)
            instead of float32.
        seed: Seed of the initialisation and of the expert/epoch/minibatch/augmentation draws.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
    """

    method_name = "MTT"
    #: The student reads expert trajectories, not real batches (the data module then serves step
    #: indices only; the real data feeds the initialisation and the evaluation).
    uses_real_batches = False

    def __init__(self, buffer: str, ipc: int = 10, init: str = "real", syn_steps: int = 20,
                 expert_epochs: int = 3, max_start_epoch: int = 25, min_start_epoch: int = 0,
                 lr_img: float = 1000.0, lr_lr: float = 1e-5, lr_teacher: float = 0.01,
                 momentum: float = 0.5, batch_syn: int | None = None, dsa: str = DEFAULT_STRATEGY,
                 gradient: str = "auto", student_autocast: bool = False, seed: int = 0,
                 num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None,
                 experts: str = "shuffled") -> None:
        super().__init__(ipc=ipc, init=init, lr_img=lr_img, momentum=momentum, seed=seed,
                         num_classes=num_classes, image_shape=image_shape)
        if syn_steps < 1 or expert_epochs < 1:
            raise ValueError(f"syn_steps and expert_epochs must be at least 1, got {syn_steps} "
                             f"and {expert_epochs}")
        if not 0 <= min_start_epoch < max_start_epoch:
            raise ValueError(f"need 0 <= min_start_epoch < max_start_epoch, got {min_start_epoch} "
                             f"and {max_start_epoch}")
        for name, value in (("lr_lr", lr_lr), ("lr_teacher", lr_teacher)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if batch_syn is not None and batch_syn < 1:
            raise ValueError(f"batch_syn must be at least 1, got {batch_syn}")
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if experts not in EXPERT_ORDERS:
            raise ValueError(f"experts must be one of {EXPERT_ORDERS}, got {experts!r}")
        self.save_hyperparameters()
        self.buffer_dir = buffer
        self.syn_steps, self.expert_epochs = syn_steps, expert_epochs
        self.min_start_epoch, self.max_start_epoch = min_start_epoch, max_start_epoch
        self.lr_lr, self.lr_teacher = lr_lr, lr_teacher
        self.batch_syn = batch_syn
        self.dsa = Augment(dsa) if dsa not in ("", "none") else None
        self.gradient = gradient
        self.experts = experts
        self.student_autocast = student_autocast
        #: The student's learnable learning rate (alpha).
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_teacher)))
        self._scratch: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ set-up
    @property
    def buffer(self) -> TrajectoryBuffer:
        if "buffer" not in self._scratch:
            self._scratch["buffer"] = TrajectoryBuffer(self.buffer_dir)
        return self._scratch["buffer"]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        info = self.buffer.info
        if (info["num_classes"], tuple(info["image_shape"])) != (self.num_classes, self.image_shape):
            raise ValueError(f"the buffer {self.buffer_dir} was trained on {info['dataset']} "
                             f"({info['num_classes']} classes of {tuple(info['image_shape'])}), "
                             f"not {self.dataset_name} ({self.num_classes} of {self.image_shape})")
        theirs = info.get("zca") or None
        if theirs != self.zca:
            remedy = ("" if theirs and theirs.get("input") != ZCA_INPUT
                      else f": pass {zca_flags(theirs)}")
            raise ValueError(f"the buffer {self.buffer_dir} was trained on images "
                             f"{describe_zca(theirs)}, but the data module's are "
                             f"{describe_zca(self.zca)}{remedy}")
        if self.max_start_epoch - 1 + self.expert_epochs > self.buffer.epochs:
            raise ValueError(f"max_start_epoch {self.max_start_epoch} + expert_epochs "
                             f"{self.expert_epochs} needs experts of at least "
                             f"{self.max_start_epoch - 1 + self.expert_epochs} epochs; the buffer "
                             f"has {self.buffer.epochs}")

    def student(self) -> _Student:
        """The buffer's network, run functionally on flat parameters."""
        student = self._scratch.get("student")
        if student is None:
            net = self.build_network(self.buffer.info["network"]).train()
            student = self._scratch["student"] = _Student(net, self.buffer.info["params"])
        student.net.to(self.device)
        student.buffers = dict(student.net.named_buffers())
        return student

    # ------------------------------------------------------------------------------ the loss
    def student_targets(self) -> torch.Tensor:
        """What the student's cross-entropy aims at: hard labels here (DATM: soft labels)."""
        return self.labels

    def plan(self, generator: torch.Generator) -> list[tuple[torch.Tensor, DSAParams | None]]:
        """The minibatch indices and DSA parameters of every student step (replayable).

        As the authors': with ``batch_syn`` below the set's size, a random permutation is split
        into chunks of ``batch_syn`` and they are used from the last (the remainder, when the
        size does not divide) to the first, then a new permutation; so every image is used once
        per pass. With all images in every step, the batch is the whole set in order.
        """
        n = self.images.shape[0]
        size = n if self.batch_syn is None else min(self.batch_syn, n)
        batches = []
        chunks: list[torch.Tensor] = []
        for _ in range(self.syn_steps):
            if size < n:
                if not chunks:
                    chunks = list(torch.randperm(n, generator=generator).split(size))
                index = chunks.pop()
            else:
                index = torch.arange(n)
            params = (self.dsa.sample(len(index), self.image_shape[1:], generator)
                      .to(self.device, non_blocking=True) if self.dsa is not None else None)
            batches.append((index.to(self.device, non_blocking=True), params))
        return batches

    def _augment(self, x: torch.Tensor, params: DSAParams | None) -> torch.Tensor:
        return self.dsa.apply(x, params) if params is not None else x

    def matching_loss(self, start: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
                      gradient: str | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised parameter-matching loss from ``start`` towards ``target`` (flat).

        ``images``: the synthetic images the student trains on (e.g. LD3M's rendered ones, same
        shape as this module's); default: this module's own ``images``.
        """
        gradient = gradient or self.resolved_gradient()
        student = self.student()
        batches = self.plan(generator)
        precision = (contextlib.nullcontext() if self.student_autocast
                     else torch.autocast(self.device.type, enabled=False))
        with precision:
            images = (self.images if images is None else images).float()
            syn_lr = self.syn_lr.float()
            targets = self.student_targets()
            targets = targets.float() if targets.is_floating_point() else targets
            if gradient == "recompute":
                return _RecomputedStudent.apply(images, syn_lr, targets, student, start, target,
                                                batches, self.dsa)
            theta = start.detach().requires_grad_()
            for index, params in batches:
                x = self._augment(images[index], params)
                g = _step_gradient(student, theta, x, targets[index], create_graph=True)
                theta = theta - syn_lr * g
            return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()

    def resolved_gradient(self) -> str:
        """``unroll`` or ``recompute`` (``auto`` decided once, from a memory estimate: rank 0's
        under DDP, so every rank runs the same backward). Collective on its first call under DDP:
        :meth:`on_train_start` makes it there, on every rank."""
        if self.gradient != "auto":
            return self.gradient
        if "gradient" not in self._scratch:
            need = self.estimate_unroll_bytes()
            free = _free_memory(self.device)
            choice = "unroll" if need < AUTO_MEMORY_FRACTION * free else "recompute"
            if self._trainer is not None and self.trainer.world_size > 1:
                choice = self.trainer.strategy.broadcast(choice, src=0)  # rank 0's, for all
            log.info("MTT: the unrolled graph needs about %.2f GB of %.2f GB free: using %s",
                     need / 1e9, free / 1e9, choice)
            self._scratch["gradient"] = choice
        return self._scratch["gradient"]

    def estimate_unroll_bytes(self) -> float:
        """Memory of the unrolled graph: every step's activations (about 1.5 floats per output
        element of every layer, calibrated on ``bench/mtt_memory.py``: 0.074 GB per step
        measured against 0.083 GB estimated for ConvNetW32 at IPC 10) plus parameter copies."""
        student = self.student()
        elements = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: elements.append(out.numel()))
                 for m in student.net.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                student.net(torch.zeros(1, *self.image_shape, device=self.device))
        finally:
            for hook in hooks:
                hook.remove()
        batch = self.images.shape[0] if self.batch_syn is None else min(self.batch_syn, self.images.shape[0])
        params = sum(math.prod(shape) for _, shape in self.buffer.info["params"])
        per_step = 4 * (1.5 * sum(elements) * batch + 3 * params)
        return float(self.syn_steps * per_step)

    # ------------------------------------------------------------------------------ training
    def start_epoch_range(self) -> tuple[int, int]:
        """``[low, high)`` of the start epochs drawn now (DATM narrows ``high``)."""
        return self.min_start_epoch, self.max_start_epoch

    def expert_index(self, step: int, rank: int = 0, world_size: int = 1) -> int:
        """The expert of training step ``step`` on ``rank`` with ``experts="shuffled"``: place
        ``step * world_size + rank`` of a walk through the buffer in passes, each pass a new
        random order (seeded by ``seed`` and the pass), so each expert is used once per pass
        and the ranks of one step take different experts (while the buffer has enough)."""
        n = len(self.buffer)
        walk, place = divmod(step * world_size + rank, n)
        order = torch.Generator().manual_seed((self.seed * 1_000_003 + walk * 7919 + 271_828) % 2**63)
        return int(torch.randperm(n, generator=order)[place])

    def draw_expert(self, generator: torch.Generator, step: int | None = None,
                    rank: int | None = None, world_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta*_t, theta*_{t+M})`` of this step's expert and a random start epoch, on the
        device. ``step``, ``rank`` and ``world_size`` (default: the trainer's, else 0, 0, 1) place
        the step on the shuffled walk of the experts; ``experts="random"`` draws the expert from
        ``generator`` instead."""
        if self.experts == "random":
            index = int(torch.randint(len(self.buffer), (1,), generator=generator))
        else:
            attached = self._trainer is not None
            index = self.expert_index(
                (self.global_step if attached else 0) if step is None else step,
                (self.global_rank if attached else 0) if rank is None else rank,
                (self.trainer.world_size if attached else 1) if world_size is None else world_size)
        low, high = self.start_epoch_range()
        start = int(torch.randint(low, high, (1,), generator=generator))
        rows = self.buffer.rows(index, [start, start + self.expert_epochs])
        rows = rows.to(self.device, non_blocking=True)  # read from the shard: no device sync
        return rows[0], rows[1]

    def on_train_start(self) -> None:
        self.resolved_gradient()  # decided here, on every rank (a broadcast under DDP)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        generator = self.step_generator()
        start, target = self.draw_expert(generator)
        loss = self.check_finite(self.matching_loss(start, target, generator))
        self.log("loss", loss.detach(), prog_bar=True)
        self.log("syn_lr", self.syn_lr.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": [self.images], "lr": self.lr_img},
                                {"params": [self.syn_lr], "lr": self.lr_lr}],
                               lr=self.lr_img, momentum=self.momentum)

    def export_extra(self) -> dict[str, Any]:
        return {"lr": self.syn_lr.detach().float().cpu().clone()}


def _free_memory(device: torch.device) -> float:
    """Free bytes on ``device`` (the GPU's free memory, or the machine's available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8e9
