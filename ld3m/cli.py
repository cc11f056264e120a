"""The ``ld3m`` command line.

``ld3m fit`` is a ``LightningCLI`` (subclass mode): ``--model`` is any ``ld3m.modules`` method,
``--data`` any ``ld3m.datamodules`` real dataset, every ``--trainer.*`` flag is Lightning's. Four
callbacks are always on and have their own flag groups: ``--export.*`` (the final
``.safetensors`` set), ``--grid.*`` (PNG image grids), ``--evaluation.*`` (the evaluation
protocol at the end of ``fit``) and ``--checkpoint.*`` (the resumable ``last.ckpt``).

``ld3m evaluate``, ``ld3m buffer`` and ``ld3m prior`` are built by jsonargparse from the typed
signatures and docstrings of :mod:`ld3m.commands` (each with ``--config`` and ``--print_config``).

Every method gets its own defaults (``--model DC`` is ``DC()``'s settings, not the default
method's): the default run (DM on Fashion-MNIST, CPU-sized) is only filled in where the command
names no method or dataset. Names are matched case-insensitively; an unknown one is refused with
the valid names. Bad input ends with one ``error:`` line on stderr and exit status 2 (set
``LD3M_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

import ld3m.datamodules  # noqa: F401  (registers the data modules for --data NAME)
import ld3m.modules  # noqa: F401  (registers the methods for --model NAME)
from ld3m import commands, ldm
from ld3m.callbacks import ExportSynthetic, ImageGrid, PeriodicEvaluation, ResumeCheckpoint
from ld3m.configs import recipe_path
from ld3m.datamodules import DATASETS, RealDataModule
from ld3m.files import check_writable
from ld3m.loggers import default_loggers
from ld3m.modules import DistillationModule
from ld3m.outputs import LOGS, next_version, version_of

log = logging.getLogger("ld3m")

#: What ``ld3m fit`` runs where the command names no method / no dataset: DM on Fashion-MNIST,
#: IPC 10 (DM's defaults are the authors', IPC 50), 64 real images per class (CPU-sized; the
#: authors use 256).
DEFAULT_MODEL = ["--model", "DM", "--model.ipc", "10"]
DEFAULT_DATA = ["--data", "FashionMNIST", "--data.batch_per_class", "64"]
TRAINER_DEFAULTS = {
    "max_steps": 150,
    "default_root_dir": "runs/default",
    "log_every_n_steps": 10,
    "enable_model_summary": False,
}

FIT_HELP = ("Distil a real dataset into a few synthetic images per class with one method. "
            "Pick it with --model NAME ({methods}; `ld3m fit --model NAME --help` lists its "
            "flags) and the data with --data NAME ({datasets}). With neither, the CPU-sized "
            "default run: DM, IPC 10, on Fashion-MNIST. The published settings are recipes: "
            "--config NAME, NAME <method>_<dataset>_ipc<N> (e.g. dm_cifar10_ipc10).")

#: The subcommands besides ``fit``: name -> function whose signature is the command line.
COMMANDS: dict[str, Callable] = {
    "evaluate": commands.evaluate,
    "buffer": commands.buffer,
    "prior": commands.prior,
    "convert-ldm": ldm.convert_ldm,
}


# ====================================================================================== names
def method_names() -> dict[str, str]:
    """``--model`` names -> class paths (every method in :mod:`ld3m.modules`)."""
    return {name: f"ld3m.modules.{name}" for name in ld3m.modules.__all__
            if name != "DistillationModule"}


def data_names() -> dict[str, str]:
    """``--data`` names -> class paths (``ImageFolder`` is ``ImageFolderData``)."""
    names = {}
    for name, cls in DATASETS.items():
        names[name] = names[cls.__name__] = f"ld3m.datamodules.{cls.__name__}"
    return names


def resolve_name(group: str, value: str) -> str:
    """The class path for ``--<group> value`` (case-insensitive); a dotted path is kept.

    Raises:
        ValueError: for an unknown name, listing the valid ones (and the closest match).
    """
    known = method_names() if group == "model" else data_names()
    if "." in value:
        return value  # a full class path (ld3m's or the user's own): jsonargparse imports it
    by_lower = {name.lower(): path for name, path in known.items()}
    if value.lower() in by_lower:
        return by_lower[value.lower()]
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1, cutoff=0.5)
    hint = ""
    if close:
        hint = f"did you mean {next(n for n in known if n.lower() == close[0])}? "
    valid = sorted(method_names() if group == "model" else DATASETS)
    raise ValueError(f"unknown --{group} {value!r}; {hint}choose one of: {', '.join(valid)}")


# ====================================================================================== argv
_HELP = ("-h", "--help")
_CONFIG = ("-c", "--config")


def _option_value(tokens: list[str], i: int, names: tuple[str, ...]) -> tuple[int, str] | None:
    """``(index of the value, value)`` if ``tokens[i]`` is ``NAME VALUE`` or ``NAME=VALUE``."""
    token = tokens[i]
    for name in names:
        if token == name and i + 1 < len(tokens):
            return i + 1, tokens[i + 1]
        if token.startswith(name + "="):
            return i, token[len(name) + 1:]
    return None


def _config_groups(path: str) -> dict[str, object]:
    """The top-level entries of a ``--config`` file (empty if it is not a readable mapping)."""
    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}  # jsonargparse reports an unreadable config with its own message
    return content if isinstance(content, dict) else {}


def _names_a_class(entry: object) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
        return entry["class_path"]
    return None


def prepare_argv(tokens: list[str], groups: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """Resolve the class names of ``groups`` (``model``, ``data``) in ``tokens`` and put each
    group's default in front where neither a flag nor a ``--config`` file names its class.

    Returns:
        The new tokens and ``{group: class path}`` of the classes the user named.
    """
    tokens = list(tokens)
    named: dict[str, str] = {}
    for i in range(len(tokens)):
        for group in groups:
            found = _option_value(tokens, i, (f"--{group}", f"--{group}.class_path"))
            if found is None:
                continue
            index, value = found
            if value.lstrip().startswith("{"):  # an inline YAML/JSON {class_path: ...}
                named[group] = value
                continue
            path = resolve_name(group, value)
            named[group] = path
            if index == i:  # NAME=VALUE
                tokens[i] = tokens[i].split("=", 1)[0] + "=" + path
            else:
                tokens[index] = path
        found = _option_value(tokens, i, _CONFIG)
        if found is not None:
            index, value = found
            recipe = recipe_path(value) if not Path(value).is_file() else None
            if recipe is not None:  # a packaged recipe by name: --config dm_cifar10_ipc10
                value = str(recipe)
                tokens[index] = value if index != i else tokens[i].split("=", 1)[0] + "=" + value
            content = _config_groups(value)
            for group in groups:
                value = _names_a_class(content.get(group))
                if value is not None:
                    resolve_name(group, value)  # refuse an unknown name with the valid ones
                    named.setdefault(group, value)
    defaults = [token for group, default in groups.items() if group not in named
                for token in default]
    return defaults + tokens, named


# ====================================================================================== fit
class Ld3mCLI(LightningCLI):
    """``LightningCLI`` with ld3m's defaults, its always-on callbacks and only ``fit``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportSynthetic, "export")
        parser.add_lightning_class_args(ImageGrid, "grid")
        parser.add_lightning_class_args(PeriodicEvaluation, "evaluation")
        parser.add_lightning_class_args(ResumeCheckpoint, "checkpoint")
        parser.set_defaults({"evaluation.epochs": 120, "evaluation.runs": 3})

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` and refuse a missing or unreadable checkpoint before
        Lightning reads its hyperparameters."""
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        self._resume_step = None
        if ckpt_path:
            root = Path(config.trainer.default_root_dir or ".")
            path, self._resume_step = _checkpoint_file(ckpt_path, root)
            config.ckpt_path = str(path)
        try:
            super()._parse_ckpt_path()
        except SystemExit:
            raise ValueError(f"the hyperparameters in {config.ckpt_path} do not fit this command "
                             "(was it written by another method?)") from None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.config.subcommand]
        folders = [config.trainer.default_root_dir or "."]
        folders += [d for d in (config.export.dirpath, config.grid.dirpath, config.checkpoint.dirpath)
                    if d]
        for folder in folders:  # before hours of training, not after
            check_writable(folder)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]
        trainer = config["trainer"]
        if trainer.get("logger") in (None, True):
            root = Path(trainer.get("default_root_dir") or ".")
            ckpt_path = config.get("ckpt_path")
            version = version_of(ckpt_path, root) if ckpt_path else None
            if version is None:  # a new run, or a run resumed into another folder
                kwargs["logger"] = default_loggers(root, next_version(root / LOGS))
            else:  # resumed in its own folder: continue its logs and its last.ckpt
                kwargs["logger"] = default_loggers(root, version, resume_step=self._resume_step)
        if trainer.get("enable_checkpointing") is False:  # no last.ckpt then
            config["checkpoint"] = None
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config, callbacks):
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])


def _checkpoint_file(ckpt_path: str, root: Path) -> tuple[Path, int]:
    """The checkpoint ``--ckpt_path`` names (``last``: the newest ``last.ckpt`` of the runs in
    ``root``), checked to be a readable Lightning checkpoint, and its global step."""
    if ckpt_path == "last":
        found = sorted(root.glob(f"{LOGS}/version_*/checkpoints/{ResumeCheckpoint.FILENAME}"))
        found += sorted(root.glob(f"checkpoints/{ResumeCheckpoint.FILENAME}"))
        if not found:
            raise FileNotFoundError(f"--ckpt_path last: no {ResumeCheckpoint.FILENAME} of an "
                                    f"earlier run under {root} (give the file's path)")
        path = max(found, key=lambda p: p.stat().st_mtime)
        log.info("resuming from %s", path)
    else:
        path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated zip, text file, pickle errors, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return path, int(checkpoint.get("global_step", 0))


def fit_main(tokens: list[str]) -> int:
    """``ld3m fit``: the LightningCLI run of one method."""
    tokens, named = prepare_argv(tokens, {"model": DEFAULT_MODEL, "data": DEFAULT_DATA})
    helps = [f"--{group}.help" for group in ("model", "data") if group in named]
    if any(t in _HELP for t in tokens) and helps:  # `ld3m fit --model MTT --help`: MTT's flags
        for group in ("model", "data"):
            if group in named:
                _lightning_cli(["fit", f"--{group}.help", named[group]], exit_ok=True)
        return 0
    _lightning_cli(["fit", *tokens])
    return 0


def _lightning_cli(args: list[str], exit_ok: bool = False) -> None:
    parser_kwargs = {"exit_on_error": False, "fit": {"exit_on_error": False, "description": FIT_HELP.format(
        methods=", ".join(method_names()), datasets=", ".join(DATASETS))}}
    try:
        Ld3mCLI(DistillationModule, RealDataModule, subclass_mode_model=True,
                subclass_mode_data=True, trainer_defaults=TRAINER_DEFAULTS,
                seed_everything_default=0, parser_kwargs=parser_kwargs, args=args,
                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    except SystemExit as stop:
        if not (exit_ok and stop.code in (0, None)):
            raise


# ====================================================================================== others
def command_parser(name: str) -> ArgumentParser:
    """The parser of ``ld3m <name>``, built from the function's signature and docstring."""
    function = COMMANDS[name]
    parser = ArgumentParser(prog=f"ld3m {name}", description=_summary(function),
                            exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="a YAML file with these settings (see --print_config)")
    parser.add_function_arguments(function, fail_untyped=True, as_group=False)
    return parser


def command_main(name: str, tokens: list[str]) -> int:
    """``ld3m evaluate|buffer|prior``: parse, build the data module, call the function."""
    function = COMMANDS[name]
    groups = {"data": ["--data", "FashionMNIST"]} if "data" in inspect.signature(function).parameters else {}
    tokens, named = prepare_argv(tokens, groups)
    parser = command_parser(name)
    if any(t in _HELP for t in tokens) and "data" in named:
        tokens = ["--data.help", named["data"]]
    try:
        config = parser.parse_args(tokens)
    except SystemExit as stop:
        if stop.code in (0, None):
            return 0
        raise
    config.pop("config", None)
    init = parser.instantiate_classes(config)
    function(**init.as_dict())
    return 0


def _summary(function: Callable) -> str:
    """The description paragraph of a docstring (before ``Args:``), on one line."""
    doc = inspect.getdoc(function) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def top_help() -> str:
    width = max(len(n) for n in ["fit", *COMMANDS])
    fit = FIT_HELP.format(methods=", ".join(method_names()), datasets=", ".join(DATASETS))
    lines = ["usage: ld3m {fit," + ",".join(COMMANDS) + "} [--help] ...", "",
             "ld3m: dataset distillation (DD, DC, DSA, DM, MTT, DATM, DQ, LD3M) with PyTorch "
             "Lightning.", "", "subcommands:",
             f"  {'fit'.ljust(width)}  {fit.split('. ')[0]}."]
    lines += [f"  {name.ljust(width)}  {_summary(fn).split('. ')[0].rstrip('.')}."
              for name, fn in COMMANDS.items()]
    lines += ["", "`ld3m SUBCOMMAND --help` lists a subcommand's flags; "
              "`ld3m fit --model NAME --help` a method's."]
    return "\n".join(lines)


# ====================================================================================== errors
def _frames_outside(err: BaseException, *packages: str) -> bool:
    """Whether ``err`` was raised outside the given packages (its innermost frame)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return not any(f"{os.sep}{p}{os.sep}" in where for p in packages)


def error_message(err: BaseException) -> str:
    """One line saying what was wrong, for ``error:``.

    jsonargparse wraps a constructor's ``ValueError`` (e.g. ``ipc must be at least 1``) and its
    own type errors in "Does not validate against any of the Union subtypes"; the reason is the
    innermost exception of the chain, and its place the ``Parser key`` prefixes on the way.
    """
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    for outer in chain:  # the first error raised by ld3m (or Lightning), not by the parser
        if _frames_outside(outer, "jsonargparse", "argparse.py") and str(outer).strip():
            return str(outer).strip().splitlines()[0]
    keys: list[str] = []
    class_path = None
    for item in chain:
        text = str(item).strip()
        match = re.match(r'Parser key "([^"]+)":', text)
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
        found = re.search(r"Problem with given class_path '([^']+)'", text)
        class_path = class_path or (found.group(1) if found else None)
    innermost = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(err).__name__
    innermost = re.sub(r"<class '([\w.]+)'>", r"\1", innermost)
    required = re.fullmatch(r"the following arguments are required: (.*)", innermost)
    if required:
        flags = ", ".join("--" + n.strip().lstrip("-") for n in required.group(1).split(","))
        return f"missing {flags} (required)"
    innermost = re.sub(r"^Expected a (\S+)\. Got value: (.*)$", r"expected \1, got '\2'", innermost)
    option = re.fullmatch(r"Option '([^']+)' is not accepted", innermost)
    if option and keys:
        owner = f" of {class_path.rsplit('.', 1)[1]}" if class_path else ""
        return f"--{'.'.join(keys)}.{option.group(1)} is not an argument{owner}"
    return f"--{'.'.join(keys)}: {innermost}" if keys else innermost


# ====================================================================================== main
def _quiet_start() -> None:
    """No third-party tips, deprecation notes or expected warnings on every command."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=".*exists and is not empty")  # a resumed version
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "name", "") == "ld3m-no-tips" for f in rank_zero.filters):
        tips = logging.Filter("ld3m-no-tips")
        tips.filter = lambda record: not str(record.msg).startswith("💡")  # type: ignore[method-assign]
        rank_zero.addFilter(tips)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes (a notebook or a
    test may replace it after ``main`` ran), not to the stream it was made with."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    # main() may run several times in one process (tests, notebooks): replace, don't stack, the
    # handler
    for old in [h for h in log.handlers if h.get_name() == "ld3m-cli"]:
        log.removeHandler(old)
    handler = _StderrHandler()
    handler.set_name("ld3m-cli")
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in _HELP:
        print(top_help())
        return 0
    name, tokens = argv[0], argv[1:]
    if name == "fit":
        return fit_main(tokens)
    if name in COMMANDS:
        return command_main(name, tokens)
    known = ["fit", *COMMANDS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ValueError(f"unknown subcommand {name!r}; {hint}choose one of: {', '.join(known)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ld3m`` console script; returns the exit status."""
    _setup_logging()
    _quiet_start()
    torch.set_float32_matmul_precision("high")
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except SIGTERMException:  # a scheduler's stop: last.ckpt is written, the run is not done
        log.warning("stopped by SIGTERM; resume with --ckpt_path last")
        return 128 + signal.SIGTERM
    except SystemExit as stop:  # --help, --print_config: 0; Lightning's Ctrl-C exit: 1
        if stop.code in (0, None):
            return 0
        raise
    except (ValueError, OSError, FloatingPointError, ArgumentError) as err:
        if os.environ.get("LD3M_DEBUG"):
            raise
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
