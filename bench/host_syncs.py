"""Count the blocking host-device synchronisations of a steady-state training step of every method.

No GPU is needed. Each method runs on PyTorch's ``meta`` device (shapes and dtypes, no data),
its host-side draws on the CPU as always, and a dispatch mode counts, inside one training step
(forward, backward, optimiser step, the method's own inner work), what would make the host wait
for a GPU:

- a scalar read of a device tensor (``.item()``, ``bool()``, ``int()``, ``float()``,
  ``.tolist()``: ``aten._local_scalar_dense``), answered with a placeholder so the step goes on;
- a blocking copy between host and device (``.to(device)``, ``.cpu()``, ``copy_`` without
  ``non_blocking=True``).

Non-blocking host-to-device copies (small draws staged by the driver) are not syncs and are not
counted. The first steps (building networks, the generator, deciding a gradient mode) are not
steady state: steps 2 and 3 are counted and the larger count is reported (DC's two steps are one
network block: a new network, then an image update with the inner training).

    python bench/host_syncs.py            # | method | syncs per step |
    python bench/host_syncs.py --detail   # also what the syncs are
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ld3m import modules
from ld3m.testing import tiny_generator, write_stand_in_buffer

METHODS = ("DM", "DC", "DSA", "DD", "MTT", "DATM", "LD3M")
NET = "ConvNetW32"
DEVICE = torch.device("meta")


class SyncCounter(TorchDispatchMode):
    """Counts scalar reads of device tensors and blocking host <-> device copies.

    ``torch.tensor(data, device=...)`` / ``torch.as_tensor`` build on the host and copy with
    blocking, below the dispatcher; they are counted by wrapping the two functions (calls from
    Python: ld3m's and its libraries', e.g. a diffusers UNet given a Python timestep).
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: Counter[str] = Counter()
        self._wrapped: list[tuple[str, object]] = []

    def __enter__(self):
        for name in ("tensor", "as_tensor"):
            real = getattr(torch, name)
            self._wrapped.append((name, real))
            setattr(torch, name, self._counting(name, real))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._wrapped:
            setattr(torch, name, real)
        self._wrapped.clear()
        return super().__exit__(*exc)

    def _counting(self, name: str, real):
        def build(data, *args, **kwargs):
            device = kwargs.get("device")
            on_device = device is not None and torch.device(device) == DEVICE
            if on_device and not (isinstance(data, torch.Tensor) and data.device == DEVICE):
                self.events[f"blocking copy: torch.{name}(..., device)"] += 1
            return real(data, *args, **kwargs)
        return build

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device == DEVICE:
            self.events[f"scalar read ({args[0].dtype})"] += 1
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        if func is torch.ops.aten._to_copy.default:
            source = args[0].device
            target = kwargs.get("device") or source
            if source.type != torch.device(target).type and not kwargs.get("non_blocking"):
                self.events[f"blocking copy {source.type} -> {torch.device(target).type}"] += 1
        if func is torch.ops.aten.copy_.default:
            source, target = args[1].device, args[0].device
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if source.type != target.type and not non_blocking:
                self.events[f"blocking copy_ {source.type} -> {target.type}"] += 1
        return func(*args, **kwargs)


class _Strategy:
    root_device = DEVICE

    @staticmethod
    def broadcast(obj, src=0):
        return obj

    @staticmethod
    def barrier(name=None):
        pass

    @staticmethod
    def reduce(tensor, *args, **kwargs):
        return tensor


class _Trainer:
    """What a method's step reads from its trainer, single process."""

    def __init__(self) -> None:
        self.global_step, self.global_rank, self.world_size = 0, 0, 1
        self.is_global_zero = True
        self.strategy = _Strategy()
        self.precision = "32-true"
        self.progress_bar_callback = None
        self.loggers = []


class _LightningLikeOptimizer:
    """What ``self.optimizers()`` gives a manually optimised method: ``step`` runs the module's
    ``on_before_optimizer_step`` hook first, as Lightning's ``LightningOptimizer`` does."""

    def __init__(self, optimizer, module) -> None:
        self.optimizer, self.module = optimizer, module

    def zero_grad(self, *args, **kwargs):
        self.optimizer.zero_grad(*args, **kwargs)

    def step(self, closure=None):
        if closure is not None:
            closure()
        self.module.on_before_optimizer_step(self.optimizer)
        self.optimizer.step()

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


