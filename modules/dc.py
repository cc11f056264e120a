"""DC (gradient matching, Zhao et al. ICLR 2021) and DSA (Zhao & Bilen, ICML 2021).

A DC iteration draws a random network and alternates, ``outer_loop`` times, between

1. one update of the synthetic images on ``sum_c D(grad_theta CE(net(real_c), c),
   grad_theta CE(net(syn_c), c))``, the real gradients detached and the synthetic ones built
   with a graph back to the images (see :func:`gradient_distance` for ``D``), and
2. (except after the last update) ``inner_loop`` epochs of the network's SGD on the synthetic
   set, each a pass in shuffled minibatches of ``batch_train`` (256), as the authors' ``epoch``.

Here one Lightning training step is one image update, so ``max_steps`` counts image updates and
the published budget of 1000 iterations is ``1000 * outer_loop`` steps. The network lives across
steps: it is re-drawn when ``global_step % outer_loop == 0`` from a generator keyed by the seed
and the step only (not the rank), so every DDP rank holds the same network; the inner training
uses the synthetic images, identical on every rank, and keeps it so. Each rank matches against
its own real batches and DDP averages the image gradients. The network and its optimizer are
saved in checkpoints, so a resumed run continues exactly.

DSA is DC with real-image initialisation and differentiable Siamese augmentation: one draw per
class, shared by that class's real and synthetic batch, before the gradients are taken.

BatchNorm networks: before matching, the network runs a fresh draw of 16 real images per class in
train mode (the running statistics are set from them), then only its BatchNorm layers go to eval
mode, so both sides see the same frozen statistics; the inner training runs in train mode (the
authors' treatment).

Speed: the per-class gradients are computed class by class (:func:`per_class_gradients` with
``vectorised=False``), not with ``torch.func.vmap`` over the classes. Measured with
``python bench/dc_speed.py --threads 1`` (ConvNet-3 width 128, Fashion-MNIST, 256 real images
per class, seconds per image update, median of 2, 2-core AMD EPYC shared with another job):
IPC 1: loop 23.8 s, vmap 43.9 s; IPC 10: loop 22.2 s, vmap 43.5 s; and vmap's peak memory is
11.7 GB against 1.4 GB (it holds the activations of all K * 256 real images at once). With two
threads while another process kept a core busy, vmap came out ahead (IPC 1: 55 s vs 73 s,
IPC 10: 53 s vs 85 s), but that is OpenMP oversubscription penalising the loop's smaller
kernels, not the methods' cost. Nearly all the time is the real side: a forward and backward of
256 images per class (convolutions about 60% of it).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from ld3m.modules.base import DistillationModule, check_network_name
from torch import nn
from torch.func import functional_call, grad, vmap

from ld3m.augment import DEFAULT_STRATEGY
from ld3m.augment import DSA as Augment
from ld3m.networks import has_batchnorm, reset_parameters

#: (outer_loop, inner_loop) by images per class, from the DC paper.
LOOPS_BY_IPC: dict[int, tuple[int, int]] = {
    1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}

#: Real images per class that set BatchNorm's running statistics before matching.
BN_IMAGES_PER_CLASS = 16

# Salts of the rank-independent draws (the Siamese DSA of the matching uses step_generator()).
_SALT_NETWORK = 1
_SALT_INNER_DSA = 2
_SALT_BN = 3


def default_loops(ipc: int) -> tuple[int, int]:
    """``(outer_loop, inner_loop)`` for ``ipc``: the published pair of the nearest listed IPC.

    The paper lists IPC 1, 10, 20, 30, 40 and 50; other IPCs take the pair of the nearest of
    those (a tie goes to the smaller IPC, so IPC 5 -> IPC 1's, 15 -> 10's, 100 -> 50's).
    """
    nearest = min(LOOPS_BY_IPC, key=lambda listed: (abs(listed - ipc), listed))
    return LOOPS_BY_IPC[nearest]


#: The distances of the authors' ``match_loss``.
DISTANCES = ("ours", "mse", "cos")


def gradient_distance(real_grads, syn_grads, batch_dims: int = 0,
                      metric: str = "ours") -> torch.Tensor:
    """DC's gradient distance (the authors' ``match_loss``), summed over the pairs.

    ``ours`` (the paper's): layer-wise; a weight tensor is reshaped to ``(out, -1)`` and
    contributes the sum over its output rows of ``1 - cos(A_i, B_i)`` (the cosine's denominator
    gets ``+ 1e-6``); a 1-D tensor (a bias, a norm weight) contributes 0. ``mse``: the squared
    distance of all the gradients as one vector. ``cos``: ``1 - cos`` of those vectors.

    Args:
        real_grads: Gradients of the real batch, one tensor per parameter (detached).
        syn_grads: Gradients of the synthetic batch, in the same order and shapes.
        batch_dims: Leading dimensions that index independent pairs (e.g. one per class); the
            distances of all pairs are summed. A tensor is "1-D" when it has one dimension after
            them.
        metric: ``ours``, ``mse`` or ``cos``.

    Returns:
        A scalar tensor.
    """
    real_grads, syn_grads = list(real_grads), list(syn_grads)
    if metric not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {metric!r}")
    if len(real_grads) != len(syn_grads):
        raise ValueError(f"{len(real_grads)} real gradients but {len(syn_grads)} synthetic ones")
    if metric != "ours":
        for a, b in zip(real_grads, syn_grads, strict=True):
            if a.shape != b.shape:
                raise ValueError(f"gradient shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
        lead = real_grads[0].shape[:batch_dims]
        a = torch.cat([g.reshape(*lead, -1) for g in real_grads], dim=-1)
        b = torch.cat([g.reshape(*lead, -1) for g in syn_grads], dim=-1)
        if metric == "mse":
            return ((b - a) ** 2).sum()
        cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
        return (1 - cosine).sum()
    total = None
    for a, b in zip(real_grads, syn_grads, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"gradient shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
        if a.dim() - batch_dims <= 1:
            continue
        rows = a.shape[: batch_dims + 1]
        a, b = a.reshape(*rows, -1), b.reshape(*rows, -1)
        cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
        term = (1 - cosine).sum()
        total = term if total is None else total + term
    if total is None:
        reference = syn_grads[0] if syn_grads else torch.zeros(())
        return reference.new_zeros(())
    return total


def per_class_gradients(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                        create_graph: bool, vectorised: bool = False) -> list[torch.Tensor]:
    """``grad_theta CE(net(images[c]), labels[c])`` for every group ``c``, per parameter.

    The network's own parameters are not touched (detached copies are used, so nothing
    accumulates in their ``.grad``); its buffers (BatchNorm statistics) are read as they are,
    so put the network in the mode you want first (eval for BatchNorm under ``vectorised``).

    Args:
        net: The network.
        images: ``(K, n, C, H, W)``, one group of ``n`` images per class.
        labels: ``(K, n)`` targets.
        create_graph: Keep the graph from the gradients back to ``images`` (the synthetic side);
            ``False`` returns plain detached tensors (the real side).
        vectorised: ``torch.func`` (``vmap`` of ``grad`` over the groups) instead of the default
            loop over the groups with ``torch.autograd.grad``. Both give the same numbers (up to
            float rounding); the loop is faster on the CPU and needs a K-th of the memory (see
            the module's notes), so the vectorised form is kept for the equality test only.

    Returns:
        One tensor of shape ``(K, *param.shape)`` per parameter, in ``named_parameters`` order.
    """
    if images.shape[:2] != labels.shape:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                         "must share the first two (group, sample) dimensions")
    names = [name for name, _ in net.named_parameters()]
    params = {name: p.detach() for name, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, (p, buffers), (x,)), y)

    with torch.set_grad_enabled(create_graph):
        if vectorised:
            grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
            return [grads[name] for name in names]
        per_group = []
        for x, y in zip(images, labels, strict=True):
            leaves = {name: t.detach().requires_grad_() for name, t in params.items()}
            with torch.enable_grad():
                g = torch.autograd.grad(loss(leaves, x, y), list(leaves.values()),
                                        create_graph=create_graph)
            per_group.append(g)
    return [torch.stack(column) for column in zip(*per_group, strict=True)]


class DC(DistillationModule):
    """Dataset condensation with gradient matching.

    One training step is one update of the synthetic images; the random network is re-drawn
    every ``outer_loop`` steps and trained ``inner_loop`` SGD steps on the synthetic images
    between updates. The published budget (1000 iterations) is ``1000 * outer_loop`` steps.

    Args:
        ipc: Synthetic images per class.
        init: ``"noise"`` (standard normal, the paper's) or ``"real"`` (random real images).
        network: Network whose gradients are matched (see ``ld3m.networks``).
        lr_img: Learning rate of the images (SGD; the paper uses 0.1).
        momentum: Momentum of the images' SGD.
        lr_net: Learning rate of the network's inner SGD (no momentum) on the synthetic images.
        outer_loop: Image updates per random network (default by IPC, the paper's:
            1 -> 1, 10 -> 10, 20 -> 20, 30 -> 30, 40 -> 40, 50 -> 50; other IPCs take the
            nearest listed IPC's value, a tie the smaller's).
        inner_loop: Epochs of the network's training on the synthetic set after each image
            update but the last of a network (default by IPC: 1 -> 1, 10 -> 50, 20 -> 25,
            30 -> 20, 40 -> 15, 50 -> 10); an epoch is one pass over the set in shuffled batches
            of ``batch_train``.
        dsa: DSA strategy: one Siamese draw per class for matching, independent draws for the
            inner training; ``"none"`` disables it.
        batch_train: Batch size of the inner training's epochs (the authors': 256).
        distance: The gradient distance: ``ours`` (the paper's), ``mse`` or ``cos`` (the other
            two of the authors' ``match_loss``).
        seed: Seed of the initialisation, the networks and the augmentation draws.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
    """

    method_name = "DC"
    #: Momentum of the network's inner SGD.
    net_momentum = 0.0  # the authors' optimizer_net: SGD(lr=lr_net), no momentum

    def __init__(self, ipc: int = 1, init: str = "noise", network: str = "ConvNet",
                 lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01,
                 outer_loop: int | None = None, inner_loop: int | None = None, dsa: str = "none",
                 batch_train: int = 256, distance: str = "ours", seed: int = 0,
                 num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__(ipc=ipc, init=init, lr_img=lr_img, momentum=momentum, seed=seed,
                         num_classes=num_classes, image_shape=image_shape)
        if not (lr_net > 0 and math.isfinite(lr_net)):
            raise ValueError(f"lr_net must be a positive number, got {lr_net}")
        if batch_train < 1:
            raise ValueError(f"batch_train must be at least 1, got {batch_train}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if outer_loop is not None and outer_loop < 1:
            raise ValueError(f"outer_loop must be at least 1, got {outer_loop}")
        if inner_loop is not None and inner_loop < 0:
            raise ValueError(f"inner_loop must be >= 0, got {inner_loop}")
        check_network_name(network)
        self.save_hyperparameters()
        default_outer, default_inner = default_loops(ipc)
        self.outer_loop = default_outer if outer_loop is None else int(outer_loop)
        self.inner_loop = default_inner if inner_loop is None else int(inner_loop)
        # the exported set and the checkpoint record the loops actually used
        self.hparams["outer_loop"], self.hparams["inner_loop"] = self.outer_loop, self.inner_loop
        self.network = network
        self.lr_net = lr_net
        self.batch_train, self.distance = int(batch_train), distance
        self.dsa = Augment(dsa) if str(dsa).strip().lower() not in ("", "none") else None
        if num_classes is not None and image_shape is not None:
            self.build_network(self.network)  # fail early on a network that does not fit the images
        # The network and its optimizer are scratch space, not submodules: they stay out of
        # state_dict and of DDP's gradient sync; on_save_checkpoint stores them for resuming.
        self._scratch: dict[str, Any] = {}
        self._restored: dict[str, Any] | None = None
        # one training step = one image update, with the network's inner SGD in between
        self.automatic_optimization = False

    # ------------------------------------------------------------------------------ the network

    def new_network(self, step: int) -> nn.Module:
        """Re-draw the network (identically on every rank) and give it a fresh optimizer."""
        net = self._scratch.get("net")
        if net is None:
            net = self.build_network(self.network)
        net = reset_parameters(net.to(self.device),
                               self.device_generator(self.shared_generator(step, _SALT_NETWORK)))
        self._scratch["net"] = net.train()
        self._scratch["opt"] = torch.optim.SGD(net.parameters(), lr=self.lr_net,
                                               momentum=self.net_momentum)
        return net

    def _network_for(self, step: int) -> nn.Module:
        """The network of ``step``: new at a block start, else the one trained so far."""
        restored, self._restored = self._restored, None
        if step % self.outer_loop == 0:
            return self.new_network(step)
        if restored is not None and restored["next_step"] == step:
            net = self.new_network(step)  # builds it and its optimizer, then overwritten
            net.load_state_dict(restored["network"])
            self._scratch["opt"].load_state_dict(restored["optimizer"])
            return net
        if self._scratch.get("net") is None or restored is not None:
            warnings.warn(f"{self.method_name}: no network state for step {step} in the middle of a "
                          f"block of {self.outer_loop}; drawing a new one (resuming is not exact)",
                          stacklevel=2)
            return self.new_network(step)
        return self._scratch["net"]

    def _freeze_norm_statistics(self, net: nn.Module, real: torch.Tensor, step: int) -> None:
        """As the authors': a BatchNorm network sets its running statistics from a fresh draw of
        ``BN_IMAGES_PER_CLASS`` real images per class in train mode, then only its BatchNorm
        layers go to eval mode (the same draw on every rank: the network stays identical)."""
        net.train()
        if not has_batchnorm(net):
            return
        fresh = None
        if self._trainer is not None and hasattr(getattr(self.trainer, "datamodule", None),
                                                 "sample_per_class"):
            fresh = self.real_data.sample_per_class(
                BN_IMAGES_PER_CLASS, self.shared_generator(step, _SALT_BN))
            fresh = fresh.to(real.device, real.dtype, non_blocking=True)
        else:  # a helper without data (LD3M's objective): the first images of the batch
            fresh = real[:, :BN_IMAGES_PER_CLASS]
        with torch.no_grad():
            net(fresh.flatten(0, 1))
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def train_network(self, step: int, images: torch.Tensor | None = None) -> None:
        """``inner_loop`` epochs of the network on the (detached) synthetic images (``images``,
        e.g. LD3M's rendered ones; default: this module's own): each epoch one pass in shuffled
        minibatches of ``batch_train``, DSA-augmented when DSA is on, as the authors' ``epoch``."""
        net, opt = self._scratch["net"], self._scratch["opt"]
        net.train()
        generator = self.shared_generator(step, _SALT_INNER_DSA)
        images = (self.images if images is None else images).detach()
        labels = self.labels
        n = images.shape[0]
        for _ in range(self.inner_loop):
            order = torch.randperm(n, generator=generator).to(images.device, non_blocking=True)
            for index in order.split(self.batch_train):
                x = images[index]
                x = self.dsa(x, generator=generator) if self.dsa is not None else x
                loss = F.cross_entropy(net(x), labels[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    # ------------------------------------------------------------------------------ the loss
    def matching_loss(self, real: torch.Tensor, net: nn.Module, generator: torch.Generator,
                      images: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient-matching loss of synthetic images against class-balanced ``real`` ``(K, n, ...)``.

        ``images`` (class-major ``(K * ipc, C, H, W)``): the synthetic images to score, e.g.
        LD3M's rendered ones; default: this module's own ``images``.
        """
        k, n = real.shape[:2]
        images = self.images if images is None else images
        syn = images.view(k, self.ipc, *images.shape[1:])
        self._freeze_norm_statistics(net, real, self.global_step)
        if self.dsa is not None:
            pairs = [self.dsa.siamese(real[c], syn[c], generator=generator) for c in range(k)]
            real = torch.stack([r for r, _ in pairs])
            syn = torch.stack([s for _, s in pairs])
        classes = torch.arange(k, device=real.device).unsqueeze(1)
        real_grads = per_class_gradients(net, real, classes.expand(k, n), create_graph=False)
        syn_grads = per_class_gradients(net, syn, classes.expand(k, self.ipc), create_graph=True)
        return gradient_distance(real_grads, syn_grads, batch_dims=1, metric=self.distance)

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        real, _ = batch
        if real.dim() != 5 or real.shape[0] != self.num_classes:
            raise ValueError(f"{self.method_name} expects class-balanced batches of "
                             f"{self.num_classes} classes, got shape {tuple(real.shape)}")
        step = self.global_step  # read before the optimizer step increments it
        net = self._network_for(step)
        loss = self.check_finite(self.matching_loss(real, net, self.step_generator()))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        if step % self.outer_loop != self.outer_loop - 1 and self.inner_loop > 0:
            self.train_network(step)
        self.log("loss", loss.detach(), prog_bar=True)
        return loss.detach()

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        net = self._scratch.get("net")
        if net is not None:
            checkpoint["ld3m_network"] = {
                "next_step": int(self.global_step),
                "network": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                "optimizer": self._scratch["opt"].state_dict(),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._restored = checkpoint.get("ld3m_network")
        if self._restored is not None:
            self._scratch.pop("net", None)


class DSA(DC):
    """DC with differentiable Siamese augmentation (Zhao & Bilen, ICML 2021).

    For every class, one augmentation draw is shared by the real and the synthetic batch before
    their gradients are taken; the inner training of the network augments too (independent
    draws). The defaults are the authors' (their ``main.py``, shared with DC) and, for ``init``
    and ``dsa``, their documented DSA command (``--init real --method DSA --dsa_strategy
    color_crop_cutout_flip_scale_rotate``).

    Args:
        ipc: Synthetic images per class.
        init: ``"real"`` (random real images, the paper's) or ``"noise"``.
        network: Network whose gradients are matched (see ``ld3m.networks``).
        lr_img: Learning rate of the images (SGD; the paper uses 0.1).
        momentum: Momentum of the images' SGD.
        lr_net: Learning rate of the network's inner SGD (no momentum) on the synthetic images.
        outer_loop: Image updates per random network (default by IPC, as DC's).
        inner_loop: Epochs of the network's inner training between image updates (default by
            IPC, as DC's).
        dsa: DSA strategy (leave out ``flip`` for digits); ``"none"`` makes this DC.
        batch_train: Batch size of the inner training's epochs (the authors': 256).
        distance: The gradient distance: ``ours``, ``mse`` or ``cos``.
        seed: Seed of the initialisation, the networks and the augmentation draws.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
    """

    method_name = "DSA"

    def __init__(self, ipc: int = 1, init: str = "real", network: str = "ConvNet",
                 lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01,
                 outer_loop: int | None = None, inner_loop: int | None = None,
                 dsa: str = DEFAULT_STRATEGY, batch_train: int = 256, distance: str = "ours",
                 seed: int = 0, num_classes: int | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__(ipc=ipc, init=init, network=network, lr_img=lr_img, momentum=momentum,
                         lr_net=lr_net, outer_loop=outer_loop, inner_loop=inner_loop, dsa=dsa,
                         batch_train=batch_train, distance=distance, seed=seed,
                         num_classes=num_classes, image_shape=image_shape)
