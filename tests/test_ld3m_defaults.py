"""LD3M's defaults are the authors' scripts' (Brian-Moser/prune_and_distill, ``src/``): guidance
3.0, one lr for ``z`` and ``c`` per objective (DM 1, DC 0.1, MTT 1000), MTT's syn_steps 10,
max_start_epoch 2, lr_lr 1e-6, DC's outer = inner = 1 (the objectives by name, or given as the
method with these values), and fresh ``q_sample`` noise at every render (the fixed per-image
noise kept as ``noise="fixed"``).

On the tiny random generator and the 3-class 16x16 data of ``test_ld3m.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import cpu_trainer
from ld3m.modules import LD3M
from ld3m.modules.dc import DC
from ld3m.modules.ld3m import NOISE_MODES, PUBLISHED_LR, PUBLISHED_OBJECTIVES, rerender
from ld3m.modules.mtt import MTT
from test_generator import tiny_generator
from test_ld3m import TinyData

from ld3m.cli import main
from ld3m.generator import LatentGenerator
from ld3m.synthetic import SyntheticSet

pytestmark = pytest.mark.usefixtures("one_thread")

NET = "ConvNetW32"


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    tiny_generator().save_pretrained(folder)
    return folder


def _model(gen_dir: Path, **kwargs) -> LD3M:
    args = dict(generator=str(gen_dir), ipc=2, steps=2, network=NET, seed=3, num_classes=3,
                image_shape=(1, 16, 16))
    return LD3M(**{**args, **kwargs})


def _printed_model(capsys, *extra: str) -> dict:
    assert main(["fit", "--model", "LD3M", *extra, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]


# ---------------------------------------------------------------------------------- defaults
def test_print_config_shows_the_authors_settings(gen_dir: Path, capsys) -> None:
    """What ``ld3m fit --model LD3M --print_config`` shows: the scripts' values; the objective by
    name (``dm``: the authors' DM settings), the lrs ``null`` (the objective's ``lr_img``)."""
    args = _printed_model(capsys, "--model.generator", str(gen_dir))
    assert args["guidance"] == 3.0  # --unconditional_guidance_scale 3.0, distill_*_LD3M.py
    assert args["steps"] == 10  # --ddim_steps 10
    assert args["noise"] == "fresh" and args["objective"] == "dm" and args["momentum"] == 0.5
    assert args["lr_latent"] is None and args["lr_embedding"] is None
    # the authors' per-objective settings (distill_dc_LD3M.py, distill_mtt_LD3M.py)
    assert PUBLISHED_OBJECTIVES["dc"][1]["outer_loop"] == 1
    assert PUBLISHED_OBJECTIVES["dc"][1]["inner_loop"] == 1
    assert PUBLISHED_OBJECTIVES["dc"][1]["lr_net"] == 0.01
    mtt = PUBLISHED_OBJECTIVES["mtt"][1]
    assert (mtt["syn_steps"], mtt["max_start_epoch"], mtt["expert_epochs"]) == (10, 2, 2)
    assert (mtt["lr_lr"], mtt["lr_teacher"]) == (1e-6, 0.01)


def test_the_objective_is_the_method_with_its_own_flags(gen_dir: Path, capsys) -> None:
    """``--model.objective DC`` is the DC method, configured by its own flags (nested
    ``init_args``): LD3M does not re-list them."""
    args = _printed_model(capsys, "--model.generator", str(gen_dir), "--model.objective", "DC",
                          "--model.objective.outer_loop", "3", "--model.objective.lr_net", "0.02")
    objective = args["objective"]
    assert objective["class_path"] == "ld3m.modules.DC"
    assert (objective["init_args"]["outer_loop"], objective["init_args"]["lr_net"]) == (3, 0.02)
    assert objective["init_args"]["inner_loop"] is None  # DC's own default: by IPC
    for gone in ("outer_loop", "syn_steps", "buffer", "lr_lr", "mtt_gradient"):
        assert gone not in args
    assert main(["fit", "--model", "LD3M", "--help"]) == 0
    assert "--model.objective.help [CLASS_PATH_OR_NAME]" in capsys.readouterr().out
    assert main(["fit", "--model", "LD3M", "--model.objective.help", "MTT"]) == 0
    assert "--objective.syn_steps" in capsys.readouterr().out


def _cli_fit(root: Path, gen_dir: Path, *extra: str) -> dict:
    """One CLI step of LD3M on the tiny data; returns the checkpoint."""
    code = main(["fit", "--model", "LD3M", "--model.generator", str(gen_dir), "--model.ipc", "1",
                 "--model.steps", "2", "--model.network", NET, "--model.dsa", "none", *extra,
                 "--data", "test_ld3m.TinyData", "--data.data_dir", str(root / "data"),
                 "--data.batch_per_class", "4", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(root), "--evaluation.at_end", "false",
                 "--trainer.enable_progress_bar", "false"])
    assert code == 0
    (path,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("objective, lr", [("dm", 1.0), ("dc", 0.1), ("MTT", 1000.0)])
def test_the_objectives_published_lr_is_resolved_and_recorded(gen_dir: Path, tmp_path: Path,
                                                              objective: str, lr: float) -> None:
    """``lr_latent``/``lr_embedding`` left out: the objective's ``lr_img`` (the authors' ``--lr_w``)
    for both ``z`` and ``c``, in the hparams, the checkpoint and the optimizer that ran."""
    assert PUBLISHED_LR == {"dm": 1.0, "dc": 0.1, "mtt": 1000.0}
    extra = ["--model.objective", objective]
    if objective == "MTT":  # as the method, with the LD3M authors' MTT settings
        from test_mtt import write_buffer

        buffer = write_buffer(tmp_path / "buffer", shape=(1, 16, 16), epochs=3)
        extra += ["--model.objective.buffer", str(buffer), "--model.objective.gradient",
                  "recompute", "--model.objective.syn_steps", "10",
                  "--model.objective.max_start_epoch", "2", "--model.objective.expert_epochs",
                  "2", "--model.objective.lr_lr", "1e-6"]
    checkpoint = _cli_fit(tmp_path, gen_dir, *extra)
    hp = checkpoint["hyper_parameters"]
    assert (hp["lr_latent"], hp["lr_embedding"]) == (lr, lr)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups[:2]] == [lr, lr]  # z, then c
    if objective == "MTT":
        assert groups[2]["lr"] == 1e-6  # the student lr's SGD: the objective's lr_lr
        assert hp["objective"]["class_path"] == "ld3m.modules.mtt.MTT"
        assert (hp["objective"]["init_args"]["syn_steps"],
                hp["objective"]["init_args"]["max_start_epoch"]) == (10, 2)
    # an explicit lr still wins, per group
    model = _model(gen_dir, objective=objective.lower() if objective != "MTT" else
                   MTT(str(tmp_path / "buffer")), lr_embedding=0.5)
    assert (model.hparams.lr_latent, model.hparams.lr_embedding) == (lr, 0.5)


def test_dc_objective_draws_a_new_network_every_step_and_never_trains_it(
        gen_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """outer_loop = inner_loop = 1 (distill_dc_LD3M.py): at IPC 10, where pixel DC's defaults
    are (10, 50), every step matches on a new random network and none is trained."""
    drawn, trained = [], []
    new_network, train_network = DC.new_network, DC.train_network
    monkeypatch.setattr(DC, "new_network", lambda self, step: drawn.append(step) or
                        new_network(self, step))
    monkeypatch.setattr(DC, "train_network", lambda self, *a, **k: trained.append(a) or
                        train_network(self, *a, **k))
    model = LD3M(generator=str(gen_dir), ipc=10, objective="dc", steps=2, network=NET,
                 dsa="none")
    cpu_trainer(tmp_path, max_steps=3).fit(model, datamodule=TinyData(data_dir=str(tmp_path),
                                                                      batch_per_class=4))
    helper = model.objective_module()
    assert (helper.outer_loop, helper.inner_loop) == (1, 1)
    assert model.hparams.objective["init_args"]["outer_loop"] == 1
    assert drawn == [0, 1, 2] and trained == []
    # the method with DC's own defaults instead: the loops by LD3M's IPC (10: 10 and 50)
    pixel = LD3M(generator=str(gen_dir), ipc=10, objective=DC(ipc=1), steps=2, network=NET,
                 num_classes=3, image_shape=(1, 16, 16))
    assert (pixel.objective_module().outer_loop, pixel.objective_module().inner_loop) == (10, 50)


def test_a_checkpoint_rebuilds_the_objective(gen_dir: Path, tmp_path: Path) -> None:
    """The checkpoint records the objective as its class path and settings, and
    ``load_from_checkpoint`` builds the same method again."""
    checkpoint = _cli_fit(tmp_path, gen_dir, "--model.objective", "DC",
                          "--model.objective.outer_loop", "2")
    (path,) = tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    restored = LD3M.load_from_checkpoint(path, map_location="cpu")
    helper = restored.objective_module()
    assert type(helper) is DC and helper.outer_loop == 2 and helper.network == NET
    assert "generator" not in helper.hparams  # its own settings, not LD3M's
    assert checkpoint["hyper_parameters"]["objective"]["init_args"]["network"] == NET


# ---------------------------------------------------------------------------------- noise
def test_fresh_noise_is_new_at_every_render_and_reproducible(gen_dir: Path) -> None:
    model = _model(gen_dir)
    assert model.noise_mode == "fresh"
    first, second = model.render(step=0).clone(), model.render(step=1).clone()
    assert not torch.allclose(first, second)  # same latents, other noise
    # the scored render and the chunked backward's re-render of a step draw their own
    assert not torch.equal(model.render_noise(1, 0), model.render_noise(1, 1))
    # the same seed and step give the same noise and images, in another module too
    twin = _model(gen_dir)
    torch.testing.assert_close(twin.render(step=1), second, rtol=0, atol=0)
    assert torch.equal(twin.render_noise(5, 1), model.render_noise(5, 1))
    assert not torch.equal(_model(gen_dir, seed=4).render_noise(1, 0), model.render_noise(1, 0))
    # the buffer holds the noise of the stored render: the images can be rendered again
    assert torch.equal(model.noise, model.render_noise(1, 0))
    gen = model.latent_generator()
    with torch.no_grad():
        again = gen.render(model.latents, model.embeddings, 2, guidance=3.0, noise=model.noise)
    torch.testing.assert_close(again, second)


def test_step_and_fixed_noise(gen_dir: Path) -> None:
    step = _model(gen_dir, noise="step")
    assert torch.equal(step.render_noise(4, 0), step.render_noise(4, 1))
    assert not torch.equal(step.render_noise(4, 0), step.render_noise(5, 0))
    fixed = _model(gen_dir, noise="fixed")
    initial = fixed.noise.clone()
    torch.testing.assert_close(fixed.render(step=0), fixed.render(step=7), rtol=0, atol=0)
    assert torch.equal(fixed.render_noise(3, 1), initial) and torch.equal(fixed.noise, initial)
    assert NOISE_MODES == ("fresh", "step", "fixed")
    with pytest.raises(ValueError, match="noise must be one of"):
        _model(gen_dir, noise="random")


def test_a_fit_renders_with_the_noise_of_each_step(gen_dir: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    """Through a fit: every step's scored render and its backward use ``render_noise(step, 0)``
    and ``render_noise(step, 1)``; the export records the noise of its render and re-renders."""
    seen: list[tuple[str, torch.Tensor]] = []
    render, backward = LatentGenerator.render, LatentGenerator.backward_in_chunks

    def spy_render(self, z, c, steps, *args, noise=None, **kwargs):
        seen.append(("render", noise.clone()))
        return render(self, z, c, steps, *args, noise=noise, **kwargs)

    def spy_backward(self, z, c, grad, steps, chunk, *, noise, **kwargs):
        seen.append(("backward", noise.clone()))
        # the re-render inside is not a scored render: hide it from the spy
        monkeypatch.setattr(LatentGenerator, "render", render)
        try:
            return backward(self, z, c, grad, steps, chunk, noise=noise, **kwargs)
        finally:
            monkeypatch.setattr(LatentGenerator, "render", spy_render)

    monkeypatch.setattr(LatentGenerator, "render", spy_render)
    monkeypatch.setattr(LatentGenerator, "backward_in_chunks", spy_backward)
    model = LD3M(generator=str(gen_dir), ipc=1, steps=2, network=NET, dsa="none", chunk_size=2,
                 seed=5)
    cpu_trainer(tmp_path, max_steps=2).fit(model, datamodule=TinyData(data_dir=str(tmp_path),
                                                                      batch_per_class=4))
    s = model.synthetic_set()
    monkeypatch.setattr(LatentGenerator, "render", render)
    reference = LD3M(generator=str(gen_dir), ipc=1, steps=2, network=NET, seed=5,
                     num_classes=3, image_shape=(1, 16, 16))
    expected = [("render", reference.render_noise(0, 0)), ("backward", reference.render_noise(0, 1)),
                ("render", reference.render_noise(1, 0)), ("backward", reference.render_noise(1, 1)),
                ("render", reference.render_noise(2, 0))]  # the export, after 2 steps
    assert [kind for kind, _ in seen] == [kind for kind, _ in expected]
    for (_, got), (_, want) in zip(seen, expected, strict=True):
        assert torch.equal(got, want)
    assert s.meta["ld3m"]["noise"] == "fresh"
    assert torch.equal(s.extra["noise"], reference.render_noise(2, 0))
    again = rerender(SyntheticSet.load(s.save(tmp_path / "set.safetensors")))
    torch.testing.assert_close(again.images, s.images, rtol=1e-5, atol=1e-5)
