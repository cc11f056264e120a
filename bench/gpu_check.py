"""Every method for a few steps on one CUDA GPU (bf16-mixed), and on two when there are two.

For each of DM, DC, DSA, DD, MTT, DATM, DQ and LD3M it runs a real Lightning ``fit`` on random
data in CIFAR's shapes (LD3M: the tiny random generator's 1 x 16 x 16 images; MTT/DATM: a
stand-in buffer) and prints, per method:

- seconds per step (median of the steady steps, the device synchronised at each step's end),
- peak CUDA memory,
- the data share of the step (building the real batch on the device, ``on_after_batch_transfer``),
- the synchronisations CUDA reports inside the steady steps (``torch.cuda.set_sync_debug_mode``),
  Lightning's loop included.

    python bench/gpu_check.py                      # one GPU, then two processes if 2 GPUs
    python bench/gpu_check.py --device cpu --steps 3   # a smoke run of the script on the CPU

It is sized to take well under 8 minutes on one large GPU. Without CUDA it says so and stops
(unless ``--device cpu``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from ld3m import modules
from ld3m.testing import RandomImageData, tiny_generator, write_stand_in_buffer

METHODS = ("DM", "DC", "DSA", "DD", "MTT", "DATM", "DQ", "LD3M")


class Probe(L.Callback):
    """Times the steady steps, their data part, and counts CUDA's sync warnings in them."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: list[float] = []
        self.data: list[float] = []
        self.syncs = 0
        self._start = 0.0
        self._caught = None

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module.device)
        self._start = time.perf_counter()
        if trainer.global_step >= self.warmup and pl_module.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.syncs += sum("synchroniz" in str(w.message).lower() for w in self._records)
            self._caught.__exit__(None, None, None)
            self._caught = None
        self._sync(pl_module.device)
        if trainer.global_step > self.warmup:
            self.steps.append(time.perf_counter() - self._start)


class TimedData(RandomImageData):
    """Random data whose device-side batch building is timed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        device = getattr(getattr(batch, "index", None), "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = super().on_after_batch_transfer(batch, dataloader_idx)
        if device is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds.append(time.perf_counter() - start)
        return out


def build(method: str, folder: Path, small: bool):
    """The method and its data (random CIFAR shapes; LD3M: the tiny generator's)."""
    ipc, n = (2, 8) if small else (10, 128)
    if method == "LD3M":  # the generator's statistics are the random data's
        generator = tiny_generator(num_classes=3, image_mean=(0.5,), image_std=(0.25,))
        generator = generator.save_pretrained(folder / "generator")
        data = TimedData(num_classes=3, image_shape=(1, 16, 16), train_images=300,
                         batch_per_class=min(n, 64))
        return modules.LD3M(str(generator), ipc=ipc, steps=4 if small else 10, chunk_size=None,
                            network="ConvNetW32"), data
    data = TimedData(train_images=5_000 if small else 50_000, batch_per_class=n)
    if method in ("MTT", "DATM"):
        data.setup("fit")  # DATM starts from the images its stand-in expert gets right
        buffer = write_stand_in_buffer(folder / "buffer", experts=2, epochs=4, network="ConvNet",
                                       shape=(3, 32, 32), classes=10, dataset="RandomImages",
                                       labels=data.train_split.labels)
        extra = {"current_max_start_epoch": 1, "expansion_end": 2} if method == "DATM" else {}
        return getattr(modules, method)(str(buffer), ipc=ipc, syn_steps=5 if small else 20,
                                        max_start_epoch=2, **extra), data
    if method in ("DC", "DSA"):
        return getattr(modules, method)(ipc=ipc, outer_loop=2, inner_loop=2), data
    if method == "DQ":
        return modules.DQ(ipc=ipc, embed_steps=5 if small else 50), data
    return getattr(modules, method)(ipc=ipc), data


def run(method: str, accelerator: str, devices: int, steps: int, small: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, data = build(method, Path(tmp), small)
        probe = Probe(warmup=2)
        trainer = L.Trainer(accelerator=accelerator, devices=devices,
                            strategy="ddp" if devices > 1 else "auto",
                            precision="bf16-mixed", max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, log_every_n_steps=10_000,
                            default_root_dir=tmp, callbacks=[probe])
        if accelerator == "gpu":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator == "gpu" else float("nan")
    step = statistics.median(probe.steps) if probe.steps else float("nan")
    data_s = statistics.median(data.seconds[2:]) if len(data.seconds) > 2 else 0.0
    return {"step": step, "peak": peak, "data": data_s / step if probe.steps else float("nan"),
            "syncs": probe.syncs / max(len(probe.steps), 1), "wall": wall,
            "rank": trainer.global_rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--devices", type=int, default=None,
                        help="processes (default: 1, then 2 when two GPUs are there)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--small", action="store_true", help="tiny sizes (the CPU smoke run)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (use --device cpu --small for a smoke run)")
        return
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    devices = args.devices or 1
    rows = []
    for method in args.methods:
        result = run(method, accelerator, devices, args.steps, args.small or accelerator == "cpu")
        if result["rank"] == 0:  # under DDP the other ranks print nothing
            rows.append((method, devices, result))
    if not rows:
        return
    name = torch.cuda.get_device_name(0) if accelerator == "gpu" else "CPU"
    print(f"\n{name}, bf16-mixed, {args.steps} steps (median of the steady ones), "
          f"{devices} process(es):\n")
    print("| method | processes | s / step | peak CUDA memory (GiB) | data share of the step | "
          "syncs per step (CUDA's count) | wall s |")
    print("|---|---|---|---|---|---|---|")

    def show(value: float, fmt: str) -> str:
        return "-" if value != value else format(value, fmt)  # nan: DQ takes no steps

    for method, count, r in rows:
        print(f"| {method} | {count} | {show(r['step'], '.4f')} | {show(r['peak'], '.2f')} | "
              f"{show(100 * r['data'], '.1f')} % | {r['syncs']:.1f} | {r['wall']:.1f} |")
    sys.stdout.flush()
    if args.devices is None and accelerator == "gpu" and torch.cuda.device_count() >= 2:
        # two processes in a fresh run: Lightning's DDP re-launches this script for rank 1
        subprocess.run([sys.executable, __file__, "--devices", "2", "--steps", str(args.steps),
                        "--methods", *args.methods], check=False)


if __name__ == "__main__":
    main()
