"""A 2-process CPU DDP run of DM: both ranks must end with the same (trained) images.

Lightning's ``ddp`` strategy re-launches the running script for rank 1, which cannot be
pytest itself, so the run is a small script written to ``tmp_path`` and started with
``subprocess``. Each rank draws its own real batches and embedding networks; only the
all-reduced gradients keep the images identical.
"""

from __future__ import annotations

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

    import lightning as L
    import torch

    from ld3m.datamodules import FashionMNIST
    from ld3m.modules import DM


    class Record(L.Callback):
        def __init__(self, out):
            self.out = out

        def on_train_start(self, trainer, pl_module):
            torch.save(pl_module.images.detach().clone(), f"{self.out}/init{trainer.global_rank}.pt")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                torch.save(batch[0].clone(), f"{self.out}/batch{trainer.global_rank}.pt")


    def main():
        out, network, batch_per_class, precision, dsa = sys.argv[1:6]
        torch.set_num_threads(1)
        model = DM(ipc=1, network=network, dsa=dsa, seed=0)
        data = FashionMNIST(batch_per_class=int(batch_per_class))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
                            precision=precision, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=out, callbacks=[Record(out)])
        trainer.fit(model, datamodule=data)
        assert trainer.world_size == 2 and trainer.global_step == 2
        torch.save(model.images.detach(), f"{out}/rank{trainer.global_rank}.pt")


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "network, batch_per_class, precision, dsa",
    [
        ("ConvNetW32", 4, "32-true", "color_crop_cutout_flip_scale_rotate"),
        # bf16 convolutions are slow on CPUs without AVX-512: one shallow net, 2 images per class
        ("ConvNetD1", 2, "bf16-mixed", "none"),
    ],
    ids=["fp32", "bf16-mixed"],
)
def test_ddp_ranks_agree(data_dir: Path, tmp_path: Path, network: str, batch_per_class: int,
                         precision: str, dsa: str) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "LD3M_DATA_DIR": str(data_dir)}
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    result = subprocess.run(
        [sys.executable, str(script), str(out), network, str(batch_per_class), precision, dsa],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"

    def load(name: str) -> torch.Tensor:
        path = out / name
        assert path.is_file(), f"{name} was not written: {sorted(p.name for p in out.iterdir())}"
        return torch.load(path)

    final0, final1 = load("rank0.pt"), load("rank1.pt")
    init0, init1 = load("init0.pt"), load("init1.pt")
    batch0, batch1 = load("batch0.pt"), load("batch1.pt")
    assert final0.shape == (10, 1, 28, 28)
    assert torch.equal(init0, init1), "the ranks started from different images"
    assert not torch.equal(batch0, batch1), "the ranks drew the same real batch"
    assert torch.isfinite(final0).all()
    assert torch.equal(final0, final1), "the ranks' images diverged: gradients were not synced"
    assert not torch.equal(final0, init0), "no training happened"
