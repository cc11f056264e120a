"""The README's (and the guide's) commands run as written.

Every ``ld3m ...`` line of their ``bash`` blocks is dry-run with ``--print_config`` (which parses
and checks the whole command without training), from a folder where one tiny run already wrote
``runs/default`` the way the quick start does, so the commands that name its files find them.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from ld3m.cli import main

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md", ROOT / "docs" / "multi_gpu.md"]


def _commands(path: Path) -> list[str]:
    """The ``ld3m`` command lines of the ``bash`` blocks of ``path`` (continuations joined),
    as ``ld3m ARGS`` also where a launcher runs them (``srun ld3m ...``,
    ``torchrun ... -m ld3m.cli ...``)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for start, token in enumerate(tokens):
                if token == "ld3m" or (token == "ld3m.cli" and tokens[start - 1] == "-m"):
                    commands.append(shlex.join(["ld3m", *tokens[start + 1:]]))
                    break
    return commands


COMMANDS = [(path.name, command) for path in DOCS for command in _commands(path)]


def test_the_readme_has_commands() -> None:
    readme = [c for name, c in COMMANDS if name == "README.md"]
    assert len(readme) >= 15
    assert any(c.startswith("ld3m fit --config runs/default/") for c in readme)


@pytest.fixture(scope="module")
def quick_start_folder(tmp_path_factory, data_dir):
    """A folder where the quick start's ``ld3m fit`` ran (tiny), as a user's would look."""
    import os

    folder = tmp_path_factory.mktemp("user")
    previous = Path.cwd()
    os.chdir(folder)
    try:
        assert main(["fit", "--model.ipc", "1", "--data.batch_per_class", "8",
                     "--trainer.max_steps", "1", "--evaluation.at_end", "false",
                     "--trainer.enable_progress_bar", "false"]) == 0
    finally:
        os.chdir(previous)
    assert (folder / "runs" / "default" / "lightning_logs" / "version_0" / "config.yaml").is_file()
    return folder


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_command_runs_as_written(doc: str, command: str, quick_start_folder: Path,
                                 monkeypatch, capsys) -> None:
    monkeypatch.chdir(quick_start_folder)
    args = shlex.split(command, comments=True)[1:]
    if args and args[0] in ("fit", "evaluate", "buffer", "prior", "convert-ldm") and "--help" not in args:
        args.append("--print_config")
    assert main(args) == 0, capsys.readouterr().err
    assert "error:" not in capsys.readouterr().err


def test_python_example_imports() -> None:
    """The README's Python example parses, and everything it imports exists."""
    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    tree = ast.parse(code)
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports
    exec(compile(ast.Module(body=imports, type_ignores=[]), "README.md", "exec"), {})
