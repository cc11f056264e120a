"""Image-folder datasets, and the evaluation protocol over several architectures (tiny data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ld3m.datamodules import MNIST, ImageFolderData
from PIL import Image
from test_data import _write_tiny_mnist

from ld3m.cli import main
from ld3m.evaluation import evaluate, random_real_set

COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cow": (0, 0, 255)}


def _write_folder(root: Path, per_class: dict[str, int]) -> None:
    for split, count in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 24), colour).save(folder / f"{i}.png")


def test_image_folder_serves_balanced_resized_batches(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"train": 4, "val": 1})
    dm = ImageFolderData(str(tmp_path), image_size=16, batch_per_class=2, num_workers=0)
    assert dm.num_classes == 3 and dm.class_names == ["ant", "bee", "cow"]
    assert dm.image_shape == (3, 16, 16)
    dm.setup("fit")
    batch = dm.sample_per_class(2, torch.Generator().manual_seed(0))
    assert batch.shape == (3, 2, 3, 16, 16)
    rgb = dm.denormalize(batch.flatten(0, 1)).mean((-2, -1)).view(3, 2, 3)
    for c, colour in enumerate(COLOURS.values()):
        assert torch.allclose(rgb[c], torch.tensor(colour).float().div(255).expand(2, 3), atol=0.01)
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="5 images per class"):
        dm.sample_per_class(5)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderData(str(tmp_path / "missing")).setup("fit")
    _write_folder(tmp_path, {"train": 2})
    (tmp_path / "val" / "other").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "other" / "0.png")
    dm = ImageFolderData(str(tmp_path), image_size=8, num_workers=0)
    with pytest.raises(ValueError, match="other classes"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderData(str(tmp_path), image_size=2)


@pytest.fixture
def tiny(tmp_path: Path) -> MNIST:
    _write_tiny_mnist(tmp_path)
    dm = MNIST(data_dir=str(tmp_path), batch_per_class=1)
    dm.setup("fit")
    return dm


def test_evaluate_reports_every_set_and_architecture(tiny: MNIST) -> None:
    synthetic = random_real_set(tiny, 1, seed=3)
    synthetic.method = "DM"
    report = evaluate(synthetic, tiny, archs=["ConvNet", "AlexNet"], runs=2, epochs=2, dsa="none",
                      accelerator="cpu")
    assert len(report.results) == 4
    for result in report.results:
        assert len(result.accuracies) == 2
        assert all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert report.get("random real (IPC 1)", "AlexNet").arch == "AlexNet"
    table = report.table()
    assert table.splitlines()[0] == "| set | ConvNet | AlexNet |"
    assert "| DM (IPC 1) |" in table and "| random real (IPC 1) |" in table
    assert json.loads(report.to_json())["settings"]["runs"] == 2


def test_evaluate_rejects_another_dataset(tiny: MNIST) -> None:
    synthetic = random_real_set(tiny, 1)
    synthetic.dataset = "CIFAR10"
    with pytest.raises(ValueError, match="CIFAR10"):
        evaluate(synthetic, tiny, runs=1, epochs=1)
    with pytest.raises(ValueError, match="runs"):
        evaluate(synthetic, tiny, runs=0)


def test_evaluate_command(tiny: MNIST, tmp_path: Path, capsys) -> None:
    path = random_real_set(tiny, 1, seed=1).save(tmp_path / "set.safetensors")
    out = tmp_path / "report.json"
    code = main(["evaluate", "--distilled", str(path), "--data_dir", str(tiny.data_dir),
                 "--archs", "ConvNet,AlexNet", "--runs", "2", "--epochs", "2", "--dsa", "none",
                 "--accelerator", "cpu", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| set | ConvNet | AlexNet |" in printed
    results = json.loads(out.read_text())["results"]
    assert {(r["set"], r["arch"]) for r in results} == {
        ("random real (IPC 1)", "ConvNet"), ("random real (IPC 1)", "AlexNet"),
        ("random (IPC 1)", "ConvNet"), ("random (IPC 1)", "AlexNet")}


def test_evaluate_command_normalises_the_data_as_the_set(tiny: MNIST, tmp_path: Path,
                                                         monkeypatch) -> None:
    """A set distilled with --data.mean/--data.std (MTT's CIFAR-100 at CIFAR-10's statistics)
    is evaluated on real data normalised the same way; a set at the dataset's own is not moved."""
    import dataclasses

    import ld3m.commands

    seen = []
    monkeypatch.setattr(ld3m.commands, "run_evaluation",
                        lambda synthetic, real, **kwargs: seen.append(real) or
                        evaluate(None, real, runs=1, epochs=1, dsa="none", ipc=1, progress=False))
    own = random_real_set(tiny, 1, seed=1)
    moved = dataclasses.replace(own, mean=(0.5,), std=(0.25,))
    for name, one in (("own", own), ("moved", moved)):
        path = one.save(tmp_path / f"{name}.safetensors")
        assert main(["evaluate", "--distilled", str(path), "--data_dir", str(tiny.data_dir), "--runs", "1"]) == 0
    assert (seen[0].mean, seen[0].std) == (MNIST.mean, MNIST.std)
    assert (seen[1].mean, seen[1].std) == ((0.5,), (0.25,))
    x = torch.full((1, 1, 28, 28), 0.75)
    assert torch.allclose(seen[1].normalize(x), torch.full_like(x, 1.0))


