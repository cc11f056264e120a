"""``--evaluation.keep_best``: the set of the best evaluation is kept next to the final one, and
the report says which step it is (as MTT and DATM report their best checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ld3m.callbacks import evaluation as evaluation_module
from test_cli_runs import NET, _fit

from ld3m.cli import main
from ld3m.evaluation import EvalReport, EvalResult
from ld3m.synthetic import SyntheticSet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scripted_accuracies(monkeypatch):
    """Replace the networks' training by scripted accuracies (the callback's logic is under
    test here; the real evaluation is in the CLI test below); keeps the sets it was given."""
    seen: list[torch.Tensor] = []
    means = iter([0.50, 0.80, 0.60, 0.70])  # steps 1, 2, 3 and the end

    def fake(synthetic, real, **kwargs):
        seen.append(synthetic.images.clone())
        name = f"{synthetic.method} (IPC {synthetic.ipc})"
        return EvalReport([EvalResult(name, kwargs["archs"][0], [next(means)])], {})

    monkeypatch.setattr(evaluation_module, "evaluate", fake)
    return seen


def test_the_best_evaluation_set_is_kept_and_named(data_dir: Path, tmp_path: Path,
                                                   scripted_accuracies) -> None:
    root = tmp_path / "run"
    assert main(_fit(root, "--evaluation.at_end", "true", "--evaluation.every_n_steps", "1",
                     "--evaluation.keep_best", "true", "--evaluation.baseline", "false",
                     "--evaluation.archs", NET, steps=3)) == 0
    best = SyntheticSet.load(root / "synthetic.best.safetensors")
    final = SyntheticSet.load(root / "synthetic.safetensors")
    assert torch.equal(best.images, scripted_accuracies[1])  # step 2's set: 80 %
    assert torch.equal(final.images, scripted_accuracies[3])
    assert not torch.equal(best.images, final.images)
    text = (root / "evaluation.md").read_text()
    assert f"Best evaluation: step 2, {NET} 80.00" in text
    report = json.loads((root / "evaluation.json").read_text())
    assert report["settings"]["best"]["step"] == 2
    assert report["settings"]["best"]["file"] == "synthetic.best.safetensors"


def test_without_keep_best_no_best_file(data_dir: Path, tmp_path: Path, scripted_accuracies) -> None:
    root = tmp_path / "run"
    assert main(_fit(root, "--evaluation.at_end", "true", "--evaluation.every_n_steps", "1",
                     "--evaluation.baseline", "false", "--evaluation.archs", NET, steps=3)) == 0
    assert not (root / "synthetic.best.safetensors").exists()
    assert "Best evaluation" not in (root / "evaluation.md").read_text()


def test_the_best_survives_a_resume() -> None:
    from ld3m.callbacks import PeriodicEvaluation

    callback = PeriodicEvaluation(keep_best=True)
    callback.best = {"step": 40, "arch": "ConvNet", "mean": 0.7, "std": 0.01,
                     "file": "synthetic.best.safetensors"}
    restored = PeriodicEvaluation(keep_best=True)
    restored.load_state_dict(callback.state_dict())
    assert restored.best == callback.best


def test_keep_best_with_the_real_evaluation(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert main(_fit(root, "--evaluation.at_end", "true", "--evaluation.every_n_steps", "1",
                     "--evaluation.keep_best", "true", "--evaluation.runs", "1",
                     "--evaluation.epochs", "1", "--evaluation.baseline", "false",
                     "--evaluation.archs", NET, steps=2)) == 0
    report = json.loads((root / "evaluation.json").read_text())
    best = report["settings"]["best"]
    assert best["step"] in (1, 2)
    assert SyntheticSet.load(root / "synthetic.best.safetensors").ipc == 1


def test_the_periodic_evaluation_takes_the_protocol(data_dir: Path, tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    """``--evaluation.protocol glad`` (the LD3M recipes') reaches the evaluation; a bad name is
    one ``error:`` line before any training."""
    protocols = []

    def fake(synthetic, real, **kwargs):
        protocols.append(kwargs["protocol"])
        name = f"{synthetic.method} (IPC {synthetic.ipc})"
        return EvalReport([EvalResult(name, kwargs["archs"][0], [0.5])], {})

    monkeypatch.setattr(evaluation_module, "evaluate", fake)
    root = tmp_path / "run"
    assert main(_fit(root, "--evaluation.at_end", "true", "--evaluation.protocol", "glad",
                     "--evaluation.baseline", "false", "--evaluation.archs", NET, steps=1)) == 0
    assert protocols == ["glad"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(_fit(bad, "--evaluation.protocol", "gald", steps=1)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "glad" in err
    assert not (bad / "synthetic.safetensors").exists()
