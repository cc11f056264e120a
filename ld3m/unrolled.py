"""The pieces of DD's unrolled training shared by the method and its evaluation protocol.

DD (Wang et al. 2018) trains a network for ``steps x epochs`` plain gradient steps, step ``s``
on the ``s``-th group of synthetic images with its own learned learning rate, and scores the
final weights on real data. A set of ``ipc`` images per class is split into ``steps`` groups of
``ipc / steps`` images per class (so IPC 10 with 10 steps is DD's "one image per class per
step"); the epochs repeat the steps in order.

A distilled DD set stores what its protocol needs: ``lr`` (``epochs x steps`` learning rates),
``meta["dd"]`` (network, steps, epochs, init mode) and, per init mode, the initial weights as
``extra`` tensors: ``theta0.<name>`` for the fixed modes, ``pool.<i>.<name>`` for
``random_pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

#: DD's four ways of choosing the initial weights of each unrolled run.
INIT_MODES = ("random", "fixed", "random_pretrained", "fixed_pretrained")

#: The most steps a default split uses (DD's published ``steps``).
MAX_DEFAULT_STEPS = 10


def default_steps(ipc: int) -> int:
    """The largest divisor of ``ipc`` that is at most 10 (IPC 1 -> 1, 10 -> 10, 50 -> 10, 5 -> 5)."""
    return max(d for d in range(1, min(ipc, MAX_DEFAULT_STEPS) + 1) if ipc % d == 0)


def step_batches(images: torch.Tensor, num_classes: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split class-major ``images`` (``num_classes * ipc`` of them) into ``steps`` labelled batches.

    Batch ``s`` holds images ``s * m .. (s + 1) * m - 1`` of every class, ``m = ipc / steps``.

    Raises:
        ValueError: if the images do not split evenly.
    """
    total = images.shape[0]
    if total % num_classes:
        raise ValueError(f"{total} images do not split into {num_classes} classes")
    ipc = total // num_classes
    if steps < 1 or ipc % steps:
        raise ValueError(f"steps must divide the images per class ({ipc}), got {steps}")
    per_step = ipc // steps
    grouped = images.reshape(num_classes, steps, per_step, *images.shape[1:])
    labels = torch.arange(num_classes, device=images.device).repeat_interleave(per_step)
    return [(grouped[:, s].flatten(0, 1), labels) for s in range(steps)]


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in a lower precision (autocast), else unchanged (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def unroll(net: nn.Module, params: dict[str, torch.Tensor],
           batches: list[tuple[torch.Tensor, torch.Tensor]], lrs: torch.Tensor, *,
           create_graph: bool = True) -> dict[str, torch.Tensor]:
    """Plain gradient descent of ``net`` from ``params``: one step per learning rate in ``lrs``.

    Step ``i`` uses ``batches[i % len(batches)]`` and ``lrs.reshape(-1)[i]``. With
    ``create_graph`` the returned weights keep the graph back to the batches' images and the
    learning rates (DD's outer gradient); the starting ``params`` need ``requires_grad``.
    The network's buffers are used as they are.
    """
    buffers = dict(net.named_buffers())
    names = list(params)
    with torch.enable_grad():  # the inner gradients are needed even under no_grad
        for i, lr in enumerate(lrs.reshape(-1)):
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(at_least_float32(functional_call(net, {**params, **buffers}, (x,))), y)
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
            params = {n: params[n] - lr * g for n, g in zip(names, grads, strict=True)}
    return params


def pack_weights(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix.name: tensor}`` (CPU, float32, contiguous) for a synthetic set's ``extra``."""
    return {f"{prefix}.{name}": w.detach().float().cpu().contiguous() for name, w in weights.items()}


def unpack_weights(extra: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_weights` (empty if no tensor starts with ``prefix.``)."""
    start = prefix + "."
    return {name[len(start):]: t for name, t in extra.items() if name.startswith(start)}


def unpack_pool(extra: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The ``pool.<i>.*`` weights of a ``random_pretrained`` set, in order of ``i``."""
    indices = sorted({int(name.split(".")[1]) for name in extra if name.startswith("pool.")})
    return [unpack_weights(extra, f"pool.{i}") for i in indices]
