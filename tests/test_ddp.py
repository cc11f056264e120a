"""2-process CPU DDP runs of every method: both ranks must end with the same (trained) images.

Lightning's ``ddp`` strategy re-launches the running script for rank 1, which cannot be
pytest itself, so the run is a small script written to ``tmp_path`` and started with
``subprocess``. Each rank draws its own real batches (and, for DM, its own embedding networks);
only the all-reduced gradients keep the images identical. DC/DSA also keep a network across
steps (trained on the synthetic images between updates) and DD learns per-step learning rates
and, in ``random_pretrained`` mode, trains its pool on rank 0 behind a barrier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys

    import json

    import lightning as L
    import torch

    from ld3m import modules
    from ld3m.datamodules import FashionMNIST


    class Record(L.Callback):
        def __init__(self, out):
            self.out = out

        def on_train_start(self, trainer, pl_module):
            torch.save(pl_module.images.detach().clone(), f"{self.out}/init{trainer.global_rank}.pt")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0 and isinstance(batch, (list, tuple)):  # real batches
                torch.save(batch[0].clone(), f"{self.out}/batch{trainer.global_rank}.pt")


    def main():
        out, method, kwargs, batch_per_class, precision = sys.argv[1:6]
        torch.set_num_threads(1)
        model = getattr(modules, method)(seed=0, **json.loads(kwargs))
        data = FashionMNIST(batch_per_class=int(batch_per_class))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
                            precision=precision, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=out, callbacks=[Record(out)])
        trainer.fit(model, datamodule=data)
        assert trainer.world_size == 2 and trainer.global_step == 2
        torch.save(model.images.detach(), f"{out}/rank{trainer.global_rank}.pt")
        lrs = getattr(model, "raw_lrs", getattr(model, "syn_lr", None))
        if lrs is not None:
            torch.save(lrs.detach(), f"{out}/lrs{trainer.global_rank}.pt")
        if getattr(model, "soft_labels", None) is not None:
            torch.save(model.soft_labels.detach(), f"{out}/soft{trainer.global_rank}.pt")


    if __name__ == "__main__":
        main()
    """
)


