"""DQ against random real images, paired draw by draw, on Fashion-MNIST; prints a table.

    python bench/dq_variants.py --ipc 10 --draws 4 --variants 10:1 ipc:1 10:10
    python bench/dq_variants.py --ipc 50 --draws 3 --epochs 100 --variants 10:1

Every variant ``BINS:LAM[:FEATURES]`` (``BINS`` a number, or ``ipc`` for one bin per selected
image; ``FEATURES`` ``embedding`` (default) or ``gradient``) bins every class of the training set
once, by GraphCut on the features of one embedding network (``--embed-checkpoint``, or trained
here for ``--embed-steps`` SGD steps of 256 images, as ``DQ`` does). Then for every draw
``s = 0 .. draws-1``: ``ipc`` random real images per class (``random_real_set(seed=s)``) and every
variant's DQ set (uniform sampling from its bins with a generator seeded ``s``) are each
trained once (``train_and_test``, seed ``s``: the same network initialisation and batch order
for all sets of a draw) and tested on the full test set. The table gives each set's mean and
standard deviation over the draws (each draw a new selection) and, for DQ, the mean paired
difference to random selection with its standard error and how many draws DQ won.

Features, bins and every measured accuracy are cached in ``--cache`` (default
``runs/dq_variants``): a second call at another IPC does not embed or bin again, and a call with
more ``--draws`` trains only the new draws. ``--first-draw N`` starts the draws at seed ``N``: fresh
draws that confirm (or not) what an earlier table found on draws ``0 .. N-1``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch
from ld3m.datamodules import FashionMNIST
from ld3m.modules import DQ

from ld3m.coreset import quantize, sample_bins
from ld3m.evaluation import DEFAULT_DSA, random_real_set, train_and_test
from ld3m.files import atomic_write
from ld3m.synthetic import SyntheticSet


def parse_variant(text: str) -> tuple[str, float, str]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"a variant is BINS:LAM[:FEATURES], got {text!r}")
    bins, lam = parts[0], float(parts[1])
    if bins != "ipc" and not bins.isdigit():
        raise argparse.ArgumentTypeError(f"BINS must be a number or 'ipc', got {bins!r}")
    features = parts[2] if len(parts) == 3 else "embedding"
    if features not in ("embedding", "gradient"):
        raise argparse.ArgumentTypeError(f"FEATURES must be embedding or gradient, got {features!r}")
    return bins, lam, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first-draw", type=int, default=0,
                        help="draws run from this seed on (fresh draws to confirm an earlier table)")
    parser.add_argument("--variants", type=parse_variant, nargs="+", default=[("10", 1.0, "embedding")])
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs")
    parser.add_argument("--dsa", default=DEFAULT_DSA)
    parser.add_argument("--arch", default="ConvNet")
    parser.add_argument("--network", default="ConvNet", help="embedding network")
    parser.add_argument("--embed-checkpoint", default=None)
    parser.add_argument("--embed-steps", type=int, default=500)
    parser.add_argument("--cache", default="runs/dq_variants")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    dm = FashionMNIST()
    dm.setup("fit")
    split = dm.train_split

    embedding = Path(args.embed_checkpoint or cache / f"dq_embedding_{args.network}_{args.embed_steps}.pt")

    def save(obj, path: Path) -> None:
        with atomic_write(path) as tmp:
            torch.save(obj, tmp)

    def dq(kind: str) -> DQ:
        model = DQ(ipc=args.ipc, network=args.network, features=kind, embed_steps=args.embed_steps,
                   embed_checkpoint=str(embedding) if embedding.exists() else None,
                   num_classes=dm.num_classes, image_shape=dm.image_shape)
        model.dataset_name, model.mean, model.std = dm.dataset_name, dm.mean, dm.std
        return model

    @functools.cache
    def embedding_net() -> torch.nn.Module:
        start = time.perf_counter()
        net = dq("embedding").embedding_network(dm)
        if not embedding.exists():
            save({"state_dict": net.state_dict()}, embedding)
        print(f"embedding network ready in {time.perf_counter() - start:.0f} s", flush=True)
        return net

    def features_of(kind: str):
        path = cache / f"features_{embedding.stem}_{kind}.pt"
        if path.exists():
            return torch.load(path)
        net = embedding_net()
        start = time.perf_counter()
        out = dq(kind).embed_training_set(dm, net)
        save(out, path)
        print(f"embedded {len(split)} images ({kind}) in {time.perf_counter() - start:.0f} s", flush=True)
        return out

    def bins_of(bins: int, lam: float, kind: str) -> list[list[torch.Tensor]]:
        path = cache / f"bins_{embedding.stem}_{kind}_{bins}_{lam:g}.pt"
        if path.exists():
            return torch.load(path)
        features = features_of(kind)
        start = time.perf_counter()
        # the bins do not depend on the IPC
        out = quantize(features, split.labels, ipc=1, bins=bins, lam=lam,
                       num_classes=dm.num_classes).class_bins
        save(out, path)
        print(f"binned ({bins} bins, lam {lam:g}, {kind}) in {time.perf_counter() - start:.0f} s",
              flush=True)
        return out

    def as_set(index: torch.Tensor, name: str) -> SyntheticSet:
        labels = torch.arange(dm.num_classes).repeat_interleave(args.ipc)
        return SyntheticSet(split.images(index, dm), labels, dm.mean, dm.std, dm.num_classes,
                            method=name, dataset=dm.dataset_name, ipc=args.ipc)

    names = [f"DQ {b} bins, lam {lam:g}, {kind}" for b, lam, kind in args.variants]
    variants = [bins_of(args.ipc if b == "ipc" else int(b), lam, kind) for b, lam, kind in args.variants]
    results: dict[str, list[float]] = {"random real": [], **{n: [] for n in names}}
    # accuracies already measured (same IPC and evaluation), so --draws 8 after --draws 4 runs
    # only the new draws
    done_path = cache / "accuracies.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    setting = f"{embedding.stem} ipc {args.ipc} {args.arch} {args.epochs} ep {args.dsa}"
    draws = range(args.first_draw, args.first_draw + args.draws)
    for s in draws:
        sets = {"random real": random_real_set(dm, args.ipc, seed=s)}
        for name, class_bins in zip(names, variants, strict=True):
            g = torch.Generator().manual_seed(s)
            index = torch.cat([sample_bins(b, args.ipc, g)[0] for b in class_bins])
            sets[name] = as_set(index, name)
        for name, synthetic in sets.items():
            key = f"{setting} | {name} | draw {s}"
            if key in done:
                results[name].append(done[key])
                continue
            start = time.perf_counter()
            acc = 100 * train_and_test(synthetic, dm, arch=args.arch, epochs=args.epochs,
                                       dsa=args.dsa, seed=s, accelerator="cpu")
            results[name].append(acc)
            done[key] = acc
            with atomic_write(done_path) as tmp:
                tmp.write_text(json.dumps(done, indent=1))
            print(f"draw {s}: {name}: {acc:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)

    def mean_std(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))

    print(f"\nIPC {args.ipc}, draws {draws.start} to {draws.stop - 1}, {args.arch} {args.epochs} epochs, DSA {args.dsa}\n")
    print("| set | accuracy (mean +- std over draws) | minus random (mean +- s.e.) | draws won |")
    print("|---|---|---|---|")
    base = results["random real"]
    for name, accs in results.items():
        m, sd = mean_std(accs)
        if name == "random real":
            print(f"| {name} | {m:.2f} +- {sd:.2f} | - | - |")
            continue
        diff = [a - b for a, b in zip(accs, base, strict=True)]
        dm_, dsd = mean_std(diff)
        won = sum(d > 0 for d in diff)
        print(f"| {name} | {m:.2f} +- {sd:.2f} | {dm_:+.2f} +- {dsd / math.sqrt(len(diff)):.2f} | "
              f"{won}/{len(diff)} |")


if __name__ == "__main__":
    main()
