"""Stacked evaluation: K networks trained at once equal K networks trained one by one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import write_fashion_mnist_slice
from ld3m.datamodules import DistilledDataModule, FashionMNIST

import ld3m.evaluation as evaluation
from ld3m.evaluation import Classifier, evaluate, random_real_set
from ld3m.networks import get_network, reset_parameters
from ld3m.stacked import StackedClassifier, StackedEpochs, stackable
from ld3m.synthetic import SyntheticSet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small(fmnist: FashionMNIST, tmp_path: Path) -> FashionMNIST:
    """Fashion-MNIST's first 300 training and 100 test images, in its own IDX layout."""
    root = write_fashion_mnist_slice(fmnist, tmp_path / "slice", train=300, test=100)
    dm = FashionMNIST(data_dir=str(root))
    dm.setup("fit")
    return dm


def _two_classes(real: FashionMNIST, ipc: int, seed: int = 0) -> SyntheticSet:
    """``ipc`` real images of classes 0 and 1, a 2-class set."""
    images = real.sample_per_class(ipc, torch.Generator().manual_seed(seed), classes=[0, 1])
    return SyntheticSet(images.flatten(0, 1), torch.arange(2).repeat_interleave(ipc), real.mean,
                        real.std, 2, method="random", dataset=real.dataset_name, ipc=ipc)


def _trainer(epochs: int, callbacks=()) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=list(callbacks),
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _sequential(synthetic: SyntheticSet, arch: str, seed: int, epochs: int, dsa: str,
                batch_size: int) -> tuple[Classifier, list[float]]:
    """One network as :func:`ld3m.evaluation.train_and_test` trains it, with its step losses."""
    c, h, _ = synthetic.image_shape
    model = Classifier(arch, c, synthetic.num_classes, h, lr=0.01, epochs=epochs, dsa=dsa, seed=seed)
    record = _Losses()
    _trainer(model.training_epochs, [record]).fit(
        model, datamodule=DistilledDataModule(synthetic, batch_size=batch_size, seed=seed + 2))
    return model, record.losses