DSA_ALL = "color_crop_cutout_flip_scale_rotate"


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, kwargs, batch_per_class, precision",
    [
        ("DM", {"ipc": 1, "network": "ConvNetW32", "dsa": DSA_ALL}, 4, "32-true"),
        # bf16 convolutions are slow on CPUs without AVX-512: one shallow net, 2 images per class
        ("DM", {"ipc": 1, "network": "ConvNetD1", "dsa": "none"}, 2, "bf16-mixed"),
        # two image updates per network, one inner step between them
        ("DC", {"ipc": 1, "network": "ConvNetW32", "outer_loop": 2, "inner_loop": 1}, 4, "32-true"),
        ("DSA", {"ipc": 1, "network": "ConvNetW32", "outer_loop": 2, "inner_loop": 1}, 4, "32-true"),
        ("DSA", {"ipc": 1, "network": "ConvNetD1", "outer_loop": 2, "inner_loop": 1}, 2, "bf16-mixed"),
        ("DD", {"ipc": 2, "network": "ConvNetW32", "init_mode": "random_pretrained",
                "pretrained_nets": 2, "pretrain_steps": 2}, 4, "32-true"),
        ("DD", {"ipc": 1, "network": "ConvNetD1"}, 2, "bf16-mixed"),
        # trajectory matching against a stand-in buffer ("buffer" is filled in below)
        ("MTT", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 2, "gradient": "recompute"}, 1, "32-true"),
        ("MTT", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 2, "gradient": "unroll"}, 1, "bf16-mixed"),
        ("DATM", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 3, "current_max_start_epoch": 1,
                  "expansion_end": 2, "threshold": 100.0}, 1, "32-true"),
        ("DATM", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 3, "current_max_start_epoch": 1,
                  "expansion_end": 2, "threshold": 100.0, "gradient": "recompute"}, 1, "bf16-mixed"),
    ],
    ids=["DM-fp32", "DM-bf16-mixed", "DC-fp32", "DSA-fp32", "DSA-bf16-mixed", "DD-fp32",
         "DD-bf16-mixed", "MTT-fp32", "MTT-bf16-mixed", "DATM-fp32",
         "DATM-bf16-mixed"],
)
def test_ddp_ranks_agree(data_dir: Path, tmp_path: Path, method: str, kwargs: dict,
                         batch_per_class: int, precision: str) -> None:
    if method == "MTT":
        from test_mtt import write_buffer

        folder = write_buffer(tmp_path / "buffer", experts=3, epochs=5, network="ConvNetD1",
                              shape=(1, 28, 28), classes=10, dataset="FashionMNIST")
        kwargs = {**kwargs, "buffer": str(folder)}
    elif method == "DATM":  # stand-in experts whose stored logits mostly get the class right
        from ld3m.datamodules import FashionMNIST
        from test_datm import _fmnist_buffer

        data = FashionMNIST(data_dir=str(data_dir))
        data.setup("fit")
        kwargs = {**kwargs, "buffer": str(_fmnist_buffer(tmp_path / "buffer", data))}
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "LD3M_DATA_DIR": str(data_dir)}
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    result = subprocess.run(
        [sys.executable, str(script), str(out), method, json.dumps(kwargs), str(batch_per_class),
         precision],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"

    def load(name: str) -> torch.Tensor:
        path = out / name
        assert path.is_file(), f"{name} was not written: {sorted(p.name for p in out.iterdir())}"
        return torch.load(path)

    final0, final1 = load("rank0.pt"), load("rank1.pt")
    init0, init1 = load("init0.pt"), load("init1.pt")
    assert final0.shape == (10 * kwargs["ipc"], 1, 28, 28)
    assert torch.equal(init0, init1), "the ranks started from different images"
    if method in ("MTT", "DATM"):  # they read expert trajectories, not real batches
        assert not (out / "batch0.pt").exists(), "MTT/DATM were served real batches"
    else:
        batch0, batch1 = load("batch0.pt"), load("batch1.pt")
        assert not torch.equal(batch0, batch1), "the ranks drew the same real batch"
    assert torch.isfinite(final0).all()
    assert torch.equal(final0, final1), "the ranks' images diverged: gradients were not synced"
    assert not torch.equal(final0, init0), "no training happened"
    if method in ("DD", "MTT", "DATM"):
        lrs0, lrs1 = load("lrs0.pt"), load("lrs1.pt")
        assert torch.equal(lrs0, lrs1), "the ranks' learning rates diverged"
        if method == "DATM":
            assert torch.equal(load("soft0.pt"), load("soft1.pt")), "the soft labels diverged"
        if kwargs.get("init_mode") == "random_pretrained":
            assert (out / "dd_pretrained.pt").is_file(), "the pool was not saved"


# ---------------------------------------------------------------------------------- LD3M
LD3M_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import lightning as L
    import torch

    sys.path.insert(0, sys.argv[1])
    from test_ld3m import TinyData  # noqa: E402

    from ld3m.modules import LD3M  # noqa: E402


    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            torch.save(pl_module.latents.detach().clone(), f"{out}/init{trainer.global_rank}.pt")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                torch.save(batch[0].clone(), f"{out}/batch{trainer.global_rank}.pt")


    out, kwargs, precision = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    model = LD3M(**kwargs)
    data = TinyData(data_dir=out, batch_per_class=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
                        precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out, callbacks=[Record()])
    trainer.fit(model, datamodule=data)
    assert trainer.world_size == 2 and trainer.global_step == 2
    torch.save({"latents": model.latents.detach(), "embeddings": model.embeddings.detach()},
               f"{out}/rank{trainer.global_rank}.pt")
    """
)


@pytest.mark.slow
def test_ddp_ld3m_ranks_end_with_identical_latents(tmp_path: Path) -> None:
    """LD3M on the tiny generator and data of ``test_ld3m.py``, 2 CPU processes (gloo): each rank
    draws its own real batches and DM networks; only LD3M's all-reduce of the gradients of z and
    c (its chunked backward bypasses DDP's reducer) keeps the ranks' latents identical."""
    from test_generator import tiny_generator

    gen_dir = tiny_generator().save_pretrained(tmp_path / "generator")
    script = tmp_path / "ddp_ld3m.py"
    script.write_text(LD3M_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    kwargs = {"generator": str(gen_dir), "ipc": 1, "steps": 2, "chunk_size": 2,
              "network": "ConvNetD1", "dsa": "none", "lr_latent": 0.05, "lr_embedding": 0.05}
    env = {**os.environ}
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    result = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent), str(out), json.dumps(kwargs),
         "32-true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    final0, final1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    init0, init1 = torch.load(out / "init0.pt"), torch.load(out / "init1.pt")
    assert torch.equal(init0, init1), "the ranks started from different latents"
    assert not torch.equal(torch.load(out / "batch0.pt"), torch.load(out / "batch1.pt"))
    assert torch.isfinite(final0["latents"]).all()
    assert not torch.equal(final0["latents"], init0), "no training happened"
    assert torch.equal(final0["latents"], final1["latents"]), "the ranks' latents diverged"
    assert torch.equal(final0["embeddings"], final1["embeddings"]), "the embeddings diverged"


# ---------------------------------------------------------------------------------- DQ
DQ_SCRIPT = textwrap.dedent(
    """
    import sys

    import lightning as L
    import torch

    from ld3m.datamodules import FashionMNIST
    from ld3m.modules import DQ

    out = sys.argv[1]
    torch.set_num_threads(1)
    model = DQ(ipc=3, bins=3, network="ConvNetW32", embed_steps=3, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, datamodule=FashionMNIST(batch_per_class=1))
    assert trainer.world_size == 2 and trainer.global_step == 0  # selection only, no updates
    torch.save({"indices": model.indices, "bins": model.bin_ids, "images": model.images.detach()},
               f"{out}/rank{trainer.global_rank}.pt")
    """
)


@pytest.mark.slow
def test_ddp_dq_selects_once_for_both_ranks(data_dir: Path, tmp_path: Path) -> None:
    """DQ under 2-process DDP: rank 0 trains the embedding network, each rank embeds half of the
    training set, the features are all-gathered and the selection is broadcast. Both ranks must
    hold the same selection, and it must be the one a single process makes with the same
    embedding network (so the gathered features are in dataset order). The data: the first
    3,000 training and 500 test images of Fashion-MNIST, written in its own IDX format."""
    from helpers import write_fashion_mnist_slice
    from ld3m.datamodules import FashionMNIST
    from ld3m.modules import DQ

    full = FashionMNIST(data_dir=str(data_dir))
    full.setup("fit")
    data_dir = write_fashion_mnist_slice(full, tmp_path / "data", train=3000, test=500)
    script = tmp_path / "ddp_dq.py"
    script.write_text(DQ_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "LD3M_DATA_DIR": str(data_dir)}
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for key in ("indices", "bins", "images"):
        assert torch.equal(rank0[key], rank1[key]), f"the ranks' {key} differ"
    assert (out / "dq_embedding.pt").is_file(), "rank 0 did not save the embedding network"
    single = DQ(ipc=3, bins=3, network="ConvNetW32", embed_checkpoint=str(out / "dq_embedding.pt"),
                seed=0)
    indices = single.quantize_dataset(FashionMNIST(data_dir=str(data_dir)))
    assert torch.equal(indices, rank0["indices"]), "DDP selected other images than one process"