def test_data_mean_and_std_options(tmp_path: Path) -> None:
    data = MNIST(data_dir=str(tmp_path), mean=[0.5], std=[0.25])
    assert (data.mean, data.std) == ((0.5,), (0.25,))
    with pytest.raises(ValueError, match="both mean and std"):
        MNIST(data_dir=str(tmp_path), mean=[0.5])
    with pytest.raises(ValueError, match="exclude each other"):
        MNIST(data_dir=str(tmp_path), mean=[0.5], std=[0.25], zca=True)
    with pytest.raises(ValueError, match="1 values each"):
        MNIST(data_dir=str(tmp_path), mean=[0.5, 0.5], std=[0.25, 0.25])


def test_evaluate_command_stacks_networks_with_the_same_results(tiny: MNIST, tmp_path: Path) -> None:
    """``ld3m evaluate --stack 2`` trains the networks two at a time: the report is the one of
    one network at a time, network for network."""
    path = random_real_set(tiny, 1, seed=1).save(tmp_path / "set.safetensors")
    reports = []
    for stack in (0, 2):
        out = tmp_path / f"report{stack}.json"
        assert main(["evaluate", "--distilled", str(path), "--data_dir", str(tiny.data_dir),
                     "--runs", "3", "--epochs", "2", "--accelerator", "cpu", "--stack", str(stack),
                     "--output", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0] == reports[1]
    assert main(["evaluate", "--distilled", str(path), "--data_dir", str(tiny.data_dir),
                 "--stack", "-1"]) == 2


def test_a_dq_fraction_sets_baseline_draws_its_class_counts(tiny: MNIST, monkeypatch) -> None:
    """A DQ set of unequal classes (``meta.dq.class_counts``) is compared with random real
    images in the same counts per class, not with its largest count from every class."""
    import dataclasses

    import ld3m.evaluation as evaluation

    counts = [2, 1, 3, 1, 2, 1, 1, 2, 1, 1]
    picked = random_real_set(tiny, 1, seed=3, counts=counts)
    assert torch.bincount(picked.labels, minlength=10).tolist() == counts
    assert picked.ipc == 3 and len(picked.images) == sum(counts)
    dq = dataclasses.replace(picked, method="DQ", meta={"dq": {"class_counts": counts}})
    seen = []

    def fake_train_and_test(data, real, arch, **kwargs):
        seen.append((data.method, torch.bincount(data.labels, minlength=10).tolist()))
        return 0.5

    monkeypatch.setattr(evaluation, "train_and_test", fake_train_and_test)
    report = evaluate(dq, tiny, runs=2, epochs=1, dsa="none", progress=False)
    assert [c for method, c in seen if method == "random"] == [counts, counts]
    assert report.settings["baseline_counts"] == counts
    seen.clear()
    evaluate(dq, tiny, runs=1, epochs=1, dsa="none", progress=False, ipc=2)  # explicit: 2 each
    assert [c for method, c in seen if method == "random"] == [[2] * 10]
