"""The LD3M ImageNet-subset recipes hold the authors' settings (Brian-Moser/prune_and_distill).

Each recipe is read the way a user runs it (``ld3m fit --config NAME --print_config``) and
compared with the values of their ``src/distill_{dm,dc,mtt}_LD3M.py`` argparse defaults,
``src/shared_args.py`` and ``src/utils.py``, tabled here:
"""

from __future__ import annotations

import pytest
from helpers import printed_recipe

from ld3m.augment import DEFAULT_STRATEGY
from ld3m.configs import recipe_path

# --lr_w of each script (one lr for z and c), and the objective's own settings
LR_W = {"dm": 1.0, "dc": 0.1, "mtt": 1000.0}
OBJECTIVE = {
    "dm": ("ld3m.modules.DM", {}),
    "dc": ("ld3m.modules.DC", {"lr_net": 0.01, "outer_loop": 1, "inner_loop": 1,
                               "distance": "ours", "batch_train": 256}),
    "mtt": ("ld3m.modules.MTT", {"syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 2,
                                 "lr_teacher": 0.01, "lr_lr": 1e-6, "batch_syn": None}),
}
DEPTH = {128: 5, 256: 6}  # --depth 5 (shared_args.py), --depth=6 at --res=256 (readme.md)
ROWS = [(res, obj, ipc) for res in (128, 256) for obj in ("dm", "dc", "mtt") for ipc in (1, 10)]


@pytest.mark.parametrize("res, objective, ipc", ROWS)
def test_ld3m_imagenet_recipe_is_the_authors_setting(res: int, objective: str, ipc: int,
                                                     capsys) -> None:
    name = f"ld3m_imagenet{res}-{objective}_ipc{ipc}"
    config = printed_recipe(name, capsys)
    model = config["model"]["init_args"]
    assert config["model"]["class_path"] == "ld3m.modules.LD3M" and model["ipc"] == ipc
    assert (model["steps"], model["guidance"], model["skip"], model["noise"]) == (10, 3.0, True,
                                                                                   "fresh")
    assert (model["lr_latent"], model["lr_embedding"], model["momentum"]) == (
        LR_W[objective], LR_W[objective], 0.5)
    class_path, settings = OBJECTIVE[objective]
    nested = model["objective"]
    assert nested["class_path"] == class_path
    args = nested["init_args"]
    for key, value in settings.items():
        assert args[key] == value, key
    assert args["lr_img"] == LR_W[objective] and args["dsa"] == DEFAULT_STRATEGY
    network = f"ConvNetD{DEPTH[res]}"
    if objective == "mtt":  # the buffer's network; buffer_mtt.py's 5000 x 15 epochs
        header = recipe_path(name).read_text()
        assert f"--network {network} --experts 5000 --epochs 15" in header
        assert f"--folder {args['buffer']}" in header
    else:
        assert args["network"] == network
    data = config["data"]
    assert data["class_path"] == "ld3m.datamodules.ImageNetSubset"
    assert (data["init_args"]["image_size"], data["init_args"]["resize"],
            data["init_args"]["batch_per_class"]) == (res, "crop", 256)
    assert data["init_args"]["subset"] == "imagenet-a"
    assert config["trainer"]["max_steps"] == 10000
    evaluation = config["evaluation"]
    assert evaluation["archs"] == f"{network},ResNet18,VGG11,AlexNet"  # eval_mode M, less ViT
    assert (evaluation["every_n_steps"], evaluation["runs"], evaluation["epochs"],
            evaluation["protocol"], evaluation["keep_best"]) == (100, 5, 1000, "glad", True)
    header = recipe_path(name).read_text()
    assert "ld3m convert-ldm" in header and "Published accuracy" in header
