"""Seconds per DC image update: per-class gradients looped vs vectorised (``torch.func.vmap``).

One measured update = the real per-class gradients, the synthetic per-class gradients (with a
graph), the gradient distance, its backward into the images and the SGD step: what
``ld3m.modules.DC.training_step`` does before the inner training of the network (which is the
same in both modes). ConvNet-3 (width 128) on Fashion-MNIST, a fresh network per update.
Modes: ``loop`` (a loop over classes with ``torch.autograd.grad``, what DC does) and ``vmap``
(all classes in one ``vmap(grad(...))``). The modes run in the same process, alternating, so
background load hits them alike; the reported figure is the median over the measured updates
(the first of each mode is a warm-up). The peak RSS is read after each mode's first update.
On a shared machine pass ``--threads 1``: two OpenMP threads competing with other processes
for two cores slow some kernels down by 10x or more.

    python bench/dc_speed.py --iters 2 --threads 1   # IPC 1 and 10, 256 real images per class
    python bench/dc_speed.py --ipc 10 --iters 3 --batch-per-class 64 --threads 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--batch-per-class", type=int, default=256)
    parser.add_argument("--network", default="ConvNet")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()

    import torch
    from ld3m.datamodules import FashionMNIST
    from ld3m.modules.dc import DC, gradient_distance, per_class_gradients

    if args.threads:
        torch.set_num_threads(args.threads)
    dm = FashionMNIST(batch_per_class=args.batch_per_class)
    dm.setup("fit")
    stream = iter(dm.train_dataloader())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.batch_per_class} real images per class, {args.network}")
    print("| IPC | mode | s / update (median) | all | peak RSS so far (GB) |\n"
          "|---|---|---|---|---|", flush=True)
    for ipc in args.ipc:
        model = DC(ipc=ipc, network=args.network, num_classes=dm.num_classes,
                   image_shape=dm.image_shape)
        model.initialise(dm)
        optimizer = torch.optim.SGD([model.images], lr=0.1, momentum=0.5)
        # loop first: the process's peak RSS, read after each mode's first update, then shows
        # what vmap adds
        modes = {"loop": False, "vmap": True}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        losses: dict[str, list[float]] = {mode: [] for mode in modes}
        peaks: dict[str, float] = {}
        for step in range(args.iters + 1):
            real, _ = next(stream)
            for mode, vec in modes.items():
                start = time.perf_counter()
                net = model.new_network(step)
                k, n = real.shape[:2]
                syn = model.images.view(k, ipc, *model.images.shape[1:])
                classes = torch.arange(k).unsqueeze(1)
                real_g = per_class_gradients(net, real, classes.expand(k, n), create_graph=False,
                                             vectorised=vec)
                syn_g = per_class_gradients(net, syn, classes.expand(k, ipc), create_graph=True,
                                            vectorised=vec)
                loss = gradient_distance(real_g, syn_g, batch_dims=1)
                optimizer.zero_grad()
                loss.backward()
                if step > 0:
                    times[mode].append(time.perf_counter() - start)
                losses[mode].append(loss.item())
                peaks.setdefault(mode, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
            # step once per update (after both modes saw the same images)
            optimizer.step()
        for mode in modes:
            all_times = ", ".join(f"{t:.2f}" for t in times[mode])
            print(f"| {ipc} | {mode} | {statistics.median(times[mode]):.2f} | {all_times} | "
                  f"{peaks[mode]:.2f} |", flush=True)
        gap = max(abs(a - b) / max(abs(a), 1e-12)
                  for row in zip(*losses.values(), strict=True) for a in row for b in row)
        print(f"  (largest relative loss difference between the modes: {gap:.1e})")


if __name__ == "__main__":
    main()
