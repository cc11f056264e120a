"""DQ at its own setting, a fraction of the data, against random selection on Fashion-MNIST.

    python bench/dq_fraction.py --fractions 0.1 0.3 --draws 5
    python bench/dq_fraction.py --draws 3 --epochs 20 --dsa none --embed-steps 300

The paper's setting (Zhou et al., ICCV 2023; ``magic-research/Dataset_Quantization``) keeps a
*fraction* of the data: from every GraphCut bin of every class ``round(fraction * len(bin))``
images (``quantize_bin.py``), as ``ld3m fit --model DQ --model.fraction F`` does. Every class
of Fashion-MNIST's training set (6,000 images, 10 bins of 600) is binned once, by GraphCut on
the features of one embedding network (``--embed-checkpoint``, or trained here for
``--embed-steps`` SGD steps of 256 images, as ``DQ`` does). Then for every draw
``s = first-draw .. first-draw + draws - 1`` and every fraction:

- DQ: the images ``DQ(fraction=F, seed=s)`` selects with that embedding network (the module's
  own sampling generator, so the same set as ``ld3m fit --model DQ --model.fraction F
  --model.seed s --model.embed_checkpoint <it>``);
- random: as many random training images of every class as DQ kept of it (a generator seeded
  ``s``), i.e. the authors' balanced ``Uniform`` selection;

and the two sets of a draw are each trained once with the evaluation protocol
(``train_and_test``, seed ``s`` for both: the same network initialisation, batch order and
augmentation draws) and tested on the full test set. The draws vary the sampling, not the
embedding network or the bins. The table gives, per fraction, the mean accuracy of each
selection with its standard error over the draws, and the mean paired difference DQ minus
random with its standard error and how many draws DQ won.

Features, bins and every measured accuracy are cached in ``--cache`` (default
``runs/dq_fraction``): a call with more ``--draws`` trains only the new draws.
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
from ld3m.modules.dq import sample_fraction

from ld3m.coreset import quantize
from ld3m.evaluation import DEFAULT_DSA, train_and_test
from ld3m.files import atomic_write
from ld3m.synthetic import SyntheticSet


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction is in (0, 1], got {text!r}")
    return value


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, sd / math.sqrt(len(xs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=fraction, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first-draw", type=int, default=0,
                        help="draws run from this seed on (fresh draws to confirm an earlier table)")
    parser.add_argument("--epochs", type=int, default=300, help="the evaluation protocol's E")
    parser.add_argument("--dsa", default=DEFAULT_DSA, help="DSA strategy of the evaluation, or none")
    parser.add_argument("--arch", default="ConvNet", help="evaluation network")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--features", default="embedding", choices=("embedding", "gradient"))
    parser.add_argument("--network", default="ConvNet", help="embedding network")
    parser.add_argument("--embed-checkpoint", default=None)
    parser.add_argument("--embed-steps", type=int, default=2350,
                        help="SGD steps of the embedding network (the recipes': 2350, 10 epochs)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: ld3m's)")
    parser.add_argument("--cache", default="runs/dq_fraction")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.draws < 1 or args.epochs < 1:
        parser.error("--draws and --epochs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    dm = FashionMNIST(data_dir=args.data_dir)
    dm.setup("fit")
    split = dm.train_split
    embedding = Path(args.embed_checkpoint or cache / f"dq_embedding_{args.network}_{args.embed_steps}.pt")

    def save(obj, path: Path) -> None:
        with atomic_write(path) as tmp:
            torch.save(obj, tmp)

    def dq(seed: int = 0, fraction: float | None = None) -> DQ:
        model = DQ(fraction=fraction, network=args.network, features=args.features,
                   bins=args.bins, lam=args.lam, embed_steps=args.embed_steps, seed=seed,
                   embed_checkpoint=str(embedding) if embedding.exists() else None,
                   num_classes=dm.num_classes, image_shape=dm.image_shape)
        model.dataset_name, model.mean, model.std = dm.dataset_name, dm.mean, dm.std
        return model

    @functools.cache
    def class_bins() -> list[list[torch.Tensor]]:
        path = cache / f"bins_{embedding.stem}_{args.features}_{args.bins}_{args.lam:g}.pt"
        if path.exists():
            return torch.load(path)
        start = time.perf_counter()
        net = dq().embedding_network(dm)
        if not embedding.exists():
            save({"state_dict": net.state_dict()}, embedding)
        print(f"embedding network ready in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        features = dq().embed_training_set(dm, net)
        print(f"embedded {len(split)} images in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        # the bins depend on neither the fraction nor the seed
        out = quantize(features, split.labels, ipc=1, bins=args.bins, lam=args.lam,
                       num_classes=dm.num_classes).class_bins
        save(out, path)
        print(f"binned ({args.bins} bins per class) in {time.perf_counter() - start:.0f} s", flush=True)
        return out

    def dq_index(fraction: float, seed: int) -> torch.Tensor:
        """What ``DQ(fraction=fraction, seed=seed).quantize_dataset`` selects from these bins:
        its sampling generator, class by class (the bins do not draw from it)."""
        generator = dq(seed, fraction).sampling_generator()
        return torch.cat([sample_fraction(b, fraction, generator)[0] for b in class_bins()])

    def random_index(counts: list[int], seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([members[torch.randperm(len(members), generator=generator)[:n]]
                          for members, n in zip(split.class_index, counts, strict=True)])

    def as_set(index: torch.Tensor, name: str) -> SyntheticSet:
        labels = split.labels[index]
        ipc = int(torch.bincount(labels, minlength=dm.num_classes).max())
        return SyntheticSet(split.images(index, dm), labels, dm.mean, dm.std, dm.num_classes,
                            method=name, dataset=dm.dataset_name, ipc=ipc)

    done_path = cache / "accuracies.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    setting = (f"{embedding.stem} {args.features} {args.bins} bins lam {args.lam:g} | "
               f"{args.arch} {args.epochs} ep {args.dsa}")
    draws = range(args.first_draw, args.first_draw + args.draws)
    results = {f: {"DQ": [], "random": []} for f in args.fractions}
    kept: dict[float, int] = {}
    for s in draws:
        for f in args.fractions:
            index = dq_index(f, s)
            counts = torch.bincount(split.labels[index], minlength=dm.num_classes).tolist()
            kept[f] = len(index)
            for name in ("DQ", "random"):
                key = f"{setting} | fraction {f:g} | {name} | draw {s}"
                if key not in done:
                    start = time.perf_counter()
                    chosen = index if name == "DQ" else random_index(counts, s)
                    done[key] = 100 * train_and_test(as_set(chosen, name), dm, arch=args.arch,
                                                     epochs=args.epochs, dsa=args.dsa, seed=s,
                                                     accelerator="cpu")
                    with atomic_write(done_path) as tmp:
                        tmp.write_text(json.dumps(done, indent=1))
                    print(f"draw {s}, fraction {f:g}: {name} {done[key]:.2f} "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
                results[f][name].append(done[key])

    print(f"\nFashion-MNIST, {args.arch} trained {args.epochs + 1} epochs (E = {args.epochs}), "
          f"DSA {args.dsa}; draws {draws.start} to {draws.stop - 1}; DQ: {args.bins} bins, "
          f"lam {args.lam:g}, {args.features} of {embedding.name}\n")
    print("| fraction | images | DQ (mean +- s.e.) | random (mean +- s.e.) | "
          "DQ minus random (mean +- s.e.) | draws DQ won |")
    print("|---|---|---|---|---|---|")
    for f in args.fractions:
        dq_accs, rand_accs = results[f]["DQ"], results[f]["random"]
        diff = [a - b for a, b in zip(dq_accs, rand_accs, strict=True)]
        (m1, e1), (m2, e2), (m3, e3) = mean_se(dq_accs), mean_se(rand_accs), mean_se(diff)
        won = sum(d > 0 for d in diff)
        print(f"| {100 * f:g} % | {kept[f]:,} | {m1:.2f} +- {e1:.2f} | {m2:.2f} +- {e2:.2f} | "
              f"{m3:+.2f} +- {e3:.2f} | {won}/{len(diff)} |")


if __name__ == "__main__":
    main()
