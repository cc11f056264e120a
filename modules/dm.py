"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023).

Each step re-initialises a frozen network at random and matches, class by class, the mean
embedding of (augmented) real images to that of the (identically augmented) synthetic ones:
``loss = sum_c || mean embed(DSA(real_c)) - mean embed(DSA(syn_c)) ||^2``.

Speed: all classes are embedded in ONE forward (real images without autograd, in chunks, with
the faster no-grad convolution backend), not in a loop over classes. ``python bench/dm_speed.py
--precision fp32 --iters 3`` on a 2-core AMD EPYC (ConvNet-3, Fashion-MNIST, 256 real images per
class), seconds per iteration, batched / per-class loop / the authors' loop structure:
IPC 1: 4.11 / 4.23 / 5.10; IPC 10: 4.48 / 4.58 / 5.45; IPC 50: 5.86 / 5.70 / 5.52. The single
forward is kept: faster at IPC 1 and 10, within 3-6 % at IPC 50 (where the 500 synthetic images'
forward and backward dominate). With instance norm the two give the same loss; with batch norm
the single forward is what the authors' code does for BN networks.
"""

from __future__ import annotations

import torch
from ld3m.modules.base import DistillationModule
from torch import nn

from ld3m.augment import DEFAULT_STRATEGY as DEFAULT_DSA
from ld3m.augment import DSA
from ld3m.fast import CompiledForward
from ld3m.networks import conv_backend, has_batchnorm, reset_parameters


class DM(DistillationModule):
    """Distribution matching.

    Args:
        ipc: Synthetic images per class.
        init: ``"real"`` (random real images of the class) or ``"noise"``.
        network: Embedding network, re-initialised at random every step (see ``ld3m.networks``).
        lr_img: Learning rate of the images (SGD; the paper uses 1, and 10 for IPC >= 100).
        momentum: Momentum of the images' SGD.
        dsa: DSA strategy (one Siamese draw per class per step); ``"none"`` disables it.
        seed: Seed of the initialisation, the networks and the augmentation draws.
        num_classes: Number of classes (default: from the data module).
        image_shape: ``(C, H, W)`` (default: from the data module).
        compile: Run the embedding network's forwards (real and synthetic) through
            ``torch.compile`` (:class:`ld3m.fast.CompiledForward`): the first iteration compiles
            (tens of seconds on a CPU), later ones run faster; re-drawing the network's weights
            does not recompile. Falls back to eager, with a warning, where compiling fails. Off
            by default; the loss and gradients equal the eager ones to float tolerance.
        channels_last: Use the ``channels_last`` memory layout for the embedding network and
            its inputs (with or without ``compile``).
    """

    method_name = "DM"
    supports_fp16 = True  # automatic optimisation: Lightning scales the loss

    def __init__(self, ipc: int = 50, init: str = "real", network: str = "ConvNet",
                 lr_img: float = 1.0, momentum: float = 0.5, dsa: str = DEFAULT_DSA, seed: int = 0,
                 num_classes: int | None = None, image_shape: tuple[int, int, int] | None = None,
                 compile: bool = False, channels_last: bool = False) -> None:
        super().__init__(ipc=ipc, init=init, lr_img=lr_img, momentum=momentum, seed=seed,
                         num_classes=num_classes, image_shape=image_shape)
        self.save_hyperparameters()
        self.network = network
        self.dsa = DSA(dsa) if dsa not in ("", "none") else None
        self.real_chunk = 640
        # the fast path of the embeddings (None: plain eager calls); not an nn.Module, so it
        # stays out of the state and the checkpoints
        self.fast_embed = (CompiledForward("embed", compile=compile, channels_last=channels_last)
                           if compile or channels_last else None)
        if num_classes is not None and image_shape is not None:
            self._build_network()  # fail early on an unknown network name
        # The embedding network is scratch space, not a submodule: it is frozen, re-drawn every
        # step, and must stay out of checkpoints and of DDP's gradient sync.
        self._scratch: dict[str, nn.Module] = {}

    def _build_network(self) -> nn.Module:
        return self.build_network(self.network).requires_grad_(False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self._scratch["net"] = self._build_network()

    def embedding_network(self, generator: torch.Generator) -> nn.Module:
        """The frozen embedding network, freshly initialised from ``generator``."""
        net = self._scratch.get("net")
        if net is None:
            net = self._scratch["net"] = self._build_network()
        net = net.to(self.device)
        self._scratch["net"] = net
        return reset_parameters(net, self.device_generator(generator)).train()

    def embed(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net.embed(x)``, through the fast path when ``compile`` or ``channels_last`` is on."""
        return net.embed(x) if self.fast_embed is None else self.fast_embed(net, x)

    def matching_loss(self, real: torch.Tensor, generator: torch.Generator,
                      images: torch.Tensor | None = None) -> torch.Tensor:
        """DM loss of synthetic images against class-balanced ``real`` ``(K, n, C, H, W)``.

        ``images`` (class-major ``(K * ipc, C, H, W)``): the synthetic images to score, e.g.
        LD3M's rendered ones; default: this module's own ``images``.
        """
        k, n = real.shape[:2]
        images = self.images if images is None else images
        syn = images.view(k, self.ipc, *images.shape[1:])
        if self.dsa is not None:
            pairs = [self.dsa.siamese(real[c], syn[c], generator=generator) for c in range(k)]
            real = torch.stack([r for r, _ in pairs])
            syn = torch.stack([s for _, s in pairs])
        net = self.embedding_network(generator)
        # real side: no graph, the faster no-grad backend, chunks bound the activation memory;
        # with BatchNorm one forward of every class together, as the authors' (a chunk would
        # normalise with other statistics)
        chunk = real.shape[0] * real.shape[1] if has_batchnorm(net) else self.real_chunk
        with torch.no_grad(), conv_backend(self.device):
            real_emb = torch.cat([self.embed(net, part).float()
                                  for part in real.flatten(0, 1).split(chunk)])
        syn_emb = self.embed(net, syn.flatten(0, 1)).float()
        real_mean = real_emb.view(k, n, -1).mean(1)
        syn_mean = syn_emb.view(k, self.ipc, -1).mean(1)
        return ((real_mean - syn_mean) ** 2).sum()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        real, _ = batch
        if real.shape[0] != self.num_classes:
            raise ValueError(f"DM expects class-balanced batches of {self.num_classes} classes, "
                             f"got shape {tuple(real.shape)}")
        loss = self.check_finite(self.matching_loss(real, self.step_generator()))
        self.log("loss", loss, prog_bar=True)
        return loss
