"""Host work and bytes copied per step of the class-balanced real stream, before and after the
batches are built on the training device.

*Before* (the host stream, ``ClassBalancedStream.batch``, which a streamed dataset still uses):
every step gathers ``K x n`` images from the uint8 cache, converts and normalises them (and
ZCA-whitens them) on the host and copies the float batch to the device. *After* (a cached
dataset in a Trainer): the host draws the indices (one permutation per class) and copies them;
the gather, conversion, normalisation and whitening run on the device, from a copy of the cache
made there once (timed here on the CPU, the only device this machine has; on a GPU it is
a few kernels).

The data are random uint8 images in CIFAR's shapes (50,000 x 3 x 32 x 32, 10 or 100 classes),
so no download is needed.

    python bench/data_stream.py             # | data | batch | ZCA | host s/step before | after | ...
    python bench/data_stream.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from ld3m.datamodules.real import ClassBalancedPicks, ClassBalancedStream

from ld3m.testing import RandomImageData


def _seconds(fn, steps: int) -> float:
    fn(0)  # warm-up
    start = time.perf_counter()
    for step in range(1, steps + 1):
        fn(step)
    return (time.perf_counter() - start) / steps


def measure(classes: int, n: int, zca: bool, steps: int) -> dict:
    dm = RandomImageData(num_classes=classes, zca=zca)
    dm.setup("fit")
    if zca:
        dm.whiten(dm.normalize(dm.train_split.cached[:1]))  # fit the ZCA once, outside the timing
    stream = ClassBalancedStream(dm, n)

    def device_part(step):
        return dm.device_batch(ClassBalancedPicks(stream.picks(step), classes, n))

    images = classes * n
    return {
        "before": _seconds(stream.batch, steps),
        "after": _seconds(stream.picks, steps),
        "device": _seconds(device_part, steps) - _seconds(stream.picks, steps),
        "copied_before": images * 3 * 32 * 32 * 4,  # the float batch (whitened on the host)
        "copied_after": images * 8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| data | batch (classes x images) | ZCA | host s / step, before | host s / step, after "
          "| device work s / step (here on the CPU) | copied per step, before | after |")
    print("|---|---|---|---|---|---|---|---|")
    for classes, zca in ((10, False), (10, True), (100, False), (100, True)):
        r = measure(classes, 256, zca, args.steps)
        print(f"| CIFAR-{classes} shapes | {classes} x 256 | {'yes' if zca else 'no'} | "
              f"{r['before']:.3f} | {r['after']:.4f} | {r['device']:.3f} | "
              f"{r['copied_before'] / 1e6:.1f} MB | {r['copied_after'] / 1e3:.0f} kB |")


if __name__ == "__main__":
    main()
