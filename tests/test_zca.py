"""ZCA whitening (``--data.zca true``): what is whitened, and that whitened sets, buffers and
data are only ever combined with equally whitened ones."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import cpu_trainer
from ld3m.datamodules import FashionMNIST, ImageFolderData
from ld3m.modules import DM, MTT
from PIL import Image
from test_mtt import write_buffer

from ld3m.evaluation import evaluate, random_real_set, train_and_test
from ld3m.synthetic import SyntheticSet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def whitened(data_dir: Path) -> FashionMNIST:
    data = FashionMNIST(data_dir=str(data_dir), zca=True, batch_per_class=4)
    data.setup("fit")
    return data


def _mean_abs_correlation(images: torch.Tensor) -> float:
    x = images.flatten(1).double()
    x = x - x.mean(0)
    std = x.std(0)
    keep = std > 1e-6
    corr = torch.corrcoef(x[:, keep].T)
    off = corr - torch.diag(torch.diag(corr))
    return float(off.abs().sum() / (off.numel() - len(corr)))


def test_zca_decorrelates_the_pixels(whitened: FashionMNIST, fmnist: FashionMNIST) -> None:
    index = torch.arange(0, 60000, 12)
    raw = _mean_abs_correlation(fmnist.train_split.images(index, fmnist))
    white = _mean_abs_correlation(whitened.train_split.images(index, whitened))
    assert raw > 0.15 and white < 0.05, (raw, white)  # measured: 0.21 and 0.016


def test_every_loader_serves_the_same_whitening(whitened: FashionMNIST, fmnist: FashionMNIST) -> None:
    index = torch.tensor([0, 5, 17])
    direct = whitened.train_split.images(index, whitened)
    dataset = whitened.train_split.dataset(whitened)
    assert torch.allclose(torch.stack([dataset[int(i)][0] for i in index]), direct, atol=1e-5)
    # the test set goes through the training split's matrix (not one fitted on the test set)
    test_white = next(iter(whitened.test_dataloader()))[0][:3]
    test_plain = next(iter(fmnist.test_dataloader()))[0][:3]
    assert torch.allclose(test_white, whitened.whiten(fmnist.denormalize(test_plain)), atol=1e-5)
    assert not torch.allclose(test_white, test_plain, atol=1e-2)
    # class-balanced batches and the random-real baseline are whitened too
    images, _ = next(iter(whitened.train_dataloader()))
    assert images.flatten(2).mean(-1).abs().max() < 1.0  # whitened: near zero mean per image
    assert random_real_set(whitened, 1).meta["zca"] == {"eps": 0.1, "input": "pixels"}


def test_zca_whitens_the_raw_pixels_as_mtt_and_datm(whitened: FashionMNIST) -> None:
    """Their code: ``ToTensor()`` only (no Normalize) when ``--zca``, then kornia's
    ``ZCAWhitening(eps=0.1)`` fitted on the whole training split; nothing normalises after."""
    from kornia.enhance import ZCAWhitening

    raw = whitened.train_split.cached.float() / 255  # the [0, 1] pixels, as ToTensor gives them
    theirs = ZCAWhitening(eps=0.1).fit(raw)
    index = torch.tensor([0, 1, 59999])
    ours = whitened.train_split.images(index, whitened)
    assert torch.allclose(ours, theirs(raw[index]), atol=1e-4)
    assert (whitened.mean, whitened.std) == ((0.0,), (1.0,))  # no normalisation either side
    test_raw = whitened._test_split().cached[:4].float() / 255
    served = next(iter(whitened.test_dataloader()))[0][:4]
    assert torch.allclose(served, theirs(test_raw), atol=1e-4)
    # ld3m's earlier transform (whitening the normalised images) is a different one
    normalised = (raw - 0.2860) / 0.3530
    assert not torch.allclose(ZCAWhitening(eps=0.1).fit(normalised)(normalised[index]), ours,
                              atol=1e-2)


def test_a_record_of_the_earlier_whitening_is_refused(
        tmp_path: Path, whitened: FashionMNIST) -> None:
    old = {"eps": 0.1}  # what sets and buffers whitened after the normalisation recorded
    synthetic = random_real_set(whitened, 1)
    synthetic.meta["zca"] = old
    with pytest.raises(ValueError, match="after the mean/std normalisation.*make it again"):
        train_and_test(synthetic, whitened, epochs=1, accelerator="cpu")
    buffer = write_buffer(tmp_path / "buffer", shape=(1, 28, 28), classes=10,
                          dataset="FashionMNIST", zca=old)
    model = MTT(str(buffer), ipc=1, syn_steps=2, max_start_epoch=2)
    with pytest.raises(ValueError, match="after the mean/std normalisation"):
        cpu_trainer(tmp_path, max_steps=1).fit(model, whitened)


def test_zca_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="zca_eps"):
        FashionMNIST(data_dir=str(tmp_path), zca=True, zca_eps=0.0)
    for c in ("a", "b"):
        folder = tmp_path / "folder" / "train" / c
        folder.mkdir(parents=True)
        Image.new("RGB", (80, 80), color=(10, 20, 30)).save(folder / "0.png")
    big = ImageFolderData(str(tmp_path / "folder"), image_size=80, zca=True, num_workers=0)
    with pytest.raises(ValueError, match="ZCA whitening of 3x80x80 images"):
        big.sample_per_class(1)


def test_a_whitened_set_remembers_it_and_refuses_unwhitened_data(
        tmp_path: Path, whitened: FashionMNIST, fmnist: FashionMNIST) -> None:
    model = DM(ipc=1, seed=0)
    cpu_trainer(tmp_path, max_steps=1).fit(model, whitened)
    path = model.synthetic_set().save(tmp_path / "zca.safetensors")
    synthetic = SyntheticSet.load(path)
    assert synthetic.meta["zca"] == {"eps": 0.1, "input": "pixels"}
    with pytest.raises(ValueError, match="ZCA-whitened .* not whitened"):
        train_and_test(synthetic, fmnist, epochs=1, accelerator="cpu")
    plain = random_real_set(fmnist, 1)
    with pytest.raises(ValueError, match="not whitened .* ZCA-whitened"):
        evaluate(plain, whitened, runs=1, epochs=1, accelerator="cpu")


def test_ld3m_evaluate_whitens_the_real_data_of_a_whitened_set(
        tmp_path: Path, whitened: FashionMNIST, data_dir: Path, capsys) -> None:
    from ld3m.cli import main

    path = random_real_set(whitened, 1).save(tmp_path / "white.safetensors")
    main(["evaluate", "--distilled", str(path), "--data_dir", str(data_dir), "--runs", "1",
          "--epochs", "2", "--archs", "ConvNetW32", "--baseline", "false", "--dsa", "none",
          "--accelerator", "cpu"])
    assert "random (IPC 1)" in capsys.readouterr().out


def test_mtt_refuses_a_buffer_whitened_differently(tmp_path: Path, whitened: FashionMNIST) -> None:
    buffer = write_buffer(tmp_path / "buffer", shape=(1, 28, 28), classes=10,
                          dataset="FashionMNIST")  # an unwhitened buffer
    model = MTT(str(buffer), ipc=1, syn_steps=2, max_start_epoch=2)
    with pytest.raises(ValueError, match="--data.zca false"):
        cpu_trainer(tmp_path, max_steps=1).fit(model, whitened)


def test_mtt_gets_step_indices_not_real_batches(tmp_path: Path, fmnist: FashionMNIST) -> None:
    buffer = write_buffer(tmp_path / "buffer", shape=(1, 28, 28), classes=10, dataset="FashionMNIST")
    model = MTT(str(buffer), ipc=1, syn_steps=2, max_start_epoch=2)
    fmnist.trainer = SimpleNamespace(global_rank=0, global_step=7, lightning_module=model)
    try:
        batches = iter(fmnist.train_dataloader())
        assert [int(next(batches)) for _ in range(3)] == [7, 8, 9]
        fmnist.trainer.lightning_module = DM(ipc=1)
        images, labels = fmnist.on_after_batch_transfer(next(iter(fmnist.train_dataloader())), 0)
        assert images.shape[:2] == labels.shape == (10, fmnist.batch_per_class)
    finally:
        fmnist.trainer = None
