"""Distil Fashion-MNIST with a small budget, evaluate with ``ld3m evaluate``, print a table.

For each ``method`` and ``ipc`` this runs the method's published recipe
(``ld3m fit --config <method>_fashionmnist_ipc<ipc>``) with a smaller budget, then
``ld3m evaluate`` on the exported set, and prints one Markdown row per set next to the
published figure. Everything lands under ``--root`` (``runs/table`` by default); a set that is
already there is not distilled again, a report that is already there is not recomputed.

MTT and DATM first need an expert buffer: ``--buffer`` (default ``<root>/buffer``) is built
with ``ld3m buffer`` at the budget of ``--experts``/``--expert_epochs``/``--expert_batches``
(batches of 256 per expert epoch) unless it already exists, and their recipes' start epochs are
cut to fit it. LD3M needs a generator folder: ``--generator`` (default
``runs/prior/fashionmnist``) is built with ``ld3m prior`` at the budget of ``--prior_args``
unless it exists. DQ trains its embedding network once (in its first set's folder) and the
other IPCs reuse it (``--model.embed_checkpoint``).

``--archs ConvNet,AlexNet,VGG11,ResNet18`` evaluates every set on each network (a column each,
plus their mean): the cross-architecture table.

Example (the README's table, about 100 minutes on a 2-core CPU for DC/DSA/DD, and about
as much again for the buffer and MTT/DATM)::

    python bench/fmnist_table.py --methods DC DSA DD --ipc 1 10
    python bench/fmnist_table.py --methods MTT DATM --ipc 1
    python bench/fmnist_table.py --root runs/tm10 --methods MTT DATM --ipc 10 --experts 2 \
        --expert_epochs 4 --expert_batches 40 --steps 30 --runs 2
    python bench/fmnist_table.py --methods DQ --ipc 1 10 50
    python bench/fmnist_table.py --root runs/ld3m_table --methods DM LD3M --ipc 1 \
        --archs ConvNet,AlexNet,VGG11,ResNet18
    python bench/fmnist_table.py --root runs/ld3m_table --methods DM LD3M --ipc 10 \
        --archs ConvNet,AlexNet,VGG11,ResNet18
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: Published ConvNet accuracy on Fashion-MNIST (DC and DSA papers' tables; DD as reported by DC).
PUBLISHED = {("DC", 1): 70.5, ("DC", 10): 82.3, ("DSA", 1): 70.6, ("DSA", 10): 84.6,
             ("DD", 1): None, ("DD", 10): None, ("MTT", 1): None, ("MTT", 10): None,
             ("DATM", 1): None, ("DATM", 10): None}


DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"

#: Default budget per (method, ipc): distillation steps and the evaluation's epochs and DSA.
BUDGET = {
    ("DC", 1): {"steps": 100, "epochs": 300, "dsa": "none"},
    # IPC 10: a step is an image update plus 50 inner SGD steps of the network (~25-45 s here)
    ("DC", 10): {"steps": 40, "epochs": 300, "dsa": "none", "runs": 2},
    ("DSA", 1): {"steps": 100, "epochs": 300, "dsa": "color_crop_cutout_flip_scale_rotate"},
    ("DSA", 10): {"steps": 10, "epochs": 300, "dsa": "color_crop_cutout_flip_scale_rotate", "runs": 2},
    # DD's step is an unrolled training plus a real batch through the unrolled graph: fewer
    # real images (the recipe's 102 per class cost ~12 s per step here)
    ("DD", 1): {"steps": 100, "epochs": 0, "dsa": "none", "batch_per_class": 32},
    ("DD", 10): {"steps": 30, "epochs": 0, "dsa": "none", "batch_per_class": 32},
    # trajectory matching against the small buffer: 20 student steps (the recipes: 50-80),
    # start epochs in [0, 3) matching 2 expert epochs (the buffer has 5)
    ("MTT", 1): {"steps": 200, "epochs": 300, "dsa": DSA_STRATEGY, "batch_per_class": 1,
                 "args": ["--model.init_args.syn_steps", "20", "--model.init_args.max_start_epoch", "3"]},
    # IPC 10: an unrolled 10-step iteration over 100 images takes ~15 s here, so 10 student steps
    ("MTT", 10): {"steps": 100, "epochs": 300, "dsa": DSA_STRATEGY, "batch_per_class": 1,
                  "args": ["--model.init_args.syn_steps", "10", "--model.init_args.max_start_epoch", "3"]},
    ("DATM", 1): {"steps": 200, "epochs": 300, "dsa": DSA_STRATEGY, "batch_per_class": 1,
                  "args": ["--model.init_args.syn_steps", "20", "--model.init_args.max_start_epoch", "3"]},
    ("DATM", 10): {"steps": 100, "epochs": 300, "dsa": DSA_STRATEGY, "batch_per_class": 1,
                   "args": ["--model.init_args.syn_steps", "10", "--model.init_args.batch_syn", "50",
                            "--model.init_args.current_max_start_epoch", "2",
                            "--model.init_args.max_start_epoch", "3",
                            "--model.init_args.expansion_end", "100"]},
}
# DM and LD3M+DM: the same DM loss, networks, real batches and steps; LD3M renders its images
# from a latent diffusion prior (10 DDIM steps at IPC 1, 5 at IPC 10; its recipe's lr_latent /
# lr_embedding). An LD3M step costs ~4 s at IPC 1 and ~9 s at IPC 10 here (DM's ~1.3 / 1.5 s;
# measured at IPC 10: 457 s against 74 s for the 50 steps, start-up included),
# and the cross-architecture evaluation (ResNet-18 above all) dominates: 200 epochs, 2 runs
BUDGET[("DM", 1)] = {"steps": 100, "epochs": 200, "dsa": DSA_STRATEGY, "runs": 2}
BUDGET[("LD3M", 1)] = {"steps": 100, "epochs": 200, "dsa": DSA_STRATEGY, "runs": 2}
BUDGET[("DM", 10)] = {"steps": 50, "epochs": 200, "dsa": DSA_STRATEGY, "runs": 2}
BUDGET[("LD3M", 10)] = {"steps": 50, "epochs": 200, "dsa": DSA_STRATEGY, "runs": 2,
                        "args": ["--model.init_args.steps", "5"]}
# DQ selects real images (no steps); its embedding network: 500 SGD steps of 256 images
for _ipc in (1, 10, 50):
    BUDGET[("DQ", _ipc)] = {"steps": 1, "epochs": 300, "dsa": DSA_STRATEGY,
                            "args": ["--model.init_args.embed_steps", "500"]}
TRAJECTORY_METHODS = ("MTT", "DATM")
DEFAULT_PRIOR_ARGS = ("--ae_epochs 3 --denoiser_epochs 4 --batch_size 64 "
                      "--limit_train_batches 100")


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output appended to ``log``; return the wall time in seconds."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["DC", "DSA", "DD"])
    parser.add_argument("--ipc", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--root", default="runs/table")
    parser.add_argument("--batch_per_class", type=int, default=64,
                        help="real images per class per step (the DC/DSA recipes use 256)")
    parser.add_argument("--runs", type=int, default=3, help="fresh networks per set (default budgets)")
    parser.add_argument("--steps", type=int, default=None, help="override every budget's steps")
    parser.add_argument("--buffer", default=None, help="expert buffer of MTT/DATM (default <root>/buffer)")
    parser.add_argument("--experts", type=int, default=4, help="experts of a new buffer")
    parser.add_argument("--expert_epochs", type=int, default=5, help="epochs of a new buffer's experts")
    parser.add_argument("--expert_batches", type=int, default=80,
                        help="batches of 256 per expert epoch of a new buffer")
    parser.add_argument("--generator", default="runs/prior/fashionmnist",
                        help="LD3M's generator folder (built with ld3m prior if missing)")
    parser.add_argument("--prior_args", default=DEFAULT_PRIOR_ARGS,
                        help="ld3m prior's budget flags for a new generator")
    parser.add_argument("--archs", default="ConvNet", help="comma-separated evaluation networks")
    parser.add_argument("--epochs", type=int, default=None, help="override every budget's evaluation epochs")
    args = parser.parse_args()
    archs = args.archs.split(",")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    buffer = Path(args.buffer or root / "buffer")
    buffer_seconds = root / "buffer_seconds.txt"
    if set(args.methods) & set(TRAJECTORY_METHODS) and not buffer_seconds.exists():
        seconds = run([sys.executable, "-m", "ld3m.cli", "buffer", "--data", "FashionMNIST",
                       "--folder", str(buffer), "--experts", str(args.experts),
                       "--epochs", str(args.expert_epochs), "--logits", "true",
                       "--limit_train_batches", str(args.expert_batches),
                       "--progress_bar", "false"], root / "buffer_log.txt")
        buffer_seconds.write_text(f"{seconds:.0f}\n")
    generator = Path(args.generator)
    if "LD3M" in args.methods and not (generator / "ld3m_generator.json").exists():
        seconds = run([sys.executable, "-m", "ld3m.cli", "prior", "--data", "FashionMNIST",
                       "--folder", str(generator), *args.prior_args.split(),
                       "--progress_bar", "false"], root / "prior_log.txt")
        (root / "prior_seconds.txt").write_text(f"{seconds:.0f}\n")
    dq_embedding = None  # the first DQ set's embedding network, reused by the others
    rows = []
    for ipc in args.ipc:
        for method in args.methods:
            budget = dict(BUDGET[(method, ipc)])
            if args.steps is not None:
                budget["steps"] = args.steps
            if args.epochs is not None and budget["epochs"]:
                budget["epochs"] = args.epochs
            budget.setdefault("batch_per_class", args.batch_per_class)
            budget.setdefault("runs", args.runs)
            folder = root / f"{method.lower()}_ipc{ipc}"
            folder.mkdir(parents=True, exist_ok=True)
            log = folder / "log.txt"
            distilled = folder / "synthetic.safetensors"
            fit_seconds = None
            extra = list(budget.get("args", []))
            if method in TRAJECTORY_METHODS:
                extra += ["--model.init_args.buffer", str(buffer)]
            if method == "LD3M":
                extra += ["--model.init_args.generator", str(generator)]
            if method == "DQ" and dq_embedding is not None:
                extra += ["--model.init_args.embed_checkpoint", str(dq_embedding)]
            if not distilled.exists():
                config = f"{method.lower()}_fashionmnist_ipc{ipc}"  # a packaged recipe, by name
                fit_seconds = run([sys.executable, "-m", "ld3m.cli", "fit", "--config", config,
                                   "--trainer.max_steps", str(budget["steps"]),
                                   "--trainer.default_root_dir", str(folder),
                                   "--data.init_args.batch_per_class", str(budget["batch_per_class"]),
                                   "--evaluation.at_end", "false", "--evaluation.every_n_steps", "0",
                                   "--trainer.enable_progress_bar", "false", *extra], log)
                (folder / "fit_seconds.txt").write_text(f"{fit_seconds:.0f}\n")
            elif (folder / "fit_seconds.txt").exists():
                fit_seconds = float((folder / "fit_seconds.txt").read_text())
            if method == "DQ" and dq_embedding is None and (folder / "dq_embedding.pt").exists():
                dq_embedding = root / "dq_embedding.pt"
                if not dq_embedding.exists():
                    shutil.copyfile(folder / "dq_embedding.pt", dq_embedding)
            report = folder / "evaluation.json"
            if not report.exists():
                cmd = [sys.executable, "-m", "ld3m.cli", "evaluate", "--distilled", str(distilled),
                       "--archs", ",".join(archs), "--runs", str(budget["runs"]), "--dsa", budget["dsa"], "--output", str(report),
                       # the random-real baseline once per IPC (with the first method), and
                       # for DD, whose protocol (its learned steps) differs from the others'
                       "--baseline", str(method in (args.methods[0], "DD")).lower()]
                if budget["epochs"]:
                    cmd += ["--epochs", str(budget["epochs"])]
                run(cmd, log)
            data = json.loads(report.read_text())
            by_set: dict[str, dict[str, tuple[float, float]]] = {}
            for result in data["results"]:
                by_set.setdefault(result["set"], {})[result["arch"]] = (
                    100 * result["mean"], 100 * result["std"])
            for name, accs in by_set.items():
                is_random = name.startswith("random")
                if is_random and data["settings"].get("protocol") == "dd":
                    name += ", DD protocol"
                rows.append((name, data["settings"], accs, budget,
                             None if is_random else fit_seconds,
                             None if is_random else PUBLISHED.get((method, ipc))))
    columns = [f"{a} acc. (%)" for a in archs] + (["mean (%)"] if len(archs) > 1 else [])
    print("| set | distillation | evaluation | " + " | ".join(columns) + " | published (%) |")
    print("|---|---|---|" + "---|" * len(columns) + "---|")
    for name, settings, accs, budget, seconds, published in rows:
        if name.startswith("random"):
            distil = "-"
        else:
            distil = f"{budget['steps']} steps, {budget['batch_per_class']} real/class"
            if seconds:
                distil += f" ({seconds / 60:.0f} min)"
        evaluation = settings.get("protocol_note") or (
            f"{settings['runs']} x {settings['epochs']} ep, dsa {settings['dsa']}")
        cells = [f"{accs[a][0]:.2f} +- {accs[a][1]:.2f}" if a in accs else "-" for a in archs]
        if len(archs) > 1:
            known = [accs[a][0] for a in archs if a in accs]
            cells.append(f"{sum(known) / len(known):.2f}" if known else "-")
        pub = f"{published:.1f}" if published else "-"
        print(f"| {name} | {distil} | {evaluation} | " + " | ".join(cells) + f" | {pub} |")

if __name__ == "__main__":
    main()
