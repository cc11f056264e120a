"""The multi-GPU, multi-node and single-GPU paths, checked on CPU: 2-process DDP (gloo, the
collectives NCCL runs) through the command line, device choices, fp16 mixed precision."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import ld3m.modules
import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from ld3m.cli import main, method_names
from ld3m.evaluation import evaluate, random_real_set, trainer_device

TESTS = Path(__file__).parent
NET = "ConvNetW32"


# ------------------------------------------------------------------------------ DDP evaluation
@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, str]:
    """A stand-in buffer and a tiny generator for test_ld3m's TinyData (3 classes, 1x16x16)."""
    from test_generator import tiny_generator
    from test_mtt import write_buffer

    root = tmp_path_factory.mktemp("inputs")
    buffer = write_buffer(root / "buffer", experts=2, epochs=3, shape=(1, 16, 16), classes=3,
                          dataset="Tiny")
    generator = tiny_generator().save_pretrained(root / "generator")
    return {"buffer": str(buffer), "generator": str(generator)}


METHOD_ARGS = {
    "DM": ["--model.network", NET, "--model.dsa", "none"],
    "DC": ["--model.network", NET, "--model.outer_loop", "2", "--model.inner_loop", "1"],
    "MTT": ["--model.buffer", "{buffer}", "--model.syn_steps", "2", "--model.max_start_epoch", "2",
            "--model.expert_epochs", "2", "--model.gradient", "recompute", "--model.dsa", "none"],
    "LD3M": ["--model.generator", "{generator}", "--model.steps", "2", "--model.chunk_size", "2",
             "--model.network", NET, "--model.dsa", "none"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_ddp_fit_with_evaluation_finishes(method: str, tiny_inputs, tmp_path: Path) -> None:
    """2-process DDP ``ld3m fit`` with mid-run and end-of-fit evaluation: it finishes (today's
    bug: a hang), writes ``evaluation.md``, both ranks log the same tables, and the evaluation
    networks are spread over the two ranks."""
    root = tmp_path / "run"
    args = ["fit", "--model", method, "--model.ipc", "1",
            *[a.format(**tiny_inputs) for a in METHOD_ARGS[method]],
            "--data", "test_ld3m.TinyData", "--data.batch_per_class", "4",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--evaluation.every_n_steps", "1",
            "--evaluation.runs", "2", "--evaluation.epochs", "2", "--evaluation.archs", NET,
            "--evaluation.dsa", "none"]
    env = {k: v for k, v in os.environ.items() if k != "LD3M_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "ld3m.cli", *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = (root / "evaluation.md").read_text()
    assert f"| {method} (IPC 1) |" in report
    tables = re.findall(r"evaluation at step 2 \(2 runs, 2 epochs\):\n((?:\|.*\n)+)", result.stderr)
    assert len(tables) == 4, result.stderr[-4000:]  # mid-run and at the end, on each rank
    assert tables[0] == tables[1] and tables[2] == tables[3], "the ranks logged other numbers"
    assert tables[2].strip() == report.strip()
    for rank in (0, 1):  # 2 runs x (random real + the set) = 4 networks: 2 on each rank
        assert len(re.findall(rf"run \d/2 \(rank {rank} of 2\)", result.stderr)) >= 4
    assert (root / "evaluation.png").is_file()


def test_evaluate_spread_needs_a_process_group(fmnist) -> None:
    synthetic = random_real_set(fmnist, ipc=1)
    with pytest.raises(ValueError, match="initialised process group"):
        evaluate(synthetic, fmnist, archs=[NET], runs=1, epochs=1, rank=0, world_size=2,
                 progress=False)
    with pytest.raises(ValueError, match="rank"):
        evaluate(synthetic, fmnist, archs=[NET], runs=1, epochs=1, rank=2, world_size=2)


def test_evaluation_trainers_use_the_ranks_own_device() -> None:
    assert trainer_device("auto", "cuda:3") == ("gpu", [3])
    assert trainer_device("auto", torch.device("cuda", 1)) == ("gpu", [1])
    assert trainer_device("auto", "cpu") == ("cpu", 1)
    assert trainer_device("gpu", None) == ("gpu", 1)


# ------------------------------------------------------------------------------ ld3m buffer
@pytest.mark.parametrize("env, rank, world, device", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 3, 4, 1),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2"}, 5, 8, 2),
])
def test_buffer_takes_the_local_gpu_of_its_launcher(env: dict, rank: int, world: int,
                                                    device: int, monkeypatch) -> None:
    """torchrun / SLURM variables: experts spread by the global rank, one GPU per local process
    (read before the launcher's variables are removed)."""
    import ld3m.experts

    seen = {}

    def fake_train(data, folder, **kwargs):
        seen.update(kwargs, env_left=[v for v in env if v in os.environ])

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(ld3m.experts, "train_experts", fake_train)
    assert main(["buffer", "--folder", "unused", "--experts", "8"]) == 0
    assert (seen["rank"], seen["world_size"]) == (rank, world)
    assert seen["trainer_kwargs"]["devices"] == [device]
    assert seen["env_left"] == [], "a Trainer would try to join the launcher's process group"


# ------------------------------------------------------------------------------ fp16
@pytest.mark.parametrize("name", sorted(method_names()))
def test_fp16_works_or_is_refused_naming_bf16(name: str) -> None:
    cls = getattr(ld3m.modules, name)
    if cls.supports_fp16:
        cls.check_precision("16-mixed")
    else:
        with pytest.raises(ValueError, match="bf16-mixed"):
            cls.check_precision("16-mixed")
    for fine in ("bf16-mixed", "32-true", "32"):
        cls.check_precision(fine)


def _fp16_trainer(tmp_path: Path, steps: int) -> L.Trainer:
    """A Trainer with fp16 autocast and a real GradScaler (on the CPU, where Lightning would
    otherwise turn ``16-mixed`` into bf16)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path),
                     plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


def test_dm_trains_under_fp16_loss_scaling(fmnist, tmp_path: Path) -> None:
    model = ld3m.modules.DM(ipc=1, network="ConvNetD1", dsa="none")
    trainer = _fp16_trainer(tmp_path, steps=3)
    start = {}

    class Start(L.Callback):
        def on_train_start(self, trainer, pl_module):
            start["images"] = pl_module.images.detach().clone()

    trainer.callbacks.append(Start())
    trainer.fit(model, datamodule=fmnist)
    assert trainer.precision == "16-mixed"
    assert torch.isfinite(model.images).all()
    assert not torch.equal(model.images.detach(), start["images"]), "no step was taken"


def test_a_method_with_hand_written_gradients_refuses_fp16(fmnist, tmp_path: Path) -> None:
    model = ld3m.modules.DC(ipc=1, network="ConvNetD1")
    with pytest.raises(ValueError, match="use --trainer.precision bf16-mixed"):
        _fp16_trainer(tmp_path, steps=1).fit(model, datamodule=fmnist)
