"""GSAM: surrogate-gap guided sharpness-aware minimisation (Zhuang et al., ICLR 2022).

DATM trains its experts with it (``buffer/buffer_FTD.py`` and ``buffer/gsam/`` of
NUS-HPC-AI-Lab/DATM, taken from FTD); :class:`GSAM` reproduces that optimiser. One step, with
``g = grad L(w)`` on a minibatch:

1. the (adaptive, ASAM-style) ascent ``e = rho * T^2 g / ||T g||`` with ``T = |w|``
   elementwise (``T = 1`` when not adaptive; ``||.||`` the norm over all parameters, plus
   ``1e-12``), and ``w <- w + e``;
2. ``g_p = grad L(w + e)`` on the same minibatch (BatchNorm running statistics frozen);
3. the part of ``g`` orthogonal to ``g_p``, ``g_v = g - cos(g, g_p) ||g|| g_p / ||g_p||``, is
   descended: ``d = g_p - alpha * g_v`` (this ascends the surrogate gap);
4. ``w <- w - e``, then the base optimiser (SGD in DATM) steps along ``d`` as its gradient.

``rho`` follows the learning rate as the authors' ``ProportionScheduler``:
``rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`` with ``lr_t`` the base
optimiser's current learning rate; with a constant learning rate (DATM's experts) it is ``rho``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GSAM"]


class GSAM(torch.optim.Optimizer):
    """Wraps a base optimiser: every :meth:`step` evaluates the closure twice (at ``w`` and at
    the perturbed ``w + e``), builds GSAM's direction and lets the base optimiser step with it.

    The parameter groups and the state are the base optimiser's own (its ``state_dict`` is this
    optimiser's), so a checkpoint of the wrapper resumes the base optimiser (e.g. its momentum).

    Args:
        base_optimizer: The optimiser that takes the final step (DATM: SGD).
        rho: Radius of the perturbation (at ``lr_max`` when the schedule is on); DATM's
            experts: 0.01.
        alpha: Weight of the surrogate-gap term (the orthogonal component removed from the
            perturbed gradient); DATM's experts: 0.3.
        adaptive: Scale the perturbation by the weights (ASAM's ``T = |w|``). DATM's flag is
            ``type=bool`` with default ``True``, so it is always on there.
        rho_min: ``rho`` at ``lr_min`` (default ``rho``: constant).
        lr_max: Learning rate at which ``rho`` applies (default: the base optimiser's first
            group's learning rate now).
        lr_min: Learning rate at which ``rho_min`` applies (default ``lr_max``).
        model: The network, whose BatchNorm layers keep their running statistics during the
            second (perturbed) forward pass, as the authors'; ``None``: no such handling.
        eps: Added to the norms in the divisions (the authors' ``1e-12``).

    Raises:
        ValueError: on bad values (negative ``rho`` or ``alpha``, ``lr_max < lr_min``, a
            ``rho_min`` above ``rho``, or a varying ``rho`` with a constant learning rate).
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.01,
                 alpha: float = 0.3, adaptive: bool = True, rho_min: float | None = None,
                 lr_max: float | None = None, lr_min: float | None = None,
                 model: nn.Module | None = None, eps: float = 1e-12) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(f"base_optimizer must be a torch optimiser, got {type(base_optimizer).__name__}")
        rho_min = rho if rho_min is None else rho_min
        lr_max = float(base_optimizer.param_groups[0]["lr"]) if lr_max is None else lr_max
        lr_min = lr_max if lr_min is None else lr_min
        for name, value in (("rho", rho), ("rho_min", rho_min), ("alpha", alpha), ("eps", eps),
                            ("lr_max", lr_max), ("lr_min", lr_min)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if rho_min > rho:
            raise ValueError(f"rho_min ({rho_min}) must not exceed rho ({rho})")
        if lr_max < lr_min:
            raise ValueError(f"lr_max ({lr_max}) must not be below lr_min ({lr_min})")
        if lr_max == lr_min and rho_min != rho:
            raise ValueError(f"a constant learning rate ({lr_max}) needs a constant rho: "
                             f"rho_min ({rho_min}) must equal rho ({rho})")
        super().__init__([p for group in base_optimizer.param_groups for p in group["params"]],
                         dict(base_optimizer.defaults))
        self.base_optimizer = base_optimizer
        self._share_base()
        self.rho, self.rho_min, self.alpha, self.adaptive = float(rho), float(rho_min), float(alpha), bool(adaptive)
        self.lr_max, self.lr_min, self.eps = float(lr_max), float(lr_min), float(eps)
        self.model = model

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def rho_at(self, lr: float) -> float:
        """The perturbation radius at learning rate ``lr`` (the authors' proportion schedule)."""
        if self.lr_max > self.lr_min:
            return self.rho_min + (self.rho - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One GSAM step.

        Args:
            closure: Zeroes the gradients, computes the loss on the (fixed) minibatch, calls
                ``backward`` and returns the loss. It is called twice.

        Returns:
            What the first closure call returned (the loss at the unperturbed weights).
        """
        if closure is None:
            raise ValueError("GSAM needs a closure (zero the gradients, compute the loss, "
                             "backward, return the loss): it evaluates it twice per step")
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        grads = [p.grad.detach().clone() for p in params]  # g at w
        rho = self.rho_at(float(self.param_groups[0]["lr"]))

        # 1. ascend to w + e, e = rho T^2 g / (||T g|| + eps)
        scaled = [(p.abs() * g) if self.adaptive else g for p, g in zip(params, grads, strict=True)]
        scale = rho / (_norm(scaled) + self.eps)
        perturbations = []
        for p, g in zip(params, grads, strict=True):
            e = g * scale.to(p)
            if self.adaptive:
                e = e * p.pow(2)
            p.add_(e)
            perturbations.append(e)

        # 2. g_p at w + e, BatchNorm statistics untouched
        with _frozen_batch_norm(self.model), torch.enable_grad():
            closure()
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if missing:
            raise RuntimeError("GSAM: the second closure call left parameters without gradient")
        perturbed = [p.grad for p in params]

        # 3. d = g_p - alpha (g - cos(g, g_p) ||g|| g_p / ||g_p||)
        inner = 0.0
        for g, gp in zip(grads, perturbed, strict=True):
            inner = inner + torch.sum(g * gp)
        norm_p, norm_g = _norm(perturbed), _norm(grads)
        cosine = inner / (norm_p * norm_g + self.eps)
        for g, gp in zip(grads, perturbed, strict=True):
            vertical = g - cosine * norm_g * gp / (norm_p + self.eps)
            gp.add_(vertical, alpha=-self.alpha)

        # 4. back to w, then the base step along d
        for p, e in zip(params, perturbations, strict=True):
            p.sub_(e)
        self.base_optimizer.step()
        return loss


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the concatenation of ``tensors`` (the norm of their norms)."""
    return torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)


@contextlib.contextmanager
def _frozen_batch_norm(model: nn.Module | None) -> Iterator[None]:
    """BatchNorm layers of ``model`` with momentum 0 (running statistics unchanged) inside."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)] if model is not None else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum
