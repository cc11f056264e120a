"""Small helpers shared by the test modules (import with ``from helpers import ...``)."""

from __future__ import annotations

import struct
from pathlib import Path

import lightning as L
import torch


def cpu_trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    """A quiet single-CPU ``Trainer`` (no logger, bar, summary or checkpoints unless asked)."""
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    return L.Trainer(max_steps=max_steps, default_root_dir=str(root), callbacks=list(callbacks),
                     **settings)


def error_line(capsys) -> str:
    """The one ``error:`` line a command printed: the last line of stderr, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == lines[0], "the error line must be the last one"
    return lines[0]


def write_idx(path: Path, data: torch.Tensor) -> None:
    """An IDX file of unsigned bytes: magic 0x0000080N, N big-endian int32 sizes, the data."""
    header = struct.pack(">I", 0x0800 | data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.to(torch.uint8).contiguous().numpy().tobytes())


def write_fashion_mnist_slice(source, root: Path, train: int, test: int) -> Path:
    """The first ``train`` training and ``test`` test images of the set-up Fashion-MNIST data
    module ``source``, written as the four IDX files of ``root/FashionMNIST/raw``; returns
    ``root``. A smaller real dataset in its own on-disk format, for tests where the whole
    training set would be slow (e.g. in subprocesses)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, split, n in (("train", source.train_split, train),
                             ("t10k", source._test_split(), test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", split.cached[:n, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", split.labels[:n])
    return root


class SigintAt(L.Callback):
    """Send this process a SIGINT (a Ctrl-C) when ``global_step`` is ``step``, at the end of that
    step (``when="end"``) or between it and the next (``"start"`` of the next batch): the
    interruption lands at a known place, so a test can compare the resumed run with an
    uninterrupted one."""

    def __init__(self, step: int, when: str = "end") -> None:
        self.step, self.when = step, when

    def _send(self, trainer) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "end":
            self._send(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "start":
            self._send(trainer)


class Pace(L.Callback):
    """Sleep ``seconds`` after every step, so that a signal sent from outside lands mid-run."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)


def printed_recipe(name: str, capsys) -> dict:
    """The configuration ``ld3m fit --config NAME --print_config`` prints, parsed."""
    import yaml

    from ld3m.cli import main

    assert main(["fit", "--config", name, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def buffer_instruction(name: str) -> str:
    """The one ``ld3m buffer`` command in recipe ``name``'s header."""
    from ld3m.configs import recipe_path

    lines = [line for line in recipe_path(name).read_text().splitlines()
             if line.startswith("#") and "ld3m buffer" in line]
    assert len(lines) == 1, lines
    return lines[0]


def check_datm_recipe(name: str, theirs: dict, bounds: dict, data: str, arch: str,
                      capsys) -> tuple[dict, str]:
    """Assert that DATM recipe ``name`` prints the values of their config ``theirs`` (keys as
    in NUS-HPC-AI-Lab/DATM's configs and utils/cfg.py), that the module runs their schedule of
    start epochs (``bounds``: per IPC, the bound at iterations 0/500/1000/2000) and that the
    header's buffer command trains 100 GSAM experts with logits, whitened as the recipe.
    Returns the model's printed ``init_args`` and the buffer command."""
    import re

    from ld3m.modules import DATM

    from ld3m.augment import DEFAULT_STRATEGY

    config = printed_recipe(name, capsys)
    assert config["model"]["class_path"] == "ld3m.modules.DATM"
    assert config["data"]["class_path"] == f"ld3m.datamodules.{data}"
    model = config["model"]["init_args"]
    for key in ("syn_steps", "expert_epochs", "min_start_epoch", "max_start_epoch", "lr_img",
                "lr_lr", "lr_teacher", "lr_y", "batch_syn", "threshold"):
        assert model[key] == theirs[key], key
    ipc = int(name.rsplit("ipc", 1)[1])
    assert model["ipc"] == ipc and model["dsa"] == DEFAULT_STRATEGY  # utils/cfg.py dsa_strategy
    if theirs["Sequential_Generation"]:
        assert model["current_max_start_epoch"] == theirs["current_max_start_epoch"]
        assert model["expansion_end"] == theirs["expansion_end_epoch"]
    else:
        assert model["current_max_start_epoch"] is None
    settings = config["data"]["init_args"]
    assert (settings["zca"], settings["zca_eps"]) == (theirs["zca"], 0.1)
    assert config["trainer"]["max_steps"] == theirs["Iteration"]
    evaluation = config["evaluation"]
    assert (evaluation["every_n_steps"], evaluation["runs"], evaluation["batch_size"],
            evaluation["epochs"], evaluation["archs"], evaluation["keep_best"]) == (
        theirs["eval_it"], theirs["num_eval"], theirs["batch_train"], 1000, arch, True)
    # the start epochs the module runs with these values are theirs
    kept = {k: v for k, v in model.items() if k not in ("buffer", "num_classes", "image_shape")}
    datm = DATM(model["buffer"], **kept)
    schedules = datm.configure_callbacks()
    assert bool(schedules) == theirs["Sequential_Generation"]
    if schedules:
        assert tuple(schedules[0].bound(it) for it in (0, 500, 1000, 2000)) == bounds[ipc]
    else:
        assert datm.start_epoch_range() == (theirs["min_start_epoch"], theirs["max_start_epoch"])
    # GSAM experts as their buffer_FTD.py, 100 epochs: enough for max_start_epoch + expert_epochs
    command = buffer_instruction(name)
    assert f"--data {data}" in command and "--data.zca true" in command
    assert "--optimizer gsam" in command and "--logits true" in command
    assert f"--folder {model['buffer']}" in command
    epochs = int(re.search(r"--epochs (\d+)", command).group(1))
    assert epochs == 100 and epochs >= theirs["max_start_epoch"] + theirs["expert_epochs"]
    return model, command


# ---------------------------------------------------------------------------------- generators
def generator_inputs(gen, labels: list[int], seed: int = 1):
    """``(z, c, noise)`` of a LatentGenerator for ``labels``: encoded random images, the table
    rows, a noise draw; ``z`` and ``c`` require grad."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = gen.encode(torch.randn(len(labels), *gen.image_shape, generator=g))
    c = gen.class_embedding(labels)
    return z.requires_grad_(), c.requires_grad_(), gen.draw_noise(len(labels), g)


def check_skip_then_ddim(gen, labels: list[int], eps) -> None:
    """T = 2: the skip weights are (1, 0), so the first step's x0 is ``z`` itself and the second
    is diffusers' DDIM step; ``eps(gen, x, t, labels)`` is the denoiser's own prediction."""
    import math

    from diffusers import DDIMScheduler

    z, c, noise = generator_inputs(gen, labels)
    labels = torch.tensor(labels)
    t_first, t_last = gen.timesteps(2)
    with torch.no_grad():
        ours = gen.sample(z, c, 2, noise=noise)
        scheduler = DDIMScheduler.from_config(gen.scheduler.config)
        scheduler.set_timesteps(2)
        a_first, a_last = (float(gen.scheduler.alphas_cumprod[t]) for t in (t_first, t_last))
        x = math.sqrt(a_first) * z + math.sqrt(1 - a_first) * noise
        e = eps(gen, x, torch.tensor(t_first), labels)
        x = math.sqrt(a_last) * z + math.sqrt(1 - a_last) * e  # x0 = z (weight 1)
        e = eps(gen, x, torch.tensor(t_last), labels)
        x = scheduler.step(e, t_last, x, eta=0.0).prev_sample  # weight 0: plain DDIM
        no_skip = gen.sample(z, c, 2, skip=False, noise=noise)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(no_skip, ours)


def check_render_deterministic_with_gradients(gen, labels: list[int], steps: int, chunk: int,
                                              shape: tuple[int, ...]) -> None:
    """A render is a function of ``(z, c, noise)`` (another noise: other images), gradients
    reach ``z`` and ``c`` and not the frozen generator, and the chunked backward gives them."""
    z, c, noise = generator_inputs(gen, labels)
    with torch.no_grad():
        first = gen.render(z, c, steps, guidance=2.0, noise=noise)
        again = gen.render(z, c, steps, guidance=2.0, noise=noise.clone())
        other = gen.render(z, c, steps, guidance=2.0, noise=torch.randn_like(noise))
    assert first.shape == shape
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    images = gen.render(z, c, steps, guidance=2.0, noise=noise)
    torch.testing.assert_close(images.detach(), first)
    images.square().sum().backward()
    assert z.grad is not None and c.grad is not None
    assert z.grad.abs().sum() > 0 and c.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.parameters())
    z2, c2 = z.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    gen.backward_in_chunks(z2, c2, 2 * first, steps, chunk, noise=noise, guidance=2.0)
    for chunked, full in ((z2.grad, z.grad), (c2.grad, c.grad)):
        torch.testing.assert_close(chunked, full, rtol=1e-3, atol=1e-4 * float(full.abs().max()))
