"""LD3M (``ld3m.modules.LD3M``) on a tiny random generator and tiny synthetic real data.

The generator is ``tiny_generator()`` of ``test_generator.py`` (3 classes of 1x16x16 images,
4x8x8 latents) saved to ``tmp_path``; the real data is a 3-class 16x16 data module built here
(Fashion-MNIST is 28x28, which the tiny generator does not render). The 2-process DDP run of
LD3M is in ``test_ddp.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import cpu_trainer
from ld3m.datamodules.real import RealDataModule
from ld3m.modules import DC, DQ, LD3M, MTT
from ld3m.modules.ld3m import rerender
from test_generator import tiny_generator

from ld3m.generator import LatentGenerator
from ld3m.synthetic import SyntheticSet

NET = "ConvNetW32"
STEPS = 3


class TinyData(RealDataModule):
    """3 classes of 1x16x16 uint8 images: a class pattern plus noise, 12 per class."""

    dataset_name = "Tiny"
    num_classes = 3
    image_shape = (1, 16, 16)
    mean = (0.2860,)
    std = (0.3530,)

    def _dataset(self, train: bool, transform):
        g = torch.Generator().manual_seed(0 if train else 1)
        labels = torch.arange(3).repeat_interleave(12)
        pattern = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(7))
        images = pattern[labels] * 180 + torch.rand(len(labels), 1, 16, 16, generator=g) * 75
        return SimpleNamespace(data=images.to(torch.uint8), targets=labels)

    @staticmethod
    def _tensors(dataset):
        return dataset.data, dataset.targets


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    tiny_generator().save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path: Path) -> TinyData:
    dm = TinyData(data_dir=str(tmp_path), batch_per_class=4)
    dm.setup("fit")
    return dm


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(gen_dir: Path, **kwargs) -> LD3M:
    args = dict(generator=str(gen_dir), ipc=2, steps=STEPS, chunk_size=2, network=NET, seed=3)
    return LD3M(**{**args, **kwargs})


class _Initial(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.z = pl_module.latents.detach().clone()
        self.c = pl_module.embeddings.detach().clone()


# ---------------------------------------------------------------------------------- arguments
def test_bad_arguments(gen_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="objective"):
        _model(gen_dir, objective="gm")
    with pytest.raises(ValueError, match="steps"):
        _model(gen_dir, steps=0)
    with pytest.raises(ValueError, match="chunk_size"):
        _model(gen_dir, chunk_size=0)
    with pytest.raises(ValueError, match="needs a buffer .*--model.objective MTT "
                                         "--model.objective.buffer DIR"):
        _model(gen_dir, objective="mtt")
    with pytest.raises(ValueError, match="a DM, DC .* or MTT .* method, got 'DQ'"):
        _model(gen_dir, objective=DQ())
    with pytest.raises(ValueError, match="outer_loop"):  # the method's own checks
        _model(gen_dir, objective=DC(outer_loop=0))
    with pytest.raises(ValueError, match="lr_latent"):
        _model(gen_dir, lr_latent=0.0)
    with pytest.raises(ValueError, match="network"):
        _model(gen_dir, network="NoSuchNet")
    with pytest.raises(FileNotFoundError, match="generator folder"):
        _model(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"renders images of \(1, 16, 16\), but the data's are "
                                         r"\(1, 8, 8\) \(resize"):
        _model(gen_dir, num_classes=3, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="takes 1-channel images: give it data with 1 channels"):
        _model(gen_dir, num_classes=3, image_shape=(3, 16, 16))
    with pytest.raises(ValueError, match="class_map gives 2 generator labels but the data has 3"):
        _model(gen_dir, num_classes=3, image_shape=(1, 16, 16), class_map=[0, 1])
    no_null = tmp_path / "no_null"
    tiny_generator(null=False).save_pretrained(no_null)
    with pytest.raises(ValueError, match="null class"):
        _model(no_null, guidance=2.0, num_classes=3, image_shape=(1, 16, 16))


# ---------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("objective", ["dm", "dc"])
def test_chunked_gradient_equals_full_graph(gen_dir: Path, data: TinyData, objective: str):
    """The render-without-graph + chunked backward gives the gradient of one full-graph render
    (with the same noise in both: ``noise="fixed"``; ``fresh`` re-renders with other noise, as the
    authors')."""
    model = _model(gen_dir, num_classes=3, image_shape=(1, 16, 16), chunk_size=4,
                   objective=objective, noise="fixed")
    model.initialise(data)
    real = data.sample_per_class(4, torch.Generator().manual_seed(1))
    gen = model.latent_generator()

    images = gen.render(model.latents, model.embeddings, STEPS, noise=model.noise,
                        guidance=model.guidance)
    full = model.objective_loss(images, real, 0, torch.Generator().manual_seed(5))
    full.backward()
    z_full, c_full = model.latents.grad.clone(), model.embeddings.grad.clone()
    model.latents.grad = model.embeddings.grad = None

    x = model.render().requires_grad_()
    torch.testing.assert_close(x.detach(), images.detach(), rtol=1e-5, atol=1e-5)
    loss = model.objective_loss(x, real, 0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, full.detach())
    (image_grad,) = torch.autograd.grad(loss, x)
    z_grad, c_grad = model.backward_images(image_grad)  # 6 images in chunks of 4 and 2
    assert z_full.abs().sum() > 0 and c_full.abs().sum() > 0
    # float32 rounding only: within 1e-4 of the largest entry (and far from a mere correlation)
    z_tol, c_tol = 1e-4 * z_full.abs().max().item(), 1e-4 * c_full.abs().max().item()
    torch.testing.assert_close(model.latents.grad, z_full, rtol=1e-4, atol=z_tol)
    torch.testing.assert_close(model.embeddings.grad, c_full, rtol=1e-4, atol=c_tol)
    torch.testing.assert_close(z_grad, z_full, rtol=1e-4, atol=z_tol)


def test_dm_loss_decreases_on_a_fixed_batch(gen_dir: Path, data: TinyData):
    model = _model(gen_dir, num_classes=3, image_shape=(1, 16, 16), lr_latent=0.05,
                   lr_embedding=0.05, dsa="none", noise="fixed")
    model.initialise(data)
    real = data.sample_per_class(8, torch.Generator().manual_seed(1))
    opt = model.configure_optimizers()
    losses = []
    for _ in range(4):
        x = model.render().requires_grad_()
        loss = model.objective_loss(x, real, 0, torch.Generator().manual_seed(5))
        (image_grad,) = torch.autograd.grad(loss, x)
        opt.zero_grad()
        model.backward_images(image_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses


# ---------------------------------------------------------------------------------- fits
def test_fit_dm_updates_z_and_c_keeps_generator_frozen_and_exports(gen_dir: Path, data: TinyData,
                                                                    tmp_path: Path):
    model = _model(gen_dir, lr_latent=0.05, lr_embedding=0.05)
    initial = _Initial()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[initial])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2

    # gradients reached z and c: both moved, and stay finite
    assert torch.isfinite(model.latents).all() and torch.isfinite(model.embeddings).all()
    assert not torch.allclose(model.latents, initial.z)
    assert not torch.allclose(model.embeddings, initial.c)
    # z started as the encodings of the seed's real images, c as the classes' table rows
    fresh = LatentGenerator.from_pretrained(gen_dir)
    real = data.sample_per_class(2, torch.Generator().manual_seed(3)).flatten(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(initial.z, fresh.encode(real))
    torch.testing.assert_close(initial.c, fresh.class_embedding(model.labels))

    # the generator is frozen, unchanged, and absent from the state dict and the checkpoint
    used = model.latent_generator()
    assert all(not p.requires_grad for p in used.parameters())
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(used.state_dict()[key], value, rtol=0, atol=0)
    keys = set(model.state_dict())
    assert keys == {"latents", "embeddings", "noise", "images", "labels", "generator_labels"}
    ckpt = tmp_path / "ld3m.ckpt"
    trainer.save_checkpoint(ckpt)
    assert set(torch.load(ckpt, weights_only=False)["state_dict"]) == keys

    # export: the decoded images of the current latents, plus what re-renders them
    s = model.synthetic_set()
    expected = model.render()
    torch.testing.assert_close(s.images, expected)
    assert (s.method, s.ipc, s.num_classes) == ("LD3M", 2, 3)
    assert s.meta["ld3m"]["steps"] == STEPS
    path = s.save(tmp_path / "set.safetensors")
    loaded = SyntheticSet.load(path)
    again = rerender(loaded)
    torch.testing.assert_close(again.images, s.images, rtol=1e-5, atol=1e-5)
    other = rerender(loaded, steps=STEPS + 2)
    assert other.meta["ld3m"]["steps"] == STEPS + 2
    assert other.images.shape == s.images.shape and not torch.allclose(other.images, s.images)
    with pytest.raises(ValueError, match="not an LD3M set"):
        rerender(SyntheticSet(images=s.images, labels=s.labels, mean=s.mean, std=s.std,
                              num_classes=3, method="DM", dataset="Tiny", ipc=2))

    # resuming from the checkpoint restores the latents into a fresh module
    restored = LD3M.load_from_checkpoint(ckpt)
    torch.testing.assert_close(restored.latents, model.latents)
    torch.testing.assert_close(restored.synthetic_images(), s.images)


def test_fit_dc_objective(gen_dir: Path, data: TinyData, tmp_path: Path):
    model = _model(gen_dir, objective=DC(outer_loop=2, inner_loop=1), dsa="none")
    initial = _Initial()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[initial])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert torch.isfinite(model.latents).all()
    assert not torch.allclose(model.latents, initial.z)
    assert not torch.allclose(model.embeddings, initial.c)


def test_fit_bf16_mixed(gen_dir: Path, data: TinyData, tmp_path: Path):
    model = _model(gen_dir)
    initial = _Initial()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[initial], precision="bf16-mixed")
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert model.latents.dtype == torch.float32
    assert torch.isfinite(model.latents).all() and torch.isfinite(model.embeddings).all()
    assert not torch.allclose(model.latents, initial.z)
    assert torch.isfinite(model.synthetic_images()).all()