@pytest.mark.parametrize("arch, dsa, soft", [
    ("ConvNet", "none", False),
    ("ConvNet", "color_crop_cutout_flip_scale_rotate", False),
    ("ConvNetD1", "color_crop_cutout_flip_scale_rotate", True),
])
def test_stacked_networks_follow_their_sequential_twins(small, arch: str, dsa: str,
                                                        soft: bool) -> None:
    """Every minibatch loss and the final weights of each stacked network equal the sequential
    network's with its seed: its init, batch order (2 batches per epoch), DSA draws, and the
    lr drop with fresh momentum after epoch E // 2 + 1 (E = 4: epoch 4 trains at lr 0.001)."""
    synthetic = _two_classes(small, ipc=3)
    if soft:
        synthetic.soft_labels = torch.randn(6, 2, generator=torch.Generator().manual_seed(4))
    seeds, epochs, batch = [3, 1004], 4, 4
    stacked = StackedClassifier(arch, 1, 2, 28, seeds, synthetic.images,
                                synthetic.soft_labels if soft else synthetic.labels, lr=0.01,
                                epochs=epochs, dsa=dsa, batch_size=batch, epochs_per_step=3,
                                record_losses=True)
    _trainer(1).fit(stacked)
    assert [epoch for epoch, _ in stacked.losses] == [e for e in range(epochs + 1) for _ in "ab"]
    assert stacked.optimizers().optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    for k, seed in enumerate(seeds):
        model, losses = _sequential(synthetic, arch, seed, epochs, dsa, batch)
        ours = [float(step[k]) for _, step in stacked.losses]
        assert ours == pytest.approx(losses, abs=1e-5, rel=1e-5), k
        theirs = dict(model.net.named_parameters())
        for name, value in stacked.network(k).named_parameters():
            torch.testing.assert_close(value, theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    first = dict(stacked.network(0).named_parameters())
    other = dict(stacked.network(1).named_parameters())
    assert not torch.allclose(first["classifier.weight"], other["classifier.weight"])


def test_stacked_epochs_are_the_distilled_loaders_batches(small) -> None:
    """Network k's index batches are DistilledDataModule(seed=seeds[k])'s, epoch after epoch."""
    synthetic = _two_classes(small, ipc=5)
    seeds = [2, 7, 1002]
    epochs = list(StackedEpochs(10, 4, seeds, epochs=5, epochs_per_step=2))
    assert len(epochs) == 3 and [len(step) for step in epochs] == [6, 6, 3]
    steps = [index for step in epochs for _, index in step]
    for k, seed in enumerate(seeds):
        loader = DistilledDataModule(synthetic, batch_size=4, seed=seed).train_dataloader()
        theirs = [x for _ in range(5) for x, _ in loader]
        assert len(theirs) == len(steps)
        for index, images in zip(steps, theirs, strict=True):
            assert torch.equal(synthetic.images[index[k]], images)
    assert not torch.equal(steps[0][0], steps[0][1]), "every network has its own order"


@pytest.mark.parametrize("arch, channels, size", [
    ("ConvNet", 1, 28), ("ConvNetD4", 3, 64), ("MLP", 1, 28), ("LeNet", 1, 28),
    ("AlexNet", 3, 32), ("VGG11", 3, 32), ("ResNet18", 3, 16),
])
def test_architectures_without_batchnorm_stack(arch: str, channels: int, size: int) -> None:
    """The vmapped forward and backward of every stackable network give each network its own
    logits and gradients (in float64, so that float32 rounding, e.g. a ReLU input within
    rounding of 0, cannot hide a real difference)."""
    assert stackable(arch, channels, 3, size)
    seeds = [0, 5]
    x = torch.randn(2, 2, channels, size, size, generator=torch.Generator().manual_seed(1)).double()
    y = torch.tensor([[0, 2], [1, 1]])
    stacked = StackedClassifier(arch, channels, 3, size, seeds, x[0], y[0]).double()
    logits = stacked(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").backward()
    grads = dict(zip(stacked._names, (p.grad for p in stacked.weights), strict=True))
    for k, seed in enumerate(seeds):
        net = reset_parameters(get_network(arch, channels, 3, size),
                               torch.Generator().manual_seed(seed)).double()
        out = net(x[k])
        torch.testing.assert_close(logits[k], out)
        torch.nn.functional.cross_entropy(out, y[k], reduction="sum").backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name][k], p.grad, atol=1e-9, rtol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_batchnorm_networks_are_not_stacked(small, monkeypatch) -> None:
    """ConvNetBN cannot stack: StackedClassifier refuses it and evaluate(stack=2) trains its
    networks one by one (the same accuracies as stack=0)."""
    assert not stackable("ConvNetBN", 1, 10, 28) and not stackable("ResNet18BN", 3, 10, 32)
    with pytest.raises(ValueError, match="BatchNorm"):
        StackedClassifier("ConvNetBN", 1, 10, 28, [0], torch.zeros(2, 1, 28, 28), torch.zeros(2).long())
    synthetic = random_real_set(small, ipc=1, seed=1)
    kwargs = {"archs": ["ConvNetBN"], "runs": 2, "epochs": 1, "dsa": "none", "baseline": False,
              "progress": False, "accelerator": "cpu"}
    one_by_one = evaluate(synthetic, small, **kwargs)
    monkeypatch.setattr(evaluation, "StackedClassifier", None)  # any stacking would fail
    stacked = evaluate(synthetic, small, stack=2, **kwargs)
    assert stacked.to_json() == one_by_one.to_json()


def test_evaluate_stacked_equals_sequential_whatever_the_ranks(small, monkeypatch) -> None:
    """evaluate(stack=2) reports the accuracies of evaluate(stack=0), the baseline's networks
    each on its own draw; with 2 ranks (each stacking its own networks) the merged report is
    the same again."""
    synthetic = random_real_set(small, ipc=2, seed=1)
    synthetic.method = "DM"
    kwargs = {"archs": ["ConvNetD1"], "runs": 3, "epochs": 2, "progress": False,
              "accelerator": "cpu"}
    sequential = evaluate(synthetic, small, **kwargs)
    stacked = evaluate(synthetic, small, stack=2, **kwargs)
    assert stacked.to_json() == sequential.to_json()
    accuracies = sequential.get("DM (IPC 2)", "ConvNetD1").accuracies
    assert len(set(accuracies)) > 1, "the networks differ"

    parts: dict[int, dict[int, float]] = {}

    def gather(local: dict[int, float], world_size: int) -> dict[int, float]:
        parts[len(parts)] = dict(local)
        merged = {j: -1.0 for j in range(6)}
        for part in parts.values():
            merged.update(part)
        return merged

    monkeypatch.setattr(evaluation, "_all_gather_accuracies", gather)
    evaluate(synthetic, small, stack=2, rank=1, world_size=2, **kwargs)
    assert sorted(parts[0]) == [1, 3, 5]
    two_ranks = evaluate(synthetic, small, stack=2, rank=0, world_size=2, **kwargs)
    assert sorted(parts[1]) == [0, 2, 4]
    assert two_ranks.to_json() == sequential.to_json()


@pytest.mark.parametrize("protocol", ["glad", "standard"])
def test_only_the_standard_protocol_stacks(small, monkeypatch, protocol: str) -> None:
    """glad keeps one network per Trainer; standard stacks consecutive runs of one (arch, set)
    in groups of at most ``stack``."""
    single, stacks = [], []
    monkeypatch.setattr(evaluation, "train_and_test",
                        lambda data, real, arch, **kw: single.append(kw["seed"]) or 0.5)
    monkeypatch.setattr(evaluation, "train_and_test_stacked",
                        lambda datas, real, arch, **kw: stacks.append(kw["seeds"]) or
                        [0.5] * len(kw["seeds"]))
    synthetic = random_real_set(small, ipc=1, seed=1)
    evaluate(synthetic, small, archs=["ConvNet", "MLP"], runs=5, epochs=1, stack=3,
             protocol=protocol, progress=False)
    if protocol == "glad":
        assert stacks == [] and len(single) == 20
    else:  # per arch: baseline runs 0-2, 3-4, then the set's
        assert single == [] and stacks == [[0, 1, 2], [3, 4]] * 4
    with pytest.raises(ValueError, match="stack"):
        evaluate(synthetic, small, runs=1, epochs=1, stack=-1)
