"""``protocol="glad"``: GLaD's and LD3M's evaluation, as ``evaluate_synset`` in ``src/utils.py``
of Brian-Moser/prune_and_distill (lr 0.001, VGG-11 0.0001, E epochs of a linear warm-up then a
cosine, an EMA of the weights, 0.995, tested)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import error_line
from ld3m.datamodules import MNIST, DistilledDataModule
from test_data import _write_tiny_mnist

import ld3m.evaluation as evaluation
from ld3m.cli import main
from ld3m.evaluation import (
    GladClassifier,
    ema_decay,
    ema_update,
    evaluate,
    glad_arch_lr,
    glad_lr,
    random_real_set,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path: Path) -> MNIST:
    """A 10-class MNIST of 3 training and 1 test image per class, in its IDX layout."""
    _write_tiny_mnist(tmp_path)
    dm = MNIST(data_dir=str(tmp_path), batch_per_class=1)
    dm.setup("fit")
    return dm


def _their_lrs(epochs: int, lr: float) -> list[float]:
    """The lr of every epoch of their loop, with torch's schedulers built and stepped as theirs."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9,
                                weight_decay=0.0005)
    sched1 = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.0000001, end_factor=1.0,
                                               total_iters=epochs // 2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs // 2, 1))
    sched, used = sched1, []
    for ep in range(epochs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
        if ep == epochs // 2:
            sched = sched2
    return used


@pytest.mark.parametrize("epochs", [1, 2, 3, 10, 11, 1000])
def test_glad_lr_is_their_warm_up_then_cosine(epochs: int) -> None:
    theirs = _their_lrs(epochs, 0.001)
    ours = [glad_lr(ep, epochs, 0.001) for ep in range(epochs)]
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-12)
    if epochs == 1000:
        assert ours[0] == pytest.approx(1e-10)  # 1e-7 x lr
        assert ours[250] == pytest.approx(0.001 * (1e-7 + (1 - 1e-7) * 0.5))
        assert ours[500] == ours[501] == pytest.approx(0.001)  # the peak, then the cosine
        assert ours[751] == pytest.approx(0.0005)
        assert ours[-1] == pytest.approx(0.001 * (1 + math.cos(math.pi * 498 / 500)) / 2)
    with pytest.raises(ValueError, match="epoch"):
        glad_lr(epochs, epochs, 0.001)


def test_their_lr_per_network() -> None:
    assert glad_arch_lr("VGG11") == 1e-4 and glad_arch_lr("vgg11bn") == 1e-4
    assert {glad_arch_lr(a) for a in ("ConvNet", "AlexNet", "ResNet18", "ConvNetD5")} == {1e-3}


def test_ema_decay_is_ema_pytorchs_with_beta_0995() -> None:
    """``EMA(net, beta=0.995, power=1, update_after_step=0, update_every=1)``: the first update
    copies, the k-th averages with min(0.995, 1 - 1/k)."""
    assert ema_decay(1) == 0.0
    assert ema_decay(2) == 0.5 and ema_decay(3) == pytest.approx(2 / 3)
    assert ema_decay(100) == pytest.approx(0.99)
    assert ema_decay(200) == pytest.approx(0.995) and ema_decay(201) == 0.995
    assert ema_decay(1000) == 0.995
    a, b = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    with torch.no_grad():
        b.weight.fill_(3.0)
        b.running_mean.fill_(2.0)
    b.num_batches_tracked.fill_(7)
    ema_update(a, b, 0.995)
    assert a.weight.tolist() == pytest.approx([0.995 + 0.005 * 3.0] * 2)
    assert a.running_mean.tolist() == pytest.approx([0.005 * 2.0] * 2)  # float buffers too
    assert int(a.num_batches_tracked) == 0  # integer buffers are left alone