def test_fit_mtt_objective(gen_dir: Path, data: TinyData, tmp_path: Path):
    from test_mtt import write_buffer

    buffer = write_buffer(tmp_path / "buffer", shape=(1, 16, 16), epochs=3)
    model = _model(gen_dir, objective=MTT(str(buffer), syn_steps=2, expert_epochs=1,
                                          max_start_epoch=2, lr_lr=1e-3, gradient="recompute"),
                   dsa="none")
    initial = _Initial()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[initial])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert not torch.allclose(model.latents, initial.z)
    assert not torch.allclose(model.embeddings, initial.c)
    assert model.syn_lr.item() != pytest.approx(0.01, abs=1e-9)  # the student lr is learned
    assert "syn_lr" in model.state_dict()
    s = model.synthetic_set()
    assert s.lr is not None and s.lr.item() == pytest.approx(model.syn_lr.item())

    too_short = _model(gen_dir, objective=MTT(str(buffer), max_start_epoch=5))
    with pytest.raises(ValueError, match="epochs"):
        cpu_trainer(tmp_path, max_steps=1).fit(too_short, datamodule=data)


def test_mtt_objective_trains_the_buffers_network(gen_dir: Path, data: TinyData, tmp_path: Path):
    """``mtt`` trains the experts' network: another ``network`` is refused, not ignored, and
    leaving it out takes the buffer's."""
    from test_mtt import write_buffer

    buffer = write_buffer(tmp_path / "buffer", shape=(1, 16, 16), epochs=3)  # ConvNetW32 experts
    mtt = dict(objective=MTT(str(buffer), syn_steps=1, expert_epochs=1, max_start_epoch=2,
                             gradient="recompute"), dsa="none")
    with pytest.raises(ValueError, match="holds ConvNetW32 experts, not ConvNet"):
        cpu_trainer(tmp_path, max_steps=1).fit(_model(gen_dir, **mtt, network="ConvNet"),
                                               datamodule=data)
    model = _model(gen_dir, **mtt, network=None)
    cpu_trainer(tmp_path, max_steps=1).fit(model, datamodule=data)
    assert model.global_step == 1



