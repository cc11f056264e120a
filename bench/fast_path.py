"""DM seconds per iteration: eager vs ``torch.compile`` vs compiled + channels_last (ld3m.fast).

The iteration is ``bench/dm_speed.py``'s (a fresh random ConvNet-3, Siamese DSA per class, the
real embeddings without autograd, the synthetic ones with it, backward, image update), on
Fashion-MNIST with 256 real images per class when it is installed (random images of its shape
otherwise), at one thread. Each configuration runs in its own process (its own compile cache in
memory; inductor's on-disk cache may be warm from an earlier run). ``first`` is the first
iteration, which compiles; ``s / iteration`` the median of the others.

    python bench/fast_path.py                        # IPC 1 and 10, the three modes, 3 iterations
    python bench/fast_path.py --ipc 10 --iters 5 --mode eager compiled
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODES = {"eager": {}, "channels_last": {"channels_last": True}, "compiled": {"compile": True},
         "compiled+channels_last": {"compile": True, "channels_last": True}}


def _real_batches(batch_per_class: int, seed: int = 0):
    """Class-balanced real batches ``(K, n, 1, 28, 28)`` and their source's name."""
    import torch
    from ld3m.datamodules import FashionMNIST

    data = FashionMNIST(batch_per_class=batch_per_class)
    try:
        data.setup("fit")
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(seed)

        def noise():
            while True:
                yield torch.randn(10, batch_per_class, 1, 28, 28, generator=generator), None

        return data, noise(), "random (Fashion-MNIST not installed)"
    return data, iter(data.train_dataloader()), "Fashion-MNIST"


def one(ipc: int, mode: str, iters: int, batch_per_class: int, threads: int = 1) -> dict:
    """Time ``iters + 1`` DM iterations of one configuration in this process."""
    import torch
    from ld3m.modules import DM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data, stream, source = _real_batches(batch_per_class)
    model = DM(ipc=ipc, num_classes=10, image_shape=(1, 28, 28), **MODES[mode])
    model.mean, model.std = data.mean, data.std
    if source == "Fashion-MNIST":
        model.initialise(data)
    optimizer = model.configure_optimizers()
    times = []
    for step in range(iters + 1):
        real, _ = next(stream)
        start = time.perf_counter()
        loss = model.matching_loss(real, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    fast = model.fast_embed
    return {"ipc": ipc, "mode": mode, "first": times[0], "sec_per_iter": statistics.median(times[1:]),
            "iters": iters, "source": source, "compiles": fast.compiles if fast else 0,
            "fell_back": bool(fast and fast.compile and not fast.active)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--mode", nargs="+", default=["eager", "compiled", "compiled+channels_last"],
                        choices=list(MODES))
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after the first")
    parser.add_argument("--batch-per-class", type=int, default=256)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iters < 1:
        parser.error("--iters must be at least 1")
    if args.one:
        print(json.dumps(one(args.ipc[0], args.mode[0], args.iters, args.batch_per_class)))
        return
    print("| IPC | mode | first (compiles) s | s / iteration | vs eager | graphs |\n"
          "|---|---|---|---|---|---|", flush=True)
    for ipc in args.ipc:
        eager = None
        for mode in args.mode:
            cmd = [sys.executable, __file__, "--one", "--ipc", str(ipc), "--mode", mode,
                   "--iters", str(args.iters), "--batch-per-class", str(args.batch_per_class)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            if mode == "eager":
                eager = row["sec_per_iter"]
            ratio = f"{eager / row['sec_per_iter']:.2f}x" if eager else "-"
            note = " (fell back to eager)" if row["fell_back"] else ""
            print(f"| {ipc} | {mode}{note} | {row['first']:.1f} | {row['sec_per_iter']:.2f} | "
                  f"{ratio} | {row['compiles']} |", flush=True)
    print(f"\ndata: {row['source']}; one thread; median of {args.iters} iterations after the "
          "first. On a shared machine these numbers are noisy.")


if __name__ == "__main__":
    main()
