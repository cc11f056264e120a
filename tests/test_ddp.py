"""2-process CPU DDP runs of every method: both ranks must end with the same (trained) state.

Lightning's ``ddp`` strategy re-launches the running script for rank 1, which cannot be
pytest itself, so the runs are a small script written to ``tmp_path`` and started with
``subprocess``. To pay the launch (two Python processes, the imports, the process group) once,
the script fits every case below one after the other in the same two processes (each case its
own ``Trainer``, in its own folder); a test per case then checks what the ranks saved.

Each rank draws its own real batches (and, for DM, its own embedding networks; for MTT/DATM its
own expert and start epoch); only the all-reduced gradients keep the ranks' state identical.
DC/DSA also keep a network across steps (trained on the synthetic images between updates), DD
learns per-step learning rates and, in ``random_pretrained`` mode, trains (or reads) its pool on
rank 0 and broadcasts it (rank 1 never reads the file); LD3M back-propagates through its generator outside DDP's reducer and
all-reduces itself; DQ trains its embedding network on rank 0, embeds half of the training set
per rank and broadcasts one selection.
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
    import json
    import sys

    import lightning as L
    import torch

    cases_file, tests_dir = sys.argv[1:3]
    sys.path.insert(0, tests_dir)

    from ld3m import modules  # noqa: E402
    from ld3m.datamodules import FashionMNIST  # noqa: E402


    def rank0_reads_pools(self, path):  # DD: only rank 0 may need the pool's file
        if self.trainer.global_rank != 0:
            raise AssertionError(f"rank {self.trainer.global_rank} read the DD pool file {path}")
        return read_pool(self, path)


    read_pool, modules.DD._load_pool = modules.DD._load_pool, rank0_reads_pools


    class Record(L.Callback):
        def __init__(self, out):
            self.out = out

        def on_train_start(self, trainer, pl_module):
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, f"{self.out}/init{trainer.global_rank}.pt")
            ddp = trainer.strategy.model  # the buffers DDP would broadcast at every forward
            with open(f"{self.out}/ddp{trainer.global_rank}.json", "w") as f:
                json.dump({"broadcast_buffers": [n for n in ddp.named_module_buffers]}, f)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0 and isinstance(batch, (list, tuple)):  # real batches
                torch.save(batch[0].clone(), f"{self.out}/batch{trainer.global_rank}.pt")


    torch.set_num_threads(1)
    for case in json.load(open(cases_file)):
        out = case["out"]
        model = getattr(modules, case["method"])(**case["kwargs"])
        if case["data"] == "tiny":
            from test_ld3m import TinyData

            data = TinyData(data_dir=out, batch_per_class=case["batch_per_class"])
        else:
            data = FashionMNIST(data_dir=case["data_dir"], batch_per_class=case["batch_per_class"])
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp",
                            max_steps=case["max_steps"], precision=case["precision"],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=out,
                            callbacks=[Record(out)])
        trainer.fit(model, datamodule=data)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"world_size": trainer.world_size, "global_step": trainer.global_step,
                    "state": state}, f"{out}/rank{trainer.global_rank}.pt")
    """
)

