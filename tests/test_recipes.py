"""Every packaged recipe loads through ``ld3m fit --config NAME --print_config`` and the printed
configuration holds the recipe's values (no setting dropped, renamed or overridden by a
method's defaults on the way)."""

from __future__ import annotations

import pytest
import yaml

from ld3m.cli import main
from ld3m.configs import recipe_path, recipes

METHODS = {"dd": "DD", "dc": "DC", "dsa": "DSA", "dm": "DM", "mtt": "MTT", "datm": "DATM",
           "dq": "DQ", "ld3m": "LD3M"}


def _same(printed, written) -> bool:
    if isinstance(written, dict):  # a nested class (LD3M's objective): every written key
        return isinstance(printed, dict) and all(
            _same(printed.get(k), v) for k, v in written.items() if k != "init_args") and all(
            _same((printed.get("init_args") or {}).get(k), v)
            for k, v in (written.get("init_args") or {}).items())
    if isinstance(written, float) or isinstance(printed, float):
        return printed is not None and written is not None and float(printed) == float(written)
    return printed == written


@pytest.mark.parametrize("name", recipes())
def test_recipe_prints_its_own_values(name: str, capsys) -> None:
    method, dataset, ipc = name.split("_")
    assert method in METHODS and ipc.startswith("ipc"), f"{name} is not <method>_<data>_ipc<N>"
    written = yaml.safe_load(recipe_path(name).read_text())
    assert written["model"]["class_path"] == f"ld3m.modules.{METHODS[method]}"
    assert main(["fit", "--config", name, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for section in ("model", "data"):
        assert printed[section]["class_path"] == written[section]["class_path"]
        for key, value in (written[section].get("init_args") or {}).items():
            assert _same(printed[section]["init_args"][key], value), (section, key)
    if written["model"]["init_args"].get("ipc") is not None:
        assert written["model"]["init_args"]["ipc"] == int(ipc.removeprefix("ipc"))
    for section in ("trainer", "evaluation", "grid"):
        for key, value in (written.get(section) or {}).items():
            assert _same(printed[section][key], value), (section, key)
