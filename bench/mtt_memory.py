"""Peak memory and seconds per MTT iteration vs ``syn_steps``, for both gradient modes.

IPC 10 on Fashion-MNIST shapes (100 synthetic images, all of them in every student step), DSA
on, the student a ConvNet-3 (width 128) by default. The buffer is a stand-in (random-walk
trajectories from seeded initialisations): the cost of an iteration does not depend on the
trajectory values. Each (mode, syn_steps) runs in its own process; its peak RSS is read from
``ru_maxrss`` (the process baseline, the model and data included, is in every figure). An
``unroll`` configuration whose estimated graph exceeds ``--max-gb`` is not run (its estimate
is printed instead), which is what ``gradient="auto"`` decides too.

    python bench/mtt_memory.py                        # syn_steps 10 20 40 80, both modes
    python bench/mtt_memory.py --steps 10 20 --iters 1 --network ConvNetW32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(mode: str, steps: int, iters: int, network: str, threads: int, warmup: int) -> dict:
    import torch
    from ld3m.modules import MTT

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from test_mtt import write_buffer

    if threads:
        torch.set_num_threads(threads)
    folder = write_buffer(Path(tempfile.mkdtemp()), experts=2, epochs=4, network=network,
                          shape=(1, 28, 28), classes=10, dataset="FashionMNIST")
    model = MTT(str(folder), ipc=10, syn_steps=steps, max_start_epoch=2, gradient=mode,
                num_classes=10, image_shape=(1, 28, 28), init="noise")
    estimate = model.estimate_unroll_bytes()
    times = []
    for i in range(iters + warmup):
        generator = torch.Generator().manual_seed(i)
        start = time.perf_counter()
        begin, target = model.draw_expert(generator)
        model.images.grad = None
        model.syn_lr.grad = None
        model.matching_loss(begin, target, generator).backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"mode": mode, "steps": steps, "seconds": statistics.median(times),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "estimate_gb": estimate / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--modes", nargs="+", default=["unroll", "recompute"])
    parser.add_argument("--iters", type=int, default=1, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured iterations first")
    parser.add_argument("--network", default="ConvNet")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-gb", type=float, default=12.0,
                        help="skip unroll runs whose estimated graph is larger")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, steps = args.child.split(":")
        print(json.dumps(measure(mode, int(steps), args.iters, args.network, args.threads,
                                 args.warmup)))
        return
    print(f"MTT, IPC 10, Fashion-MNIST shapes, {args.network}, batch_syn = 100 (all), DSA on")
    print("| gradient | syn_steps | s / iteration | peak RSS (GB) | unroll estimate (GB) |\n"
          "|---|---|---|---|---|", flush=True)
    for mode in args.modes:
        for steps in args.steps:
            if mode == "unroll":
                estimate = _estimate(steps, args.network)
                if estimate > args.max_gb:
                    print(f"| unroll | {steps} | not run | - | {estimate:.1f} |", flush=True)
                    continue
            out = subprocess.run([sys.executable, __file__, "--child", f"{mode}:{steps}",
                                  "--iters", str(args.iters), "--warmup", str(args.warmup),
                                  "--network", args.network,
                                  "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {mode} | {steps} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | "
                  f"{r['estimate_gb']:.1f} |", flush=True)


def _estimate(steps: int, network: str) -> float:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from ld3m.modules import MTT
    from test_mtt import write_buffer

    folder = write_buffer(Path(tempfile.mkdtemp()), experts=1, epochs=4, network=network,
                          shape=(1, 28, 28), classes=10, dataset="FashionMNIST")
    model = MTT(str(folder), ipc=10, syn_steps=steps, max_start_epoch=2, num_classes=10,
                image_shape=(1, 28, 28), init="noise")
    return model.estimate_unroll_bytes() / 1e9


if __name__ == "__main__":
    main()
