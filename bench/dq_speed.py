"""Time and peak memory of DQ's selection on Fashion-MNIST.

    python bench/dq_speed.py --threads 1                      # ConvNet, 300 embedding steps
    python bench/dq_speed.py --network ConvNetW32 --embed-steps 100 --threads 1
    python bench/dq_speed.py --embed-checkpoint runs/dq/ipc10/dq_embedding.pt --threads 1

Rows (each in its own process, so that its peak RSS is its own), in this order:

- ``whole set``: what ``DQ`` does on the 60,000 training images, phase by phase: training the
  embedding network (or reading ``--embed-checkpoint``), embedding every image, binning and
  sampling all ten classes (IPC 10);
- ``one class, matrix``: GraphCut binning (``--bins`` bins) of the 6,000 images of class 0 from
  the features the ``whole set`` row computed, holding the 6,000 x 6,000 similarity matrix;
- ``one class, rows on the fly``: the same with similarity rows computed on demand
  (``max_matrix_bytes=0``, the bounded-memory path; it gives the same bins).

Seconds are wall time of the phase; ``RSS before`` is the resident memory when the phase starts
and ``peak RSS`` the process's high-water mark (both include the ~0.5-1 GB of the Python,
torch and dataset baseline), so the phase's own memory is at most their difference when the
peak is reached inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def one(row: str, network: str, embed_steps: int, bins: int, threads: int, features: str,
        workdir: str, embed_checkpoint: str | None) -> list[dict]:
    import torch
    from ld3m.datamodules import FashionMNIST
    from ld3m.modules import DQ

    from ld3m.coreset import graphcut_bins, quantize, take_rows

    torch.set_num_threads(threads)
    dm = FashionMNIST()
    dm.setup("fit")
    model = DQ(ipc=10, bins=bins, network=network, embed_steps=embed_steps, features=features,
               embed_checkpoint=embed_checkpoint, num_classes=dm.num_classes,
               image_shape=dm.image_shape)
    model.dataset_name, model.mean, model.std = dm.dataset_name, dm.mean, dm.std
    out = []
    cache = os.path.join(workdir, f"class0_{network}_{embed_steps}_{features}.pt")

    def phase(name: str, fn):
        before, start = _rss_gb(), time.perf_counter()
        result = fn()
        out.append({"row": name, "seconds": time.perf_counter() - start, "rss_before_gb": before,
                    "peak_gb": _peak_gb()})
        return result

    if row == "whole":
        what = "read" if embed_checkpoint else "train"
        net = phase(f"whole set: {what} the embedding network", lambda: model.embedding_network(dm))
        features = phase("whole set: embed 60,000 images", lambda: model.embed_training_set(dm, net))
        phase("whole set: bins + sampling, 10 classes", lambda: quantize(
            features, dm.train_split.labels, 10, bins, generator=torch.Generator().manual_seed(0)))
        total = sum(r["seconds"] for r in out)
        out.append({"row": "whole set: total", "seconds": total, "rss_before_gb": out[0]["rss_before_gb"],
                    "peak_gb": _peak_gb()})
        # the class rows bin class 0 from these features
        torch.save(take_rows(features, dm.train_split.class_index[0]), cache)
        return out
    members = dm.train_split.class_index[0]
    if os.path.exists(cache):
        class_features = torch.load(cache)
    else:
        class_features = take_rows(model.embed_training_set(dm, model.embedding_network(dm)), members)
    limit = 0 if row == "rows" else 512 * 2**20
    phase(f"one class ({len(members)} images), {'rows on the fly' if limit == 0 else 'matrix'}",
          lambda: graphcut_bins(class_features, bins, 1.0, max_matrix_bytes=limit))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="ConvNet")
    parser.add_argument("--embed-steps", type=int, default=300)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch_threads_default())
    parser.add_argument("--features", default="embedding", choices=["embedding", "gradient"])
    parser.add_argument("--embed-checkpoint", default=None,
                        help="a trained embedding network (skips its training)")
    parser.add_argument("--rows", nargs="+", default=["whole", "matrix", "rows"],
                        choices=["matrix", "rows", "whole"])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.network, args.embed_steps, args.bins, args.threads,
                             args.features, args.workdir, args.embed_checkpoint)))
        return
    source = args.embed_checkpoint or f"{args.embed_steps} embedding steps"
    print(f"{args.network} ({args.features}), {source}, {args.bins} bins, {args.threads} thread(s)\n")
    print("| phase | seconds | RSS before (GB) | peak RSS (GB) |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for row in args.rows:
            cmd = [sys.executable, __file__, "--one", row, "--network", args.network,
                   "--embed-steps", str(args.embed_steps), "--bins", str(args.bins),
                   "--threads", str(args.threads), "--features", args.features,
                   "--workdir", workdir]
            if args.embed_checkpoint:
                cmd += ["--embed-checkpoint", args.embed_checkpoint]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{row} failed:\n{result.stderr[-3000:]}")
            for r in json.loads(result.stdout.strip().splitlines()[-1]):
                print(f"| {r['row']} | {r['seconds']:.1f} | {r['rss_before_gb']:.2f} | "
                      f"{r['peak_gb']:.2f} |", flush=True)


def torch_threads_default() -> int:
    """The intra-op threads torch would use (without importing it in the parent)."""
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))


if __name__ == "__main__":
    main()
