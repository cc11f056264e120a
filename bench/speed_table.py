"""ld3m's speed table: the rows of issue 23's comparison with the authors' code, before and after.

Fashion-MNIST, ConvNet-3, DSA, 256 real images per class (the authors' settings), on this CPU:

* ``DM``: seconds per iteration (one image update: a fresh random network, the real and
  synthetic embeddings, the backward and the SGD step) at IPC 1/10/50, ``reference`` (the
  authors' per-class loop structure on this machine, ``bench/dm_speed.py``'s), ``eager``
  (before) and ``compiled`` (after: ``--model.compile true``, the compilation not counted);
* ``DC`` / ``DSA``: seconds per published iteration (``outer_loop`` image updates and
  ``outer_loop - 1`` inner blocks, as ``bench/gm_speed.py`` times them);
* ``evaluation``: seconds per 100 training epochs of one evaluation network (ConvNet-3, DSA,
  batch 256) on IPC random real images per class (the slope between ``--epochs`` and twice as
  many: the test pass and the start-up cancel out), ``sequential`` (one ``Trainer`` per
  network: before) and ``stacked`` (``--stack K`` networks as one vmapped model, seconds per
  network: after);
* ``buffer``: seconds per expert epoch of ``ld3m buffer`` (60,000 images, batch 256, DSA), the
  slope between ``--buffer-batches`` and twice as many batches, scaled to the epoch's 235;
* with ``--threads 1 2``, every row for one and two threads; the peak RSS of each row's process;
* the ATen operators one DM step dispatches (a proxy for GPU kernel launches), the batched
  step against a per-class loop of the same step (the authors' structure), counted on the meta
  device.

Each row runs in its own process (its peak RSS is its own). The authors' figures (issue 23, one
thread): DM IPC 10 7.0 s, DC IPC 10 460 s, a 300-epoch evaluation 246 s (82 s per 100 epochs).

    python bench/speed_table.py                                   # everything (long)
    python bench/speed_table.py --rows dm eval --ipc 10 --threads 1 --iters 2
    python bench/speed_table.py --rows ops
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AUTHORS = {("DM", 10): 7.0, ("DC", 10): 460.0, ("evaluation", 10): 246.0 / 3}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def dm_row(ipc: int, variant: str, iters: int, batch_per_class: int) -> dict:
    """``reference``: the authors' loop structure (``bench/dm_speed.py``); ``eager`` and
    ``compiled``: ``ld3m.modules.DM`` (``bench/fast_path.py``), at this process's threads."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    if variant == "reference":
        from dm_speed import one

        return {"seconds": one(ipc, "fp32", "reference", iters, batch_per_class)["sec_per_iter"]}
    from fast_path import one

    row = one(ipc, variant, iters, batch_per_class, threads=torch.get_num_threads())
    return {"seconds": row["sec_per_iter"]}