class _Record(L.Callback):
    """The lr of every training batch and the network's weights at the end of every epoch
    (callbacks run before the module's ``on_train_epoch_end``, i.e. before the EMA update)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.snapshots.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def test_glad_classifier_trains_E_epochs_with_the_schedule_and_tests_the_ema(tiny: MNIST) -> None:
    E = 6
    synthetic = random_real_set(tiny, ipc=3, seed=1)  # 30 images: batches of 16 -> 2 per epoch
    model = GladClassifier("ConvNetD1", 1, 10, 28, lr=0.01, epochs=E, dsa="none")
    record = _Record()
    trainer = L.Trainer(max_epochs=model.training_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record])
    data = DistilledDataModule(synthetic, batch_size=16, real=tiny)
    trainer.fit(model, datamodule=data)
    assert trainer.current_epoch == E and len(record.snapshots) == E
    assert record.lrs == pytest.approx([lr for lr in _their_lrs(E, 0.01) for _ in range(2)],
                                       rel=1e-6, abs=1e-12)
    # 6 updates (< 200): the EMA is the plain mean of the networks after every epoch
    for name, value in model.ema_net.state_dict().items():
        if value.is_floating_point():
            mean = torch.stack([s[name] for s in record.snapshots]).mean(0)
            torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.ema_net.classifier.weight, model.net.classifier.weight)
    # the tested network is the EMA's
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    images, labels = next(iter(tiny.test_dataloader()))
    model.ema_net.eval()
    with torch.no_grad():
        expected = (model.ema_net(images).argmax(1) == labels).float().mean().item()
    assert metrics["test_acc"] == pytest.approx(expected)


def test_evaluate_glad_uses_their_lrs_and_epochs(tiny: MNIST, monkeypatch) -> None:
    updates = []
    real_update = evaluation.ema_update
    monkeypatch.setattr(evaluation, "ema_update", lambda *a: updates.append(a[2]) or real_update(*a))
    synthetic = random_real_set(tiny, 1, seed=3)
    synthetic.method, synthetic.lr = "LD3M", torch.tensor(0.5)  # a learned lr is not theirs
    report = evaluate(synthetic, tiny, archs=["ConvNetD1", "VGG11"], runs=1, epochs=2,
                      protocol="glad", accelerator="cpu", progress=False)
    settings = report.settings
    assert settings["protocol"] == "glad" and settings["ema"] == 0.995
    assert settings["lr"] == {"ConvNetD1": 1e-3, "VGG11": 1e-4}
    assert settings["epochs"] == {"ConvNetD1": 2, "VGG11": 2}
    assert settings["dsa"] == "color_crop_cutout_flip_scale_rotate"
    assert updates == [0.0, 0.5] * 4  # 2 epochs x (set, baseline) x 2 networks
    default = evaluate(synthetic, tiny, archs=["ConvNetD1"], runs=1, epochs=1, accelerator="cpu",
                       progress=False)
    assert default.settings["protocol"] == "standard" and "ema" not in default.settings
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(synthetic, tiny, runs=1, epochs=1, protocol="gald")


def test_ld3m_evaluate_protocol_glad_end_to_end(tiny: MNIST, tmp_path: Path, capsys) -> None:
    synthetic = random_real_set(tiny, 1, seed=1)
    synthetic.method = "LD3M"
    path = synthetic.save(tmp_path / "set.safetensors")
    out = tmp_path / "report.json"
    code = main(["evaluate", "--distilled", str(path), "--data_dir", str(tiny.data_dir),
                 "--archs", "ConvNetD1", "--runs", "1", "--epochs", "1", "--protocol", "glad",
                 "--accelerator", "cpu", "--output", str(out)])
    assert code == 0
    assert "| LD3M (IPC 1) |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["protocol"] == "glad"
    assert report["settings"]["lr"] == {"ConvNetD1": 1e-3}
    assert {r["set"] for r in report["results"]} == {"random real (IPC 1)", "LD3M (IPC 1)"}
    assert all(0.0 <= r["mean"] <= 1.0 for r in report["results"])

    assert main(["evaluate", "--distilled", str(path), "--data_dir", str(tiny.data_dir),
                 "--runs", "1", "--epochs", "1", "--protocol", "cosine"]) == 2
    assert "protocol must be one of" in error_line(capsys)