DSA_ALL = "color_crop_cutout_flip_scale_rotate"
#: id: (method, kwargs, real images per class per batch, precision). "buffer" and "generator"
#: are filled in by the fixture.
CASES = {
    "DM-fp32": ("DM", {"ipc": 1, "network": "ConvNetW32", "dsa": DSA_ALL}, 4, "32-true"),
    # bf16 convolutions are slow on CPUs without AVX-512: one shallow net, 2 images per class
    "DM-bf16-mixed": ("DM", {"ipc": 1, "network": "ConvNetD1", "dsa": "none"}, 2, "bf16-mixed"),
    # two image updates per network, one inner step between them
    "DC-fp32": ("DC", {"ipc": 1, "network": "ConvNetW32", "outer_loop": 2, "inner_loop": 1}, 4,
                "32-true"),
    "DSA-fp32": ("DSA", {"ipc": 1, "network": "ConvNetW32", "outer_loop": 2, "inner_loop": 1}, 4,
                 "32-true"),
    "DSA-bf16-mixed": ("DSA", {"ipc": 1, "network": "ConvNetD1", "outer_loop": 2, "inner_loop": 1},
                       2, "bf16-mixed"),
    "DD-fp32": ("DD", {"ipc": 2, "network": "ConvNetW32", "init_mode": "random_pretrained",
                       "pretrained_nets": 2, "pretrain_steps": 2}, 4, "32-true"),
    # the pool DD-fp32 saved, read by rank 0 alone and broadcast (rank 1 may have no such file)
    "DD-pool-file": ("DD", {"ipc": 2, "network": "ConvNetW32", "init_mode": "random_pretrained",
                            "pretrained_nets": 2, "pretrain_steps": 2,
                            "pretrained_path": "{DD-fp32}/dd_pretrained.pt"}, 4, "32-true"),
    "DD-bf16-mixed": ("DD", {"ipc": 1, "network": "ConvNetD1"}, 2, "bf16-mixed"),
    # trajectory matching against stand-in buffers
    "MTT-fp32": ("MTT", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 2, "gradient": "recompute"},
                 1, "32-true"),
    "MTT-bf16-mixed": ("MTT", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 2,
                               "gradient": "unroll"}, 1, "bf16-mixed"),
    "DATM-fp32": ("DATM", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 3,
                           "current_max_start_epoch": 1, "expansion_end": 2, "threshold": 100.0},
                  1, "32-true"),
    "DATM-bf16-mixed": ("DATM", {"ipc": 1, "syn_steps": 2, "max_start_epoch": 3,
                                 "current_max_start_epoch": 1, "expansion_end": 2,
                                 "threshold": 100.0, "gradient": "recompute"}, 1, "bf16-mixed"),
    # LD3M on the tiny generator and data of test_ld3m.py: chunked and one-graph backward
    "LD3M-fp32": ("LD3M", {"ipc": 1, "steps": 2, "chunk_size": 2, "network": "ConvNetD1",
                           "dsa": "none", "lr_latent": 0.05, "lr_embedding": 0.05}, 2, "32-true"),
    "LD3M-bf16-mixed": ("LD3M", {"ipc": 1, "steps": 2, "chunk_size": None,
                                 "network": "ConvNetD1", "dsa": "none", "lr_latent": 0.05,
                                 "lr_embedding": 0.05}, 2, "bf16-mixed"),
    # selection only (no steps), on a Fashion-MNIST slice
    "DQ-fp32": ("DQ", {"ipc": 3, "bins": 3, "network": "ConvNetW32", "embed_steps": 3}, 1,
                "32-true"),
    # the paper's setting: a share of every bin (classes may keep different counts)
    "DQ-fraction": ("DQ", {"fraction": 0.05, "bins": 3, "network": "ConvNetW32",
                           "embed_steps": 3}, 1, "32-true"),
}
#: What each method learns (its state must change; the rest of its state must stay equal too).
LEARNED = {"DM": ["images"], "DC": ["images"], "DSA": ["images"], "DD": ["images", "raw_lrs"],
           "MTT": ["images", "syn_lr"], "DATM": ["images", "syn_lr", "soft_labels"],
           "LD3M": ["latents", "embeddings"], "DQ": []}
TRAJECTORY = ("MTT", "DATM")


