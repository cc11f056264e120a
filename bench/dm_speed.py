"""Seconds per DM iteration and peak memory on Fashion-MNIST (ConvNet-3, 256 real images/class).

One iteration = what ``DM.training_step`` does plus the backward pass and the image update
(a fresh random network, Siamese DSA per class, real embeddings, synthetic embeddings).
Each configuration runs in its own process so that its peak RSS is its own.

    python bench/dm_speed.py                      # IPC 1/10/50, fp32 and bf16, batched and looped
    python bench/dm_speed.py --ipc 10 --precision fp32 --iters 5

``batched`` embeds all classes in one forward (what ``ld3m.modules.DM`` does); ``loop`` embeds
class by class; ``reference`` mimics the authors' loop on the same machine (class by class, the
real forward recorded by autograd and then detached, the default oneDNN convolutions), which
gives a same-hardware comparison with their published structure.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one(ipc: int, precision: str, mode: str, iters: int, batch_per_class: int) -> dict:
    import torch
    from ld3m.datamodules import FashionMNIST
    from ld3m.modules import DM

    from ld3m.networks import conv_backend

    torch.manual_seed(0)
    dm = FashionMNIST(batch_per_class=batch_per_class)
    dm.setup("fit")
    model = DM(ipc=ipc, num_classes=dm.num_classes, image_shape=dm.image_shape)
    model.mean, model.std = dm.mean, dm.std
    model.initialise(dm)
    optimizer = model.configure_optimizers()
    stream = iter(dm.train_dataloader())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def loop_loss(real: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        net = model.embedding_network(generator)
        k = real.shape[0]
        syn = model.images.view(k, ipc, *model.images.shape[1:])
        loss = 0.0
        with conv_backend("cpu"):
            for c in range(k):
                r, s = model.dsa.siamese(real[c], syn[c], generator=generator)
                with torch.no_grad():
                    r_mean = net.embed(r).float().mean(0)
                loss = loss + ((r_mean - net.embed(s).float().mean(0)) ** 2).sum()
        return loss

    def reference_loss(real: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # the authors' loop structure: per class, real forward recorded by autograd then
        # detached, default convolution backend
        net = model.embedding_network(generator)
        k = real.shape[0]
        syn = model.images.view(k, ipc, *model.images.shape[1:])
        loss = 0.0
        for c in range(k):
            r, s = model.dsa.siamese(real[c], syn[c], generator=generator)
            r_mean = net.embed(r).detach().float().mean(0)
            loss = loss + ((r_mean - net.embed(s).float().mean(0)) ** 2).sum()
        return loss

    losses = {"batched": model.matching_loss, "loop": loop_loss, "reference": reference_loss}
    times = []
    for step in range(iters + 1):
        real, _ = next(stream)
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(step)
        with autocast:
            loss = losses[mode](real, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step > 0:  # the first iteration warms up allocators and kernels
            times.append(time.perf_counter() - start)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"ipc": ipc, "precision": precision, "mode": mode, "sec_per_iter": statistics.median(times),
            "peak_gb": peak_gb, "iters": iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--mode", nargs="+", default=["batched", "loop", "reference"], choices=["batched", "loop", "reference"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch-per-class", type=int, default=256)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.ipc[0], args.precision[0], args.mode[0], args.iters, args.batch_per_class)))
        return
    rows = []
    print("| IPC | precision | mode | s / iteration | peak RSS (GB) |\n|---|---|---|---|---|", flush=True)
    for ipc in args.ipc:
        for precision in args.precision:
            for mode in args.mode:
                cmd = [sys.executable, __file__, "--one", "--ipc", str(ipc), "--precision", precision,
                       "--mode", mode, "--iters", str(args.iters), "--batch-per-class", str(args.batch_per_class)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                print(f"| {ipc} | {precision} | {mode} | {row['sec_per_iter']:.2f} | {row['peak_gb']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
