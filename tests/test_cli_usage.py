"""The command line as a user meets it: each method's own defaults, help, one-line errors."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import ld3m.modules
import pytest
import torch
import yaml
from helpers import error_line
from ld3m.datamodules import RealDataModule

from ld3m.cli import main, method_names

#: Flags a method needs before ``--print_config`` can show it (folders are not read then).
REQUIRED = {"MTT": ["--model.buffer", "b"], "DATM": ["--model.buffer", "b"],
            "LD3M": ["--model.generator", "g"]}


def _printed_config(capsys, *args: str) -> dict:
    assert main(["fit", *args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def _python_defaults(cls: type) -> dict:
    """The constructor's defaults as YAML shows them (a tuple is a list there)."""
    return {name: list(p.default) if isinstance(p.default, tuple) else p.default
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


# ------------------------------------------------------------------------------ defaults
@pytest.mark.parametrize("name", sorted(method_names()))
def test_each_method_gets_its_own_defaults(name: str, capsys) -> None:
    cls = getattr(ld3m.modules, name)
    expected = _python_defaults(cls)
    for spelled in (name, name.lower()):  # --model DC and --model dc
        config = _printed_config(capsys, "--model", spelled, *REQUIRED.get(name, []))
        assert config["model"]["class_path"] == f"ld3m.modules.{name}"
        init = config["model"]["init_args"]
        assert {k: init[k] for k in expected} == expected, f"--model {spelled}"


@pytest.mark.parametrize("name", ["DC", "DD", "MTT"])
def test_a_minimal_yaml_gets_the_methods_defaults(name: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "run.yaml"
    init_args = {"ipc": 1, **({"buffer": "b"} if name == "MTT" else {})}
    path.write_text(yaml.safe_dump({"model": {"class_path": f"ld3m.modules.{name}",
                                              "init_args": init_args}}))
    init = _printed_config(capsys, "--config", str(path))["model"]["init_args"]
    expected = {**_python_defaults(getattr(ld3m.modules, name)), "ipc": 1}
    assert {k: init[k] for k in expected} == expected


def test_the_default_run_and_an_explicit_dataset(capsys) -> None:
    config = _printed_config(capsys)
    assert config["model"]["class_path"] == "ld3m.modules.DM"
    assert config["model"]["init_args"] == {**_python_defaults(ld3m.modules.DM), "ipc": 10}
    assert config["data"]["class_path"] == "ld3m.datamodules.FashionMNIST"
    assert config["data"]["init_args"]["batch_per_class"] == 64  # the CPU-sized default run
    config = _printed_config(capsys, "--data", "mnist", "--model", "DC")
    assert config["data"]["class_path"] == "ld3m.datamodules.MNIST"
    assert config["data"]["init_args"] == _python_defaults(RealDataModule)  # MNIST's own
    assert config["model"]["init_args"]["lr_img"] == 0.1


# ------------------------------------------------------------------------------ help
def test_top_help_lists_exactly_the_working_subcommands(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  ([a-z-]+)  ", out, flags=re.M)
    assert listed == ["fit", "evaluate", "buffer", "prior", "convert-ldm"]
    assert main([]) == 0, "a bare `ld3m` prints the help, it does not start a run"
    assert capsys.readouterr().out == out
    for name in listed:
        assert main([name, "--help"]) == 0
        assert f"ld3m {name}" in capsys.readouterr().out or name == "fit"
    for gone in ("validate", "test", "predict"):
        assert main([gone]) == 2
        assert "choose one of: fit, evaluate, buffer, prior, convert-ldm" in error_line(capsys)


def test_fit_help_for_one_method_shows_its_flags(capsys) -> None:
    assert main(["fit", "--model", "MTT", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model.syn_steps" in out and "--model.expert_epochs" in out
    assert "--trainer.max_steps" not in out


@pytest.mark.parametrize("name", ["evaluate", "buffer", "prior"])
def test_subcommands_take_config_files(name: str, tmp_path: Path, capsys) -> None:
    required = ["--distilled", "x.safetensors"] if name == "evaluate" else []
    assert main([name, *required, "--seed", "7", "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["seed"] == 7
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([name, "--config", str(path), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config


# ------------------------------------------------------------------------------ bad input
def _fit(root: Path, *extra: str) -> list[str]:
    return ["fit", "--model.ipc", "1", "--data.batch_per_class", "8", "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(root), "--evaluation.at_end", "false",
            "--trainer.enable_progress_bar", "false", *extra]


def _checkpoint_like(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    else:  # a real checkpoint cut in half
        torch.save({"state_dict": {"images": torch.zeros(100, 100)}, "global_step": 1}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


BAD_INPUT = {
    "ipc 0": (["--model.ipc", "0"], "ipc must be at least 1, got 0"),
    "batch_per_class 0": (["--data.batch_per_class", "0"], "batch_per_class must be at least 1"),
    "DATM start epochs": (["--model", "DATM", "--model.buffer", "{tmp}",
                           "--model.max_start_epoch", "1"], "max_start_epoch"),
    "ipc not a number": (["--model.ipc", "abc"], "--model.ipc: expected int, got 'abc'"),
    "unknown model": (["--model", "Foo"], "choose one of: DATM, DC, DD, DM, DQ, DSA, LD3M, MTT"),
    "misspelt model": (["--model", "dmm"], "did you mean DM?"),
    "unknown data": (["--data", "fashion"], "did you mean FashionMNIST?"),
    "unknown flag": (["--model", "DC", "--model.bogus", "1"], "--model.bogus is not an argument of DC"),
    "truncated checkpoint": (["--ckpt_path", "{truncated}"], "is not a readable checkpoint"),
    "text checkpoint": (["--ckpt_path", "{text}"], "is not a readable checkpoint"),
    "missing checkpoint": (["--ckpt_path", "{tmp}/none.ckpt"], "does not exist"),
    "no last checkpoint": (["--ckpt_path", "last"], "no last.ckpt of an earlier run"),
    "unwritable folder": (["--trainer.default_root_dir", "{file}/run"], "cannot write to the output folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line(case: str, data_dir: Path, tmp_path: Path, capsys,
                                     monkeypatch) -> None:
    args, expected = BAD_INPUT[case]
    (tmp_path / "file").write_text("a file, not a folder")
    values = {"tmp": str(tmp_path), "file": str(tmp_path / "file"),
              "truncated": str(_checkpoint_like(tmp_path, "truncated")),
              "text": str(_checkpoint_like(tmp_path, "text"))}

    def no_data(self, stage=None):  # every one of these must be refused before any training
        raise AssertionError("the real data was loaded: the error came after training began")

    monkeypatch.setattr(RealDataModule, "setup", no_data)
    args = [a.format(**values) for a in args]
    assert main(_fit(tmp_path / "run", *args)) == 2
    line = error_line(capsys)
    assert expected in line, line
    assert "Union subtypes" not in line


@pytest.mark.slow
def test_start_up_is_quiet(data_dir: Path, tmp_path: Path) -> None:
    """No third-party tips, deprecation notes or warnings (file paths) on a plain run."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LD3M_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "ld3m.cli", *_fit(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    noisy = [line for line in result.stderr.splitlines()
             if "💡" in line or "Warning" in line or "deprecat" in line.lower()
             or "site-packages" in line or "Tip:" in line]
    assert noisy == [], result.stderr