@pytest.fixture(scope="module")
def ddp_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Every case fitted by one 2-process DDP run: ``(result, {case id: output folder})``."""
    from helpers import write_fashion_mnist_slice
    from ld3m.datamodules import FashionMNIST
    from test_datm import _fmnist_buffer
    from test_generator import tiny_generator
    from test_mtt import write_buffer

    root = tmp_path_factory.mktemp("ddp")
    data = FashionMNIST(data_dir=str(data_dir))
    data.setup("fit")
    mtt_buffer = write_buffer(root / "mtt_buffer", experts=3, epochs=5, network="ConvNetD1",
                              shape=(1, 28, 28), classes=10, dataset="FashionMNIST")
    datm_buffer = _fmnist_buffer(root / "datm_buffer", data)  # stored logits mostly right
    generator = tiny_generator().save_pretrained(root / "generator")
    slice_dir = write_fashion_mnist_slice(data, root / "slice", train=3000, test=500)
    cases, folders = [], {}
    for name, (method, kwargs, batch_per_class, precision) in CASES.items():
        out = root / name
        out.mkdir()
        kwargs = {"seed": 0, **kwargs}
        if "pretrained_path" in kwargs:
            kwargs["pretrained_path"] = kwargs["pretrained_path"].format(**{
                k: str(v) for k, v in folders.items()})
        if method == "MTT":
            kwargs["buffer"] = str(mtt_buffer)
        elif method == "DATM":
            kwargs["buffer"] = str(datm_buffer)
        elif method == "LD3M":
            kwargs["generator"] = str(generator)
        cases.append({"method": method, "kwargs": kwargs, "batch_per_class": batch_per_class,
                      "precision": precision, "out": str(out), "max_steps": 2,
                      "data": "tiny" if method == "LD3M" else "fmnist",
                      "data_dir": str(slice_dir if method == "DQ" else data_dir)})
        folders[name] = out
    (root / "cases.json").write_text(json.dumps(cases))
    script = root / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "LD3M_DATA_DIR": str(data_dir)}
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    result = subprocess.run(
        [sys.executable, str(script), str(root / "cases.json"), str(Path(__file__).parent)],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    return result, folders


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_ranks_agree(ddp_runs, case: str) -> None:
    result, folders = ddp_runs
    out = folders[case]
    method = CASES[case][0]

    def load(name: str):
        path = out / name
        if not path.is_file():
            pytest.fail(f"{name} was not written; the DDP run ended with {result.returncode}:\n"
                        f"{result.stderr[-4000:]}", pytrace=False)
        return torch.load(path)

    rank0, rank1 = load("rank0.pt"), load("rank1.pt")
    for rank in (0, 1):  # equal on every rank by construction: no broadcast at every step
        assert json.loads((out / f"ddp{rank}.json").read_text())["broadcast_buffers"] == []
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == (0 if method == "DQ" else 2)
    init0, init1 = load("init0.pt"), load("init1.pt")
    final0, final1 = rank0["state"], rank1["state"]
    assert set(final0) == set(final1) == set(init0)
    for key in final0:
        assert torch.equal(init0[key], init1[key]), f"the ranks started from different {key}"
        assert torch.isfinite(final0[key].float()).all(), f"{key} is not finite"
        assert torch.equal(final0[key], final1[key]), f"the ranks' {key} diverged"
    for key in LEARNED[method]:
        assert not torch.equal(final0[key], init0[key]), f"{key} was not trained"
    if method in TRAJECTORY or method == "DQ":  # no real batches: trajectories / no steps
        assert not (out / "batch0.pt").exists(), f"{method} was served real batches"
    else:
        assert not torch.equal(load("batch0.pt"), load("batch1.pt")), "the ranks drew the same batch"
    if CASES[case][1].get("init_mode") == "random_pretrained":
        pool = Path(CASES[case][1].get("pretrained_path", "{out}/dd_pretrained.pt").format(
            out=out, **{k: v for k, v in folders.items()}))
        assert pool.is_file(), "the pool was not saved"
    if method == "DQ":
        assert (out / "dq_embedding.pt").is_file(), "rank 0 did not save the embedding network"
    if "fraction" in CASES[case][1]:  # 5 % of the 3,000-image slice, rounded in 30 bins
        kept = final0["indices"].numel()
        assert abs(kept - 150) <= 15, f"fraction 0.05 of 3000 images kept {kept}"


@pytest.mark.slow
def test_ddp_dq_selects_what_one_process_selects(ddp_runs) -> None:
    """The selection both DQ ranks hold is the one a single process makes with the same
    embedding network: the gathered features are in dataset order."""
    from ld3m.datamodules import FashionMNIST
    from ld3m.modules import DQ

    _, folders = ddp_runs
    out = folders["DQ-fp32"]
    selected = torch.load(out / "rank0.pt")["state"]["indices"]
    kwargs = {k: v for k, v in CASES["DQ-fp32"][1].items() if k != "embed_steps"}
    single = DQ(**kwargs, embed_checkpoint=str(out / "dq_embedding.pt"), seed=0)
    slice_dir = out.parent / "slice"
    assert torch.equal(single.quantize_dataset(FashionMNIST(data_dir=str(slice_dir))), selected)