def gm_row(method: str, ipc: int, iters: int, batch_per_class: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from gm_speed import measure

    row = measure(method, ipc, iters, batch_per_class, threads=0)
    return {"seconds": row["iteration"], "detail": f"outer {row['outer']} x {row['update']:.2f} s "
                                                     f"+ {row['outer'] - 1} x {row['inner']:.2f} s"}


def eval_row(ipc: int, variant: str, epochs: int, stack: int) -> dict:
    """Seconds per 100 training epochs of one network: the slope between ``epochs`` and
    ``2 x epochs`` after a warm-up run (the test pass and the start-up cancel out)."""
    from ld3m.datamodules import FashionMNIST

    from ld3m.evaluation import random_real_set, train_and_test, train_and_test_stacked

    dm = FashionMNIST()
    dm.setup("fit")
    synthetic = random_real_set(dm, ipc, seed=0)

    def run(e: int) -> float:  # seconds per network for E + 1 = e epochs
        start = time.perf_counter()
        if variant == "stacked":
            train_and_test_stacked([synthetic], dm, "ConvNet", epochs=e - 1, lr=0.01,
                                   seeds=list(range(stack)), accelerator="cpu")
            return (time.perf_counter() - start) / stack
        train_and_test(synthetic, dm, "ConvNet", epochs=e - 1, lr=0.01, seed=0, accelerator="cpu")
        return time.perf_counter() - start

    run(2)  # one-time costs (the test split's cache, the first Trainer) out of the slope
    short, long = run(epochs), run(2 * epochs)
    return {"seconds": (long - short) * 100 / epochs,
            "detail": f"{epochs} epochs {short:.1f} s, {2 * epochs} epochs {long:.1f} s"}


def buffer_row(batches: int) -> dict:
    """Seconds per expert epoch: the slope between ``batches`` and ``2 x batches`` timed
    batches (the start-up cancels out), scaled to the epoch's batches."""
    from ld3m.datamodules import FashionMNIST

    from ld3m.commands import buffer

    data = FashionMNIST()
    data.setup("fit")
    per_epoch = -(-len(data.train_split.labels) // 256)

    def run(n: int) -> float:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            buffer(data, folder=folder, experts=1, epochs=1, limit_train_batches=n,
                   progress_bar=False, accelerator="cpu")
            return time.perf_counter() - start

    run(1)  # one-time costs out of the slope
    short, long = run(batches), run(2 * batches)
    return {"seconds": (long - short) * per_epoch / batches,
            "detail": f"{batches} batches {short:.1f} s, {2 * batches} batches {long:.1f} s, "
                      f"{per_epoch} per epoch"}


def op_counts(ipc: int) -> dict:
    """ATen operators dispatched by one DM step (loss, backward, SGD step), batched against a
    per-class loop, on the meta device (shapes only; the counts do not depend on values)."""
    import torch
    from ld3m.modules import DM
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    classes, shape, n = 10, (1, 28, 28), 8
    model = DM(ipc=ipc, num_classes=classes, image_shape=shape).to("meta")
    optimizer = model.configure_optimizers()
    real = torch.empty(classes, n, *shape, device="meta")

    def batched() -> torch.Tensor:
        return model.matching_loss(real, torch.Generator().manual_seed(0))

    def loop() -> torch.Tensor:  # the authors' structure: one class at a time
        net = model.embedding_network(torch.Generator().manual_seed(0))
        syn = model.images.view(classes, ipc, *shape)
        loss = 0.0
        for c in range(classes):
            r, s = model.dsa.siamese(real[c], syn[c], generator=torch.Generator().manual_seed(c))
            with torch.no_grad():
                r_mean = net.embed(r).float().mean(0)
            loss = loss + ((r_mean - net.embed(s).float().mean(0)) ** 2).sum()
        return loss

    sys.path.insert(0, str(Path(__file__).parent))
    from host_syncs import _meta_autocast  # torch.autocast("meta") is not supported

    counts = {}
    with _meta_autocast():
        for name, fn in (("batched", batched), ("per-class loop", loop)):
            fn().backward()  # warm-up: the network is built
            counter = Count()
            with counter:
                optimizer.zero_grad()
                fn().backward()
                optimizer.step()
            counts[name] = counter.n
    return counts


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "DM":
        row = dm_row(spec["ipc"], spec["variant"], spec["iters"], spec["batch_per_class"])
    elif kind in ("DC", "DSA"):
        row = gm_row(kind, spec["ipc"], spec["iters"], spec["batch_per_class"])
    elif kind == "evaluation":
        row = eval_row(spec["ipc"], spec["variant"], spec["epochs"], spec["stack"])
    else:
        row = buffer_row(spec["batches"])
    return {**row, "peak_gb": _peak_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["dm", "gm", "eval", "buffer", "ops"],
                        choices=["dm", "gm", "eval", "buffer", "ops"])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (DM, DC/DSA)")
    parser.add_argument("--batch-per-class", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20, help="evaluation epochs timed")
    parser.add_argument("--stack", type=int, default=5,
                        help="networks per stacked evaluation (0: no stacked rows)")
    parser.add_argument("--buffer-batches", type=int, default=20)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    specs = []
    for threads in args.threads:
        common = {"threads": threads, "iters": args.iters, "batch_per_class": args.batch_per_class}
        for ipc in args.ipc:
            if "dm" in args.rows:
                specs += [{**common, "kind": "DM", "ipc": ipc, "variant": v}
                          for v in ("reference", "eager", "compiled")]
            if "gm" in args.rows:
                specs += [{**common, "kind": m, "ipc": ipc, "variant": "eager"} for m in ("DC", "DSA")]
            if "eval" in args.rows:
                specs += [{**common, "kind": "evaluation", "ipc": ipc, "variant": v,
                           "epochs": args.epochs, "stack": args.stack}
                          for v in ("sequential", "stacked") if v == "sequential" or args.stack]
        if "buffer" in args.rows:
            specs.append({**common, "kind": "buffer", "ipc": 0, "variant": "eager",
                          "batches": args.buffer_batches})
    if specs:
        print("| work | IPC | threads | variant | seconds | peak RSS (GB) | authors' (1 thread) | ratio |\n"
              "|---|---|---|---|---|---|---|---|", flush=True)
    for spec in specs:
        cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"| {spec['kind']} | {spec['ipc']} | {spec['threads']} | {spec['variant']} | "
                  f"failed: {done.stderr.strip().splitlines()[-1][:80]} | | | |", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        unit = {"DM": "s / iteration", "DC": "s / iteration", "DSA": "s / iteration",
                "evaluation": "s / 100 epochs", "buffer": "s / expert epoch"}[spec["kind"]]
        authors = AUTHORS.get((spec["kind"], spec["ipc"]))
        ratio = f"{row['seconds'] / authors:.2f}" if authors and spec["threads"] == 1 else ""
        print(f"| {spec['kind']} ({unit}) | {spec['ipc'] or '-'} | {spec['threads']} | "
              f"{spec['variant']} | {row['seconds']:.2f} | {row['peak_gb']:.2f} | "
              f"{authors if authors else ''} | {ratio} |", flush=True)
    if "ops" in args.rows:
        print("\n| DM step, IPC | ATen ops, batched | ATen ops, per-class loop |\n|---|---|---|")
        for ipc in args.ipc:
            counts = op_counts(ipc)
            print(f"| {ipc} | {counts['batched']} | {counts['per-class loop']} |", flush=True)


if __name__ == "__main__":
    main()
