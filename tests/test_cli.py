"""Tests for the ``ld3m`` command line, and for resuming a fit from a checkpoint."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import error_line
from ld3m.datamodules import FashionMNIST
from ld3m.modules import DM
from lightning.pytorch.callbacks import ModelCheckpoint

from ld3m.cli import main
from ld3m.synthetic import SyntheticSet

SMALL_NET = "ConvNetW32"


def _fit_args(root: Path, *extra: str) -> list[str]:
    """A tiny ``ld3m fit``: IPC 1, 8 real images per class, 2 steps, no evaluation."""
    return ["fit", "--model.ipc", "1", "--data.batch_per_class", "8", "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(root), "--evaluation.at_end", "false",
            "--trainer.enable_progress_bar", "false", *extra]


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("ld3m")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ld3m.cli"]


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("LD3M_DEBUG", None)
    return subprocess.run([*_cli_command(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _corrupt_set(tmp_path: Path) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    return path


# ------------------------------------------------------------------------------ bad input
def test_unknown_network(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(_fit_args(tmp_path, "--model.network", "Foo")) == 2
    assert "unknown network 'Foo'" in error_line(capsys)


def test_ipc_above_class_size(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(_fit_args(tmp_path, "--model.ipc", "7000", "--model.network", SMALL_NET)) == 2
    line = error_line(capsys)
    assert "7000" in line and "6000" in line


def test_missing_data_dir(data_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())  # no fallback to the Debian folder
    assert main(_fit_args(tmp_path, "--data.data_dir", str(tmp_path / "nonexistent"))) == 2
    line = error_line(capsys)
    assert "FashionMNIST not found" in line and str(tmp_path / "nonexistent") in line


def test_evaluate_corrupt_set(tmp_path: Path, capsys) -> None:
    bad = _corrupt_set(tmp_path)
    assert main(["evaluate", "--distilled", str(bad)]) == 2
    line = error_line(capsys)
    assert str(bad) in line and "not a valid ld3m synthetic set" in line


def test_evaluate_missing_set(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--distilled", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in error_line(capsys)


def test_debug_env_shows_the_exception(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LD3M_DEBUG", "1")
    with pytest.raises(ValueError, match="not a valid ld3m synthetic set"):
        main(["evaluate", "--distilled", str(_corrupt_set(tmp_path))])


@pytest.mark.slow
def test_subprocess_error_is_a_single_line(tmp_path: Path) -> None:
    result = _run_cli(["evaluate", "--distilled", str(_corrupt_set(tmp_path))], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_subprocess_missing_dataset_ends_with_one_error_line(tmp_path: Path) -> None:
    # MNIST has no system folder to fall back on. Lightning's own banner lines ("GPU available",
    # the seed) come first on stderr: the error is the last line, the only "error:" line, and
    # there is no traceback.
    result = _run_cli(["fit", "--data", "MNIST", "--data.data_dir", "/nonexistent",
                       "--trainer.default_root_dir", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.rstrip().splitlines()[-1]], result.stderr
    assert "MNIST not found in /nonexistent/MNIST/raw" in errors[0]


def test_print_config(capsys) -> None:
    assert main(["fit", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "ld3m.modules.DM" in out
    assert "ld3m.datamodules.FashionMNIST" in out


# ------------------------------------------------------------------------------ a tiny fit
def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.rglob(pattern))
    assert len(found) == 1, f"expected one {pattern} under {root}, found {found}"
    return found[0]


def test_tiny_fit_writes_its_outputs(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert main(_fit_args(root, "--trainer.log_every_n_steps", "1")) == 0
    synthetic = SyntheticSet.load(root / "synthetic.safetensors")
    assert synthetic.images.shape == (10, 1, 28, 28)
    assert (synthetic.method, synthetic.dataset, synthetic.ipc) == ("DM", "FashionMNIST", 1)
    assert synthetic.meta["hparams"]["network"] == "ConvNet"
    png = root / "images" / "final.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "images" / "step_000000.png").is_file()
    with _one(root, "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 2 and all(v > 0 for v in losses)
    checkpoint = torch.load(_one(root, "last.ckpt"), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["ld3m"]["dataset"] == "FashionMNIST"
    assert torch.equal(checkpoint["state_dict"]["images"], synthetic.images)
    assert not [p for p in root.rglob(".*") if p.is_file()], "temporary files were left behind"


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_cli_resume_into_a_new_folder(data_dir: Path, tmp_path: Path, capsys) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    net = ("--model.network", SMALL_NET)
    assert main(_fit_args(first, *net)) == 0
    ckpt = _one(first, "last.ckpt")
    capsys.readouterr()
    assert main(_fit_args(second, *net, "--ckpt_path", str(ckpt), "--trainer.max_steps", "4")) == 0
    err = capsys.readouterr().err
    assert err.count("synthetic set written to") == 1, "log lines are repeated"
    # each run keeps its own checkpoints: the second must not overwrite the first's last.ckpt
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    resumed = torch.load(_one(second, "last.ckpt"), map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    assert torch.equal(resumed["state_dict"]["images"],
                       SyntheticSet.load(second / "synthetic.safetensors").images)


# ------------------------------------------------------------------------------ resume
class _RecordStart(L.Callback):
    """The state the trainer starts from (after a checkpoint has been restored)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step
        self.images = pl_module.images.detach().clone()
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def _fit(data_dir: Path, root: Path, max_steps: int, ckpt: Path | None = None,
         dsa: str = "none") -> tuple[DM, _RecordStart]:
    model = DM(ipc=1, network=SMALL_NET, dsa=dsa, seed=0)
    data = FashionMNIST(data_dir=str(data_dir), batch_per_class=8)
    record = _RecordStart()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        callbacks=[record, ModelCheckpoint(dirpath=str(root / "checkpoints"),
                                           every_n_train_steps=100, save_last=True)])
    trainer.fit(model, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    assert trainer.global_step == max_steps
    return model, record


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_restores_images_step_and_optimizer(data_dir: Path, tmp_path: Path) -> None:
    _fit(data_dir, tmp_path / "a", 2)
    ckpt_path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    resumed, record = _fit(data_dir, tmp_path / "b", 4, ckpt=ckpt_path)
    assert record.step == 2
    assert torch.equal(record.images, checkpoint["state_dict"]["images"])
    saved_state = checkpoint["optimizer_states"][0]["state"]
    assert set(record.optimizer["state"]) == set(saved_state) == {0}
    momentum = record.optimizer["state"][0]["momentum_buffer"]
    assert momentum.abs().sum() > 0
    assert torch.equal(momentum, saved_state[0]["momentum_buffer"])
    assert record.optimizer["param_groups"][0]["momentum"] == 0.5
    assert resumed.dataset_name == "FashionMNIST" and resumed.mean == pytest.approx((0.2861,))
    assert not torch.equal(resumed.images.detach(), record.images), "no step after resuming"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("dsa", ["none", "color_crop_cutout_flip_scale_rotate"])
def test_resume_is_exact(data_dir: Path, tmp_path: Path, dsa: str) -> None:
    # The method's randomness (networks, DSA) is keyed by seed, step and rank, the momentum is
    # restored, and the class-balanced real stream is indexed by step and restarts at the
    # restored global_step: 2 + 2 resumed steps equal 4 uninterrupted ones, bit for bit.
    _fit(data_dir, tmp_path / "a", 2, dsa=dsa)
    resumed, _ = _fit(data_dir, tmp_path / "b", 4, ckpt=tmp_path / "a" / "checkpoints" / "last.ckpt",
                      dsa=dsa)
    straight, _ = _fit(data_dir, tmp_path / "c", 4, dsa=dsa)
    assert torch.equal(resumed.images, straight.images)
