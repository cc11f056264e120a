"""DD: the original dataset distillation (Wang et al. 2018).

The method learns the synthetic images *and* one learning rate per inner step (stored through
softplus). Each training step takes initial weights ``theta_0`` (see ``init_mode``), runs
``steps x epochs`` plain gradient steps on the synthetic images (step ``s`` on the ``s``-th group
of ``ipc / steps`` images per class, see :mod:`ld3m.unrolled`), and minimises the cross-entropy
of the final weights on a real batch, back-propagating through the whole unrolled run into
the images and the learning rates (Adam, lr 0.01, betas (0.5, 0.999), halved every
``decay_every`` steps).

``init_mode``:

- ``random``: fresh random weights every step (drawn identically on every DDP rank);
- ``fixed``: one random ``theta_0`` for the whole run (DD's "fixed init");
- ``random_pretrained``: one of ``pretrained_nets`` networks briefly trained on real data;
- ``fixed_pretrained``: always the first of them.

The pretrained networks are trained once, at the start of ``fit``, by rank 0 (which broadcasts
them to the other ranks: no shared folder needed), and saved to
``pretrained_path`` (default ``<default_root_dir>/dd_pretrained.pt``); a later run with the same
settings reuses the file. The exported set carries the learned learning rates and, for the
fixed and pretrained modes, the initial weights, so ``ld3m evaluate`` replays DD's protocol
(the same initialisation family, the learned step schedule) without any other file.

Under DDP every rank unrolls from the same ``theta_0`` against its own real batch; DDP averages
the gradients of the images and learning rates, so they stay identical across ranks.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ld3m.modules.base import DistillationModule, check_network_name
from torch import nn

from ld3m.files import atomic_write
from ld3m.networks import xavier_init
from ld3m.unrolled import (
    INIT_MODES,
    at_least_float32,
    default_steps,
    pack_weights,
    step_batches,
    unroll,
)

log = logging.getLogger("ld3m")

# salts of the rank-independent draws
_SALT_THETA = 11
_SALT_POOL = 12
_SALT_PRETRAIN = 13

#: Real images per pre-training step of the ``*_pretrained`` networks (spread over the classes).
PRETRAIN_BATCH = 256


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) == y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


class DD(DistillationModule):
    """Dataset distillation with learned images and per-step learning rates.

    Args:
        ipc: Synthetic images per class.
        init: ``"noise"`` (standard normal, DD's) or ``"real"`` (random real images).
        network: Network trained in the unrolled loop (see ``ld3m.networks``; DD's default,
            LeNet). Its weights are drawn as DD's: ``xavier_normal`` (gain 1), zero biases.
        steps: Inner gradient steps per epoch; must divide ``ipc`` (default: the largest divisor
            of ``ipc`` up to 10, so IPC 10 -> 10 steps of one image per class).
        epochs: Passes over the steps (DD: 3); ``steps x epochs`` learning rates are learned.
        lr_init: Initial value of every learned learning rate (DD: 0.02; 0.001 for CIFAR).
        lr_img: Adam learning rate of the images and the learning rates (DD: 0.01).
        betas: Adam betas (DD: (0.5, 0.999)).
        decay_every: Halve the Adam learning rate every N training steps (0: never).
        init_mode: Initial weights of each unrolled run: ``random``, ``fixed``,
            ``random_pretrained`` or ``fixed_pretrained``.
        pretrained_nets: Networks in the pool of the ``*_pretrained`` modes.
        pretrain_steps: SGD steps (lr ``pretrain_lr``, momentum 0.9, 256 real images) that train
            each pool network.
        pretrain_lr: Learning rate of that pre-training.
        pretrained_path: File of the pool (default ``<default_root_dir>/dd_pretrained.pt``);
            reused when it exists and matches these settings.
        seed: Seed of the initialisation, the initial weights and the pre-training.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
    """

    method_name = "DD"

    def __init__(self, ipc: int = 10, init: str = "noise", network: str = "LeNet",
                 steps: int | None = None, epochs: int = 3, lr_init: float = 0.02,
                 lr_img: float = 0.01, betas: tuple[float, float] = (0.5, 0.999),
                 decay_every: int = 0, init_mode: str = "random", pretrained_nets: int = 4,
                 pretrain_steps: int = 100, pretrain_lr: float = 0.01,
                 pretrained_path: str | None = None, seed: int = 0,
                 num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> None:
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(ipc=ipc, init=init, lr_img=lr_img, momentum=betas[0], seed=seed,
                         num_classes=num_classes, image_shape=image_shape)
        check_network_name(network)
        steps = default_steps(ipc) if steps is None else int(steps)
        if steps < 1 or ipc % steps:
            raise ValueError(f"steps must be a positive divisor of ipc={ipc} (each step uses "
                             f"ipc / steps images per class), got {steps}")
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        if not (lr_init > 0 and math.isfinite(lr_init)):
            raise ValueError(f"lr_init must be a positive number, got {lr_init}")
        if decay_every < 0:
            raise ValueError(f"decay_every must be >= 0, got {decay_every}")
        if init_mode not in INIT_MODES:
            raise ValueError(f"init_mode must be one of {INIT_MODES}, got {init_mode!r}")
        if pretrained_nets < 1 or pretrain_steps < 0:
            raise ValueError(f"pretrained_nets must be >= 1 and pretrain_steps >= 0, got "
                             f"{pretrained_nets} and {pretrain_steps}")
        if not (pretrain_lr > 0 and math.isfinite(pretrain_lr)):
            raise ValueError(f"pretrain_lr must be a positive number, got {pretrain_lr}")
        self.save_hyperparameters()
        self.hparams["steps"] = steps  # the exported set records the split actually used
        self.network = network
        self.steps, self.epochs = steps, epochs
        self.betas = tuple(betas)
        self.decay_every = decay_every
        self.init_mode = init_mode
        self.pretrained_nets, self.pretrain_steps, self.pretrain_lr = (
            pretrained_nets, pretrain_steps, pretrain_lr)
        self.pretrained_path = pretrained_path
        #: Learned learning rates, ``softplus(raw_lrs)``, one per unrolled step (epoch-major).
        self.raw_lrs = nn.Parameter(torch.full((epochs * steps,), inverse_softplus(lr_init)))
        if num_classes is not None and image_shape is not None:
            self.build_network(network)  # fail early on a network that does not fit the images
        # scratch space (not submodules: out of state_dict and of DDP): the network whose
        # architecture the unrolled run uses, and the initial weights of the non-random modes
        self._scratch: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ properties
    @property
    def lrs(self) -> torch.Tensor:
        """The learned learning rates, ``(epochs, steps)``."""
        return F.softplus(self.raw_lrs).view(self.epochs, self.steps)

    def _net(self) -> nn.Module:
        net = self._scratch.get("net")
        if net is None:
            net = self._scratch["net"] = self.build_network(self.network)
            # BatchNorm: batch statistics only. Every forward of this network is in train mode,
            # so running statistics would never be read; not tracking them keeps in-place buffer
            # updates out of the unrolled graph
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.track_running_stats = False
                    module.running_mean = module.running_var = module.num_batches_tracked = None
        return net.to(self.device, self.images.dtype).train()

    # ------------------------------------------------------------------------------ initial weights
    def _pool_settings(self) -> dict[str, Any]:
        return {"network": self.network, "dataset": self.dataset_name,
                "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "nets": self.pretrained_nets, "steps": self.pretrain_steps,
                "lr": self.pretrain_lr, "seed": self.seed}

    def _pool_path(self) -> Path:
        if self.pretrained_path:
            return Path(self.pretrained_path)
        return Path(self.trainer.default_root_dir) / "dd_pretrained.pt"

    def pretrain_pool(self) -> list[dict[str, torch.Tensor]]:
        """Train ``pretrained_nets`` networks briefly on real data; their weights (CPU)."""
        dm = self.real_data
        per_class = max(1, PRETRAIN_BATCH // self.num_classes)
        pool = []
        for i in range(self.pretrained_nets):
            net = xavier_init(self.build_network(self.network).to(self.device),
                              self.shared_generator(i, _SALT_POOL)).train()
            opt = torch.optim.SGD(net.parameters(), lr=self.pretrain_lr, momentum=0.9)
            generator = self.shared_generator(i, _SALT_PRETRAIN)
            labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(per_class)
            for _ in range(self.pretrain_steps):
                x = dm.sample_per_class(per_class, generator).flatten(0, 1).to(self.device)
                loss = F.cross_entropy(net(x), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            pool.append({n: p.detach().cpu().clone() for n, p in net.named_parameters()})
            log.info("DD: pre-trained network %d/%d (%d steps, last loss %.3f)", i + 1,
                     self.pretrained_nets, self.pretrain_steps, loss.item() if self.pretrain_steps else float("nan"))
        return pool

    def _load_pool(self, path: Path) -> list[dict[str, torch.Tensor]]:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            settings, pool = saved["settings"], saved["networks"]
        except Exception as err:  # noqa: BLE001  (any unreadable file gets the same message)
            raise ValueError(f"{path} is not a readable DD pre-trained pool ({type(err).__name__}); "
                             "delete it to train a new one") from None
        if settings != self._pool_settings():
            raise ValueError(f"{path} holds networks pre-trained with {settings}, not "
                             f"{self._pool_settings()}; pass another --model.pretrained_path "
                             "or delete the file")
        return pool

    def prepare_initial_weights(self) -> None:
        """Set up the fixed ``theta_0`` or the pre-trained pool (trained or read from file)."""
        if self.init_mode == "random" or self._scratch.get("initial") is not None:
            return
        if self.init_mode == "fixed":
            net = xavier_init(self.build_network(self.network), self.shared_generator(0, _SALT_THETA))
            self._scratch["initial"] = [{n: p.detach().clone() for n, p in net.named_parameters()}]
            return
        # rank 0 reads or trains (and saves) the pool and broadcasts it: the other ranks need no
        # shared folder; an error on rank 0 is broadcast too, so no rank waits forever
        outcome: tuple[str, Any] = ("pool", None)
        if self.trainer.is_global_zero:
            try:
                outcome = ("pool", self._rank_zero_pool())
            except (ValueError, OSError) as err:
                outcome = ("error", str(err))
        kind, value = self.trainer.strategy.broadcast(outcome, src=0)
        if kind == "error":
            raise ValueError(value)
        self._scratch["initial"] = value[:1] if self.init_mode == "fixed_pretrained" else value

    def _rank_zero_pool(self) -> list[dict[str, torch.Tensor]]:
        """The pool from ``pretrained_path`` if it is there, else trained now and saved there."""
        path = self._pool_path()
        if path.exists():
            pool = self._load_pool(path)
        else:
            pool = self.pretrain_pool()
            with atomic_write(path) as tmp:
                torch.save({"settings": self._pool_settings(), "networks": pool}, tmp)
            log.info("DD: pre-trained pool written to %s", path)
        if len(pool) != self.pretrained_nets:
            raise ValueError(f"{path} holds {len(pool)} networks, expected {self.pretrained_nets}")
        return pool

    def initial_parameters(self, step: int) -> dict[str, torch.Tensor]:
        """``theta_0`` of ``step`` (the same on every rank), on the module's device."""
        if self.init_mode == "random":
            net = xavier_init(self._net(),
                              self.device_generator(self.shared_generator(step, _SALT_THETA)))
            return {n: p.detach().clone() for n, p in net.named_parameters()}
        initial = self._scratch.get("initial")
        if initial is None:
            raise RuntimeError("prepare_initial_weights() must run before the first step")
        choice = 0
        if len(initial) > 1:
            choice = int(torch.randint(len(initial), (1,), generator=self.shared_generator(step, _SALT_THETA)))
        return {n: t.to(self.device, self.images.dtype) for n, t in initial[choice].items()}

    def on_train_start(self) -> None:
        self.prepare_initial_weights()

    # ------------------------------------------------------------------------------ training
    def unrolled_loss(self, real: torch.Tensor, real_labels: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-entropy on ``real`` of the weights after the unrolled training from ``theta_0``."""
        net = self._net()
        params = {n: t.detach().requires_grad_() for n, t in self.initial_parameters(step).items()}
        batches = step_batches(self.images, self.num_classes, self.steps)
        final = unroll(net, params, batches, F.softplus(self.raw_lrs), create_graph=True)
        logits = torch.func.functional_call(net, ({**final, **dict(net.named_buffers())}), (real,))
        return F.cross_entropy(at_least_float32(logits), real_labels)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        real, _ = batch
        if real.dim() != 5 or real.shape[0] != self.num_classes:
            raise ValueError(f"DD expects class-balanced batches of {self.num_classes} classes, "
                             f"got shape {tuple(real.shape)}")
        k, n = real.shape[:2]
        labels = torch.arange(k, device=real.device).repeat_interleave(n)
        loss = self.check_finite(self.unrolled_loss(real.flatten(0, 1), labels, self.global_step))
        self.log("loss", loss.detach(), prog_bar=True)
        self.log("lr_mean", F.softplus(self.raw_lrs).mean().detach())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam([self.images, self.raw_lrs], lr=self.lr_img, betas=self.betas)
        if not self.decay_every:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.decay_every, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ export
    def export_extra(self) -> dict[str, Any]:
        extra: dict[str, torch.Tensor] = {}
        initial = self._scratch.get("initial")
        # (before the first step of a fixed or pre-trained mode there are no initial weights
        # yet: the set is written without them and the DD protocol will say so)
        if self.init_mode != "random" and initial is not None:
            if self.init_mode == "random_pretrained":
                for i, weights in enumerate(initial):
                    extra.update(pack_weights(f"pool.{i}", weights))
            else:
                extra.update(pack_weights("theta0", initial[0]))
        return {"lr": self.lrs.detach().float().cpu().clone(), "extra": extra,
                "meta": {"dd": {"network": self.network, "steps": self.steps,
                                "epochs": self.epochs, "init_mode": self.init_mode}}}

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._scratch.get("initial") is not None:
            checkpoint["ld3m_dd_initial"] = self._scratch["initial"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("ld3m_dd_initial") is not None:
            self._scratch["initial"] = checkpoint["ld3m_dd_initial"]
