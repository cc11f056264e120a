"""Seconds to train K evaluation networks one by one (one Trainer each) or stacked (one Trainer).

ConvNet-3 on a 10-class x IPC-10 set of 28 px grey images (random, Fashion-MNIST-shaped: the
training cost does not depend on the pixels), the standard protocol with DSA, ``E`` epochs
(``E + 1`` trained), one intra-op thread. Training only (the test pass is the same work both
ways). Also the Lightning overhead of an epoch of one batch: seconds per epoch of a 10-image set
with the sequential ``Classifier`` (one Lightning epoch per protocol epoch), the bare step (the
same forward, backward and SGD step in a plain loop) and the stack of one network (the whole
protocol in one Lightning epoch, 10 protocol epochs per step).

    python bench/stacked_eval.py                   # K = 5 and 10, E = 4
    python bench/stacked_eval.py --k 5 --epochs 9 --arch ConvNetD1 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import time


def _trainer(epochs: int, device: str):
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator=device, devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def sequential(synthetic, arch: str, seeds: list[int], epochs: int, dsa: str, device: str) -> float:
    """Seconds to train one ``Classifier`` per seed, as ``train_and_test`` does."""
    from ld3m.datamodules.distilled import DistilledDataModule

    from ld3m.evaluation import Classifier

    c, h, _ = synthetic.image_shape
    start = time.perf_counter()
    for seed in seeds:
        model = Classifier(arch, c, synthetic.num_classes, h, lr=0.01, epochs=epochs, dsa=dsa,
                           seed=seed)
        _trainer(model.training_epochs, device).fit(
            model, datamodule=DistilledDataModule(synthetic, seed=seed + 2))
    _sync(device)
    return time.perf_counter() - start


def stacked(synthetic, arch: str, seeds: list[int], epochs: int, dsa: str, device: str,
            epochs_per_step: int = 10) -> float:
    """Seconds to train the seeds' networks as one ``StackedClassifier``."""
    from ld3m.stacked import StackedClassifier

    c, h, _ = synthetic.image_shape
    start = time.perf_counter()
    model = StackedClassifier(arch, c, synthetic.num_classes, h, seeds, synthetic.images,
                              synthetic.labels, lr=0.01, epochs=epochs, dsa=dsa,
                              epochs_per_step=epochs_per_step)
    _trainer(1, device).fit(model)
    _sync(device)
    return time.perf_counter() - start


def bare(synthetic, arch: str, epochs: int, device: str) -> float:
    """Seconds of ``epochs + 1`` plain SGD steps of one network on the whole set (no DSA)."""
    import torch
    import torch.nn.functional as F

    from ld3m.networks import get_network

    c, h, _ = synthetic.image_shape
    net = get_network(arch, c, synthetic.num_classes, h).to(device)
    x, y = synthetic.images.to(device), synthetic.labels.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    start = time.perf_counter()
    for _ in range(epochs + 1):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def random_set(classes: int, ipc: int, size: int = 28):
    import torch

    from ld3m.synthetic import SyntheticSet

    images = torch.randn(classes * ipc, 1, size, size, generator=torch.Generator().manual_seed(0))
    return SyntheticSet(images, torch.arange(classes).repeat_interleave(ipc), (0.0,), (1.0,),
                        classes, method="random", ipc=ipc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10], help="networks per stack")
    parser.add_argument("--epochs", type=int, default=4, help="the protocol's E (E + 1 trained)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--arch", default="ConvNet")
    parser.add_argument("--dsa", default="color_crop_cutout_flip_scale_rotate")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overhead-epochs", type=int, default=49,
                        help="E of the per-epoch overhead measurement (0 to skip it)")
    parser.add_argument("--overhead-arch", default="MLP",
                        help="a network whose step is cheap, so that the overhead shows")
    args = parser.parse_args()

    import lightning  # noqa: F401  (its import sets its loggers' levels: quiet them after it)
    import torch

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    synthetic = random_set(10, args.ipc)
    print(f"{args.arch}, 10 classes x IPC {args.ipc} (28 px), E = {args.epochs} "
          f"({args.epochs + 1} epochs), dsa {args.dsa}, {args.device}, {args.threads} thread(s)")
    print("| K | sequential (s) | stacked (s) | speed-up |")
    print("|---|---|---|---|")
    stacked(synthetic, args.arch, [0], 1, args.dsa, args.device)  # warm-up
    for k in args.k:
        seeds = list(range(k))
        a = sequential(synthetic, args.arch, seeds, args.epochs, args.dsa, args.device)
        b = stacked(synthetic, args.arch, seeds, args.epochs, args.dsa, args.device)
        print(f"| {k} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    if args.overhead_epochs > 0:
        e = args.overhead_epochs
        tiny = random_set(10, 1)
        arch = args.overhead_arch
        a = sequential(tiny, arch, [0], e, "none", args.device) / (e + 1)
        b = bare(tiny, arch, e, args.device) / (e + 1)
        c = stacked(tiny, arch, [0], e, "none", args.device) / (e + 1)
        print(f"\n{arch}, 10 images (one batch per epoch), no DSA, E = {e}: milliseconds per epoch")
        print("| sequential Classifier | bare step | stacked, K = 1 |")
        print("|---|---|---|")
        print(f"| {1e3 * a:.2f} | {1e3 * b:.2f} | {1e3 * c:.2f} |")


if __name__ == "__main__":
    main()
