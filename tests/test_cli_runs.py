"""Runs through the command line lose nothing: Ctrl-C and resume, failed runs, second runs,
file modes, reproducible evaluation."""

from __future__ import annotations

import csv
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_fashion_mnist_slice
from ld3m.datamodules import FashionMNIST

from ld3m.cli import main
from ld3m.evaluation import random_real_set
from ld3m.files import atomic_dir, atomic_write
from ld3m.synthetic import SyntheticSet

NET = "ConvNetW32"


def _fit(root: Path, *extra: str, steps: int = 8) -> list[str]:
    """A tiny, fast ``ld3m fit`` (IPC 1, 8 real images per class, no DSA, no evaluation) that
    logs the loss of every step."""
    return ["fit", "--model.ipc", "1", "--model.network", NET, "--model.dsa", "none",
            "--data.batch_per_class", "8", "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(root), "--trainer.log_every_n_steps", "1",
            "--evaluation.at_end", "false", "--trainer.enable_progress_bar", "false", *extra]


def _losses(root: Path) -> dict[int, float]:
    """Step -> loss from every ``metrics.csv`` under ``root``."""
    losses = {}
    for path in root.rglob("metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("loss"):
                    losses[int(row["step"])] = float(row["loss"])
    return losses


@pytest.fixture
def restore_sigint():
    """Lightning ignores SIGINT after a Ctrl-C shutdown; give the test process its handler back."""
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------ Ctrl-C, resume
@pytest.mark.parametrize("when, stops_at", [("end", 3), ("start", 4)])
def test_ctrl_c_then_resume_continues_like_an_uninterrupted_run(data_dir: Path, tmp_path: Path,
                                                                restore_sigint, when: str,
                                                                stops_at: int) -> None:
    """Ctrl-C during step 3, or between steps 3 and 4 (then step 4 runs first): one checkpoint
    at a step's end; resumed, the run takes exactly the uninterrupted run's steps."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(_fit(straight)) == 0
    with pytest.raises(SystemExit) as info:  # Lightning's Ctrl-C shutdown exits 1
        main(_fit(stopped, "--trainer.callbacks+=helpers.SigintAt",
                  "--trainer.callbacks.step", "3", "--trainer.callbacks.when", when))
    assert info.value.code == 1
    (last,) = stopped.rglob("last.ckpt")
    assert last == stopped / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == stops_at
    assert (stopped / "synthetic.interrupted.safetensors").is_file()
    assert not (stopped / "synthetic.safetensors").exists(), "an unfinished set under the final name"

    assert main(_fit(stopped, "--ckpt_path", str(last))) == 0
    assert sorted(p.relative_to(stopped) for p in stopped.rglob("*.ckpt")) == [
        last.relative_to(stopped)], "one last.ckpt, no last-v1.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8
    expected = _losses(straight)
    assert len(expected) == 8
    assert _losses(stopped) == expected, "the resumed run took other steps"
    a = SyntheticSet.load(straight / "synthetic.safetensors")
    b = SyntheticSet.load(stopped / "synthetic.safetensors")
    assert torch.equal(a.images, b.images)


def test_ckpt_path_last_picks_the_newest_run(data_dir: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "run"
    assert main(_fit(root, steps=2)) == 0
    assert main(_fit(root, steps=3)) == 0  # a second run: version_1
    capsys.readouterr()
    assert main(_fit(root, "--ckpt_path", "last", steps=4)) == 0
    assert f"resuming from {root / 'lightning_logs' / 'version_1' / 'checkpoints' / 'last.ckpt'}" \
        in capsys.readouterr().err
    newest = root / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(newest, map_location="cpu", weights_only=False)["global_step"] == 4
    first = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(first, map_location="cpu", weights_only=False)["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("sent, notice, status", [(signal.SIGINT, "Ctrl-C", 1),
                                                  (signal.SIGTERM, "SIGTERM", 143)])
def test_stopped_from_outside_a_subprocess(data_dir: Path, tmp_path: Path, sent: int, notice: str,
                                           status: int) -> None:
    """A real Ctrl-C, or a scheduler's SIGTERM, from another process, landing wherever the run
    is: one checkpoint at a step boundary, a notice, no traceback; resuming completes the run."""
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("LD3M_DEBUG", None)
    command = [sys.executable, "-m", "ld3m.cli", *_fit(root, "--trainer.callbacks+=helpers.Pace",
                                                       "--grid.every_n_steps", "1", steps=200)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not (root / "images" / "step_000003.png").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(sent)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert "Traceback" not in err and notice in err, err
    (last,) = root.rglob("last.ckpt")
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 3 <= step < 200
    assert main(_fit(root, "--ckpt_path", str(last), steps=step + 2)) == 0
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step + 2


# ------------------------------------------------------------------------------ runs keep outputs
def test_a_failed_run_leaves_the_previous_run_untouched(data_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    root = tmp_path / "run"
    assert main(_fit(root, steps=2)) == 0
    before = {p: p.read_bytes() for p in (root / "synthetic.safetensors",
                                          root / "images" / "step_000000.png",
                                          root / "images" / "final.png")}
    capsys.readouterr()
    assert main(_fit(root, "--model.lr_img", "1e30", steps=5)) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")][0].count("became") == 1
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was overwritten by the failed run"
    failed = root / "lightning_logs" / "version_1"
    assert f"this run writes its own to {failed}" in err
    assert (failed / "synthetic.failed.safetensors").is_file()
    assert not (failed / "synthetic.safetensors").exists()


def test_a_second_run_writes_next_to_its_logs(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert main(_fit(root, steps=1)) == 0
    first = (root / "synthetic.safetensors").read_bytes()
    assert main(_fit(root, "--model.seed", "5", steps=1)) == 0
    assert (root / "synthetic.safetensors").read_bytes() == first
    second = root / "lightning_logs" / "version_1"
    assert SyntheticSet.load(second / "synthetic.safetensors").meta["hparams"]["seed"] == 5
    assert (second / "images" / "final.png").is_file()
    assert (second / "checkpoints" / "last.ckpt").is_file()


# ------------------------------------------------------------------------------ file modes
@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_outputs_honour_the_umask(data_dir: Path, tmp_path: Path, umask_022) -> None:
    root = tmp_path / "run"
    assert main(_fit(root, "--evaluation.at_end", "true", "--evaluation.runs", "1",
                     "--evaluation.epochs", "1", "--evaluation.every_n_steps", "1",
                     "--evaluation.archs", NET, steps=1)) == 0
    files = [root / "synthetic.safetensors", root / "evaluation.md", root / "evaluation.json",
             root / "evaluation.png", *sorted((root / "images").glob("*.png")),
             *root.rglob("last.ckpt")]
    assert len(files) >= 7
    assert {str(p): _mode(p) for p in files} == {str(p): 0o644 for p in files}
    assert _mode(root / "images") == 0o755


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o077, 0o600, 0o700)])
def test_atomic_writes_take_the_umask(tmp_path: Path, umask: int, file_mode: int,
                                      dir_mode: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "shard.safetensors") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "prior") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "shard.safetensors") == file_mode
    assert _mode(tmp_path / "prior") == dir_mode
    assert _mode(tmp_path / "prior" / "config.json") == file_mode


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_is_reproducible_with_one_seed(data_dir: Path, tmp_path: Path, capsys) -> None:
    source = FashionMNIST(data_dir=str(data_dir))
    source.setup("fit")
    small = write_fashion_mnist_slice(source, tmp_path / "slice", train=600, test=200)
    path = random_real_set(source, ipc=2, seed=3).save(tmp_path / "set.safetensors")
    args = ["evaluate", "--distilled", str(path), "--data_dir", str(small), "--archs", NET,
            "--runs", "2", "--epochs", "3"]
    tables = []
    for seed in ("0", "0", "1"):
        assert main([*args, "--seed", seed]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1], "the same seed gave another table"
    assert tables[0] != tables[2], "the seed changes nothing: the test would not see a draw"


# ------------------------------------------------------------------------------ loggers
def test_images_and_tables_reach_tensorboard(data_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "run"
    assert main(_fit(root, "--evaluation.at_end", "true", "--evaluation.runs", "1",
                     "--evaluation.epochs", "1", "--evaluation.archs", NET, steps=2)) == 0
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"),
                              size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "synthetic/images" in tags["images"]
    assert [e.step for e in events.Images("synthetic/images")] == [0, 2]  # the first, the final
    assert "loss" in tags["scalars"] and f"eval/{NET}" in tags["scalars"]
    (table,) = [t for t in tags["tensors"] if t.startswith("evaluation")]
    text = events.Tensors(table)[0].tensor_proto.string_val[0].decode()
    assert "| DM (IPC 1) |" in text and NET in text


class _Recording:
    """What a W&B-style logger (``log_image`` / ``log_table``) was sent."""

    def __init__(self) -> None:
        self.images, self.tables = [], []


def test_images_and_tables_reach_a_wandb_style_logger(fmnist, tmp_path: Path) -> None:
    import lightning as L
    from ld3m.callbacks import ImageGrid, PeriodicEvaluation
    from ld3m.modules import DM
    from lightning.pytorch.loggers import Logger

    record = _Recording()

    class WandbLike(Logger):
        name, version = "wandb-like", 0

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_image(self, key, images, step=None):
            record.images.append((key, tuple(images[0].shape), step))

        def log_table(self, key, columns, data, step=None):
            record.tables.append((key, columns, data, step))

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=WandbLike(),
                        enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path),
                        callbacks=[ImageGrid(every_n_steps=0),
                                   PeriodicEvaluation(runs=1, epochs=1, archs=NET)])
    trainer.fit(DM(ipc=1, network=NET, dsa="none"), datamodule=fmnist)
    assert [(key, step) for key, _, step in record.images] == [("synthetic/images", 0),
                                                               ("synthetic/images", 2)]
    assert record.images[0][1][0] == 3  # a (C, H, W) grid
    (table,) = record.tables
    assert table[0] == "evaluation" and table[1] == ["set", "arch", "accuracy", "std"]
    assert [row[0] for row in table[2]] == ["random real (IPC 1)", "DM (IPC 1)"]


# ------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_two_process_ddp_runs_keep_their_outputs(data_dir: Path, tmp_path: Path) -> None:
    """Under 2-process DDP (gloo): the output folder is decided once for both ranks, the
    second run into the folder keeps the first's set, each run has its last.ckpt."""
    root = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "LD3M_DEBUG"}
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    for seed in ("0", "1"):
        result = subprocess.run([sys.executable, "-m", "ld3m.cli",
                                 *_fit(root, *ddp, "--model.seed", seed, steps=2)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    first = SyntheticSet.load(root / "synthetic.safetensors")
    second = SyntheticSet.load(root / "lightning_logs" / "version_1" / "synthetic.safetensors")
    assert (first.meta["hparams"]["seed"], second.meta["hparams"]["seed"]) == (0, 1)
    for version in (0, 1):
        last = root / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