@contextlib.contextmanager
def _meta_autocast():
    """``torch.autocast("meta")`` is not supported: a no-op there, the real one elsewhere."""
    real = torch.autocast

    class Autocast:
        def __new__(cls, device_type, *args, **kwargs):
            if str(device_type) == "meta":
                return contextlib.nullcontext()
            return real(device_type, *args, **kwargs)

    torch.autocast = Autocast
    try:
        yield
    finally:
        torch.autocast = real


def build(method: str, folder: Path):
    """The method (on the meta device, wired to a stub trainer) and its batch."""
    classes, shape = 10, (1, 28, 28)
    common = dict(ipc=2, num_classes=classes, image_shape=shape, seed=0)
    if method == "DM":
        module = modules.DM(network=NET, **common)
    elif method in ("DC", "DSA"):
        module = getattr(modules, method)(network=NET, outer_loop=2, inner_loop=1, **common)
    elif method == "DD":
        module = modules.DD(network=NET, **common)
    elif method in ("MTT", "DATM"):
        buffer = write_stand_in_buffer(folder / "buffer", experts=2, epochs=4, network=NET,
                                       shape=shape, classes=classes, dataset="FashionMNIST")
        extra = {"current_max_start_epoch": 1, "expansion_end": 2} if method == "DATM" else {}
        module = getattr(modules, method)(str(buffer), syn_steps=3, max_start_epoch=2,
                                          gradient="unroll", **extra, **common)
    elif method == "LD3M":
        classes, shape = 3, (1, 16, 16)
        generator = tiny_generator(num_classes=classes).save_pretrained(folder / "generator")
        module = modules.LD3M(str(generator), ipc=2, steps=2, chunk_size=2, network=NET,
                              num_classes=classes, image_shape=shape, seed=0)
    else:
        raise ValueError(method)
    module = module.to(DEVICE)
    module._trainer = _Trainer()
    module.log = lambda *args, **kwargs: None
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.optimizers = lambda use_pl_optimizer=True: _LightningLikeOptimizer(optimizer, module)
    module.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    if method in ("MTT", "DATM"):
        def batch(step):
            return torch.tensor(step)
    else:
        real = torch.empty(classes, 8, *shape, device=DEVICE)
        labels = torch.arange(classes, device=DEVICE).repeat_interleave(8).view(classes, 8)

        def batch(step):
            return real, labels
    return module, optimizer, batch


def step(module, optimizer, batch, index: int) -> None:
    """One training step as Lightning runs it (automatic or manual optimisation)."""
    module.trainer.global_step = index
    if not module.automatic_optimization:  # the method steps its optimizer itself
        module.training_step(batch(index), index)
        return

    def closure():  # Lightning's: zero_grad, training_step, backward, the pre-step hook
        optimizer.zero_grad()
        loss = module.training_step(batch(index), index)
        if loss is not None:
            loss.backward()
        module.on_before_optimizer_step(optimizer)
        return loss

    module.optimizer_step(0, index, optimizer, closure)


def count(method: str) -> tuple[int, Counter[str]]:
    with tempfile.TemporaryDirectory() as tmp, _meta_autocast():
        module, optimizer, batch = build(method, Path(tmp))
        for index in range(2):  # warm-up (networks, generator, gradient mode): not counted
            with SyncCounter():
                step(module, optimizer, batch, index)
        worst, detail = -1, Counter()
        for index in (2, 3):
            counter = SyncCounter()
            with counter:
                step(module, optimizer, batch, index)
            if sum(counter.events.values()) > worst:
                worst, detail = sum(counter.events.values()), counter.events
    return worst, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--detail", action="store_true", help="list what the syncs are")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for method in args.methods:
        syncs, detail = count(method)
        rows.append((method, syncs, detail))
    print("| method | syncs per step |")
    print("|---|---|")
    for method, syncs, _ in rows:
        print(f"| {method} | {syncs} |")
    if args.detail:
        for method, _, detail in rows:
            print(f"\n{method}: " + (", ".join(f"{k}: {v}" for k, v in detail.most_common())
                                    or "none"))


if __name__ == "__main__":
    main()
