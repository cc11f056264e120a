"""Seconds per iteration and peak memory of DC and DSA on Fashion-MNIST (IPC 1/10/50).

What ``ld3m.modules.DC`` / ``DSA`` do per Lightning step, timed piece by piece on the CPU:
``update`` is one image update (a fresh or carried network, BatchNorm handling, Siamese DSA for
DSA, the looped per-class gradients of the real and synthetic batches, the distance, its
backward and the SGD step); ``inner`` is the ``inner_loop`` SGD steps of the network on the
synthetic images that follow every update but the last of a network. One published DC
*iteration* is ``outer_loop`` updates and ``outer_loop - 1`` inner blocks, so
``s / iteration = outer * update + (outer - 1) * inner`` (the published budget is 1000 of them).
Each (method, IPC) runs in its own process so the peak RSS (``ru_maxrss``) is its own.

    python bench/gm_speed.py                       # DC and DSA, IPC 1 10 50, 256 real per class
    python bench/gm_speed.py --ipc 10 --batch-per-class 64 --iters 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(method: str, ipc: int, iters: int, batch_per_class: int, threads: int) -> dict:
    import torch
    from ld3m.datamodules import FashionMNIST
    from ld3m.modules import DC, DSA

    if threads:
        torch.set_num_threads(threads)
    dm = FashionMNIST(batch_per_class=batch_per_class)
    dm.setup("fit")
    stream = iter(dm.train_dataloader())
    model = {"DC": DC, "DSA": DSA}[method](ipc=ipc, num_classes=dm.num_classes,
                                            image_shape=dm.image_shape)
    model.initialise(dm)
    optimizer = torch.optim.SGD([model.images], lr=model.lr_img, momentum=model.momentum)
    updates, inners = [], []
    for step in range(iters + 1):  # the first of each is a warm-up
        real, _ = next(stream)
        start = time.perf_counter()
        # a new network every update (the first update of a block: the most work)
        net = model.new_network(step)
        loss = model.matching_loss(real, net, model.shared_generator(step, 99))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        middle = time.perf_counter()
        if model.inner_loop:
            model.train_network(step)
        end = time.perf_counter()
        if step:
            updates.append(middle - start)
            inners.append(end - middle)
    update, inner = statistics.median(updates), statistics.median(inners)
    outer = model.outer_loop
    return {"method": method, "ipc": ipc, "outer": outer, "inner_loop": model.inner_loop,
            "update": update, "inner": inner, "iteration": outer * update + (outer - 1) * inner,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["DC", "DSA"])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--batch-per-class", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, ipc = args.child.split(":")
        print(json.dumps(measure(method, int(ipc), args.iters, args.batch_per_class, args.threads)))
        return
    print(f"Fashion-MNIST, ConvNet-3, {args.batch_per_class} real images per class, "
          f"median of {args.iters} (after a warm-up)")
    print("| method | IPC | outer x inner | s / update | s / inner block | s / iteration | "
          "peak RSS (GB) |\n|---|---|---|---|---|---|---|", flush=True)
    for method in args.methods:
        for ipc in args.ipc:
            out = subprocess.run([sys.executable, __file__, "--child", f"{method}:{ipc}",
                                  "--iters", str(args.iters), "--batch-per-class",
                                  str(args.batch_per_class), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {method} | {ipc} | {r['outer']} x {r['inner_loop']} | {r['update']:.2f} | "
                  f"{r['inner']:.2f} | {r['iteration']:.1f} | {r['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