@pytest.mark.parametrize("objective", ["dm", "mtt"])
def test_one_full_graph_render_trains_like_the_chunked_backward(gen_dir: Path,
                                                                tmp_path: Path, objective: str):
    """``chunk_size=None`` (one render with the graph) and the chunked backward take the same
    steps: the latents, embeddings and (mtt) student lr agree after a short fit (with one noise
    per step, ``noise="step"``: ``fresh`` gives the chunked backward's re-render its own)."""
    extra = {}
    if objective == "mtt":
        from test_mtt import write_buffer

        buffer = write_buffer(tmp_path / "buffer", shape=(1, 16, 16), epochs=3)
        extra = dict(objective=MTT(str(buffer), syn_steps=2, expert_epochs=1, max_start_epoch=2,
                                   lr_lr=1e-3, gradient="unroll"), dsa="none")
    fitted = []
    for chunk_size in (4, None):
        model = _model(gen_dir, **{"objective": objective, **extra}, chunk_size=chunk_size,
                       lr_latent=0.05, lr_embedding=0.05, noise="step")
        initial = _Initial()
        cpu_trainer(tmp_path / str(chunk_size), max_steps=3, callbacks=[initial]).fit(
            model, datamodule=TinyData(data_dir=str(tmp_path), batch_per_class=4))
        assert not torch.allclose(model.latents, initial.z)
        fitted.append(model)
    chunked, full = fitted
    torch.testing.assert_close(full.latents, chunked.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.embeddings, chunked.embeddings, rtol=1e-4, atol=1e-5)
    if objective == "mtt":
        torch.testing.assert_close(full.syn_lr, chunked.syn_lr, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="chunk_size"):
        _model(gen_dir, chunk_size=-1)


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_recipes_parse_through_the_cli(gen_dir: Path, ipc: int, capsys):
    """The Fashion-MNIST recipes: DM's objective and schedule, T = 10, one graph, evaluated on
    the four architectures (the generator folder is overridden: it is built by ld3m prior)."""
    import yaml

    from ld3m.cli import main

    path = Path(__file__).parent.parent / "ld3m" / "configs" / f"ld3m_fashionmnist_ipc{ipc}.yaml"
    recipe = yaml.safe_load(path.read_text())
    args = recipe["model"]["init_args"]
    assert recipe["model"]["class_path"] == "ld3m.modules.LD3M"
    assert (args["ipc"], args["objective"], args["steps"], args["skip"]) == (ipc, "dm", 10, True)
    # the authors' distill_dm_LD3M.py / shared_args.py: guidance 3, lr_w 1, 10,000 iterations
    assert (args["guidance"], args["lr_latent"], args["lr_embedding"], args["noise"]) == (
        3.0, 1.0, 1.0, "fresh")
    assert recipe["trainer"]["max_steps"] == 10000
    assert recipe["evaluation"]["archs"].split(",") == ["ConvNet", "AlexNet", "VGG11", "ResNet18"]
    assert main(["fit", "--config", str(path), "--model.init_args.generator", str(gen_dir),
                 "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "class_path: ld3m.modules.LD3M" in out and "chunk_size: null" in out
