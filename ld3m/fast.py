"""A compiled (``torch.compile``) and channels-last fast path for the hot networks' forwards.

The distillation loops call the same small network thousands of times: DM re-initialises a
ConvNet at random every iteration and embeds a real batch (no autograd) and the synthetic
images (with autograd); an expert or an evaluation network runs its training forward on
every minibatch. :class:`CompiledForward` runs such a forward through ``torch.compile``
(inductor by default), optionally with ``channels_last`` inputs and weights, and keeps the
eager forward as the fallback:

* **No recompile per re-initialisation.** The compiled function takes the network as an
  input, and dynamo treats its parameters as graph inputs guarded on their shape, dtype,
  device and ``requires_grad``, not their values. :func:`ld3m.networks.reset_parameters`
  rewrites the same ``Parameter`` objects in place, an optimiser steps them in place, so
  neither recompiles. What does compile anew: every distinct input shape (with
  ``dynamic=False``, the default: one specialised graph per shape; DM has at most three, the
  real chunks, a remainder chunk and the synthetic batch), and grad mode (a no-grad forward and
  a forward with autograd are two graphs, the latter with its backward).
  :attr:`CompiledForward.compiles` counts the graphs this instance compiled.
* **Eager fallback.** If compiling fails (no C++ compiler for inductor, an operator it does
  not support), the failure is logged once as a warning and this instance runs the eager
  forward from then on. A genuine error of the forward itself is raised again by that eager
  call. A failure that only shows up when the backward is compiled cannot be caught here (it
  is raised by ``loss.backward()``); turn the path off then.
* **channels_last** converts the network's 4-d parameters in place (same ``Parameter``
  objects, so in-place re-initialisations keep the layout) and the input before the call;
  usable with or without compiling.

Measured on the project's 2-core CPU (one thread): ``python bench/fast_path.py``.

Wiring a training forward (e.g. :class:`ld3m.evaluation.Classifier`'s): build one instance per
module, ``self.fast = CompiledForward("forward")``, and call ``self.fast(self.net, x)`` where
``self.net(x)`` was called. It is not an ``nn.Module``: it holds no parameters, adds nothing
to ``state_dict`` and pickles without its compiled function (compiled again after unpickling).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["METHODS", "CompiledForward", "compiled_forward", "to_channels_last"]

log = logging.getLogger("ld3m")

#: The network methods a :class:`CompiledForward` can run.
METHODS = ("forward", "embed")

Backend = str | Callable[..., Any]


def to_channels_last(net: nn.Module) -> nn.Module:
    """Give every 4-d parameter and buffer of ``net`` the ``channels_last`` layout, in place.

    The tensors' storage is swapped inside the same ``Parameter`` objects (``.data``), so
    references to them (an optimiser's, a compiled graph's guards) stay valid and in-place
    re-initialisations keep the layout. Already converted tensors are left alone.

    Args:
        net: The network.

    Returns:
        ``net`` itself.
    """
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return net


def _call(net: nn.Module, method: str, x: torch.Tensor) -> torch.Tensor:
    """``net.<method>(x)``: the function that is compiled (the network is an input)."""
    return net(x) if method == "forward" else net.embed(x)


class CompiledForward:
    """``net.forward`` or ``net.embed`` through ``torch.compile``, with the eager fallback.

    Call it as ``fast(net, x)``. One instance may serve any number of networks; each network
    type, input shape and grad mode compiles once (see the module's docstring).

    Args:
        method: ``"forward"`` (logits) or ``"embed"`` (the features before the classifier).
        compile: Compile the call; ``False`` runs it eagerly (with ``channels_last`` if asked).
        channels_last: Convert the network's weights and the input to ``channels_last``.
        backend: ``torch.compile`` backend, a name (``"inductor"``, ``"aot_eager"``, ...) or
            a callable ``(graph_module, example_inputs) -> callable``.
        dynamic: ``torch.compile``'s ``dynamic``: ``False`` (one graph per input shape, the
            fastest kernels), ``None`` (dynamo's automatic dynamic shapes) or ``True``.

    Raises:
        ValueError: for an unknown ``method`` or an unknown backend name.
    """

    def __init__(self, method: str = "embed", compile: bool = True, channels_last: bool = False,
                 backend: Backend = "inductor", dynamic: bool | None = False) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(backend, str):
            from torch._dynamo import list_backends

            known = set(list_backends(exclude_tags=()))
            if backend not in known:
                raise ValueError(f"unknown torch.compile backend {backend!r}; choose one of: "
                                 f"{', '.join(sorted(known))}")
        elif not callable(backend):
            raise ValueError(f"backend must be a name or a callable, got {backend!r}")
        self.method = method
        self.compile = bool(compile)
        self.channels_last = bool(channels_last)
        self.backend = backend
        self.dynamic = dynamic
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._compiles = 0
        self._failed: str | None = None

    # ------------------------------------------------------------------------------ state
    @property
    def compiles(self) -> int:
        """Graphs this instance has compiled so far (a forward with autograd counts once)."""
        return self._compiles

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled function (asked for and not fallen back)."""
        return self.compile and self._failed is None

    @property
    def failure(self) -> str | None:
        """Why compiling failed (the fallback's reason), or ``None``."""
        return self._failed

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_compiled"] = None  # compiled functions do not pickle; compiled again on use
        return state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method!r}, compile={self.compile}, "
                f"channels_last={self.channels_last}, backend={self.backend!r}, "
                f"active={self.active}, compiles={self._compiles})")

    # ------------------------------------------------------------------------------ calling
    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """The configured backend, counting the graphs it is handed."""
        from torch._dynamo import lookup_backend

        self._compiles += 1
        backend = lookup_backend(self.backend) if isinstance(self.backend, str) else self.backend
        return backend(graph, example_inputs)

    def _build(self) -> Callable[..., torch.Tensor]:
        # dynamo keeps its compiled graphs (and counts them against its recompile limit, 8)
        # on the code object of the compiled function; a copy of ``_call``'s code per instance
        # keeps each instance's graphs, and its count, its own: otherwise a process's fifth DM
        # would silently run eagerly once the first four had compiled their two graphs each
        code = _call.__code__.replace()
        function = types.FunctionType(code, _call.__globals__, _call.__name__)
        self._compiled = torch.compile(function, backend=self._backend, dynamic=self.dynamic)
        return self._compiled

    def eager(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The eager call (with ``channels_last`` if asked): what a fallback runs."""
        if self.channels_last:
            to_channels_last(net)
            x = x.contiguous(memory_format=torch.channels_last)
        return _call(net, self.method, x)

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net.<method>(x)``, compiled when :attr:`active`.

        Args:
            net: The network (any network of :mod:`ld3m.networks`, which all have ``embed``).
            x: The input batch ``(B, C, H, W)``.
        """
        if not self.active:
            return self.eager(net, x)
        if self.channels_last:
            to_channels_last(net)
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled or self._build()
        try:
            return compiled(net, self.method, x)
        except Exception as err:  # noqa: BLE001  (any compiler failure: run eagerly instead)
            cause = getattr(err, "inner_exception", None) or err  # dynamo's wrapper: its cause
            self._failed = " ".join(f"{type(cause).__name__}: {cause}".split())[:500]
            self._compiled = None
            log.warning("torch.compile of %s.%s failed (%s); running it eagerly from now on",
                        type(net).__name__, self.method, self._failed)
            return _call(net, self.method, x)


def compiled_forward(method: str = "embed", enabled: bool = True, channels_last: bool = False,
                     **kwargs: Any) -> CompiledForward:
    """A :class:`CompiledForward` of ``method``; ``enabled=False`` gives the eager one (the
    off switch: same call, no compiling).

    Args:
        method: ``"forward"`` or ``"embed"``.
        enabled: Compile (``True``) or run eagerly (``False``).
        channels_last: Use the ``channels_last`` layout.
        **kwargs: ``backend`` and ``dynamic`` of :class:`CompiledForward`.
    """
    return CompiledForward(method, compile=enabled, channels_last=channels_last, **kwargs)
