"""Command-line interface: ``lcr-lightly {demo,pretrain,evaluate,visualize,init,export-synthetic}``.

``export``, ``embed`` and ``search`` come from :mod:`lcr_lightly.experiments.serving`.

Every experiment flag is a field of :class:`~lcr_lightly.experiments.config.ExperimentConfig`
with one line of ``--help`` each (the config's field docstrings); ``--config
file.yaml`` (or a shipped config's name, ``--config imagenet_synthetic``) loads fields
from YAML and flags after it override them. ``evaluate``/``visualize`` start from the
config stored in the checkpoint and ``pretrain --resume`` from the one in its
checkpoint, so only what should change needs a flag. ``--print-config`` prints the
effective config.

A user error (bad value, unknown command, option or key, missing data or file, an
undecodable image, unreadable checkpoint, a missing optional extra, a failed evaluation
after training) prints one ``error: ...`` line and exits with code 2: unknown commands,
options and config keys are found here before jsonargparse parses (closest name by
``difflib``), values by :class:`~lcr_lightly.experiments.config.ExperimentConfig`'s own
checks and, for a command's own options, by :meth:`Parser.check_options`. A
``pretrain`` stopped by SIGTERM saves ``checkpoints/interrupted.ckpt``, prints the
``--resume`` command and exits with code 143.
"""

from __future__ import annotations

import difflib
import io
import sys
import textwrap
from argparse import ArgumentError, RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from lcr_lightly.data import DatasetNotFoundError
from lcr_lightly.experiments.build import DATASET_LAYOUTS
from lcr_lightly.experiments.checkpointing import (
    CheckpointError,
    read_checkpoint,
    resume_checkpoint,
    resume_config,
)
from lcr_lightly.experiments.commands import (
    add_data_commands,
    add_demo_command,
    cmd_demo,
    cmd_evaluate,
    cmd_export,
    cmd_init,
    cmd_pretrain,
    cmd_visualize,
)
from lcr_lightly.experiments.config import (
    FIELD_NAMES,
    ExperimentConfig,
    UsageError,
    add_config_arguments,
    config_path,
    shipped_configs,
    unknown_key,
)
from lcr_lightly.experiments.serving import COMMANDS as SERVING_COMMANDS
from lcr_lightly.experiments.serving import ServingError
from lcr_lightly.experiments.serving import add_commands as add_serving_commands
from lcr_lightly.experiments.train import RUN_FILES
from lcr_lightly.experiments.values import (
    ConfigError,
    InvalidValue,
    PositiveInt,
    check_field,
    describe,
)
from lcr_lightly.models.pretrained import MissingExtraError

# The --help text after the options of pretrain/evaluate/visualize.
DATA_HELP = (
    DATASET_LAYOUTS
    + """
shipped configs (--config NAME, or --config FILE.yaml):
{configs}"""
)


class HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description and epilog printed as written."""


class Parser(ArgumentParser):
    """jsonargparse's parser that lists its option strings and checks typed options itself.

    An option's ``type`` is not given to jsonargparse: :meth:`check_options` converts and
    checks the parsed values with :func:`~lcr_lightly.experiments.values.check_field`, so a
    command's own options fail with the same one-line errors as the config fields.

    Attributes:
        flags: Every option string added (``--out-dir``, ``-k``, ...).
        hints: Each typed option's destination: its flag and type.
        commands: The sub-command parsers by name (set by :func:`build_parser`).
    """

    flags: Set[str]
    hints: Dict[str, Tuple[str, Any]]
    commands: Dict[str, Parser]

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        """Adds an argument (as jsonargparse does), recording its option strings and type."""
        hint = kwargs.pop("type", None)
        if hint is not None:
            kwargs["help"] = f"{kwargs.get('help') or ''} (type: {describe(hint)})".lstrip()
        action = super().add_argument(*args, **kwargs)
        self.__dict__.setdefault("flags", set()).update(action.option_strings)
        if hint is not None:
            self.__dict__.setdefault("hints", {})[action.dest] = (action.option_strings[-1], hint)
        return action

    def check_options(self, args: Namespace) -> None:
        """Converts and checks the typed options of ``args`` in place.

        Raises:
            InvalidValue: Naming the flag, the value and the type.
        """
        for dest, (flag, hint) in self.__dict__.get("hints", {}).items():
            value = args[dest]
            if isinstance(value, list):  # nargs: each value has the type
                args[dest] = [check_field(f"{flag}[{i}]", hint, v) for i, v in enumerate(value)]
            else:
                args[dest] = check_field(flag, hint, value)


def _parser(description: Optional[str] = None, **kwargs: Any) -> Parser:
    return Parser(
        exit_on_error=False,
        allow_abbrev=False,
        print_config=None,
        formatter_class=HelpFormatter,
        description=textwrap.fill(description, 79, break_on_hyphens=False) if description else None,
        **kwargs,
    )


def _config_parser(description: str) -> Parser:
    parser = _parser(
        description,
        epilog=DATA_HELP.replace(
            "{configs}", textwrap.fill(", ".join(shipped_configs()), 79, initial_indent="  ")
        ),
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML file of config fields, or a shipped config's name (listed below)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="Print the effective config and exit."
    )
    return parser


def build_parser() -> Parser:
    """The argument parser with all sub-commands."""
    parser = _parser(prog="lcr-lightly", description="Learning Common Rationale for SSL models.")
    sub = parser.add_subcommands(dest="command", required=True)

    add_demo_command(sub, _parser)

    p = _config_parser("Train (and evaluate) one configuration.")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir from checkpoints/last.ckpt, or interrupted.ckpt "
        "when newer (its config is the default)",
    )
    p.add_argument(
        "--resume-from",
        dest="resume_from",
        type=Optional[str],
        default=None,
        help="continue the run in --out-dir from this training checkpoint (e.g. "
        "checkpoints/epoch010.ckpt) instead of the newest one",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"start over in a non-empty --out-dir (deletes its {', '.join(RUN_FILES)})",
    )
    add_config_arguments(p)
    sub.add_subcommand("pretrain", p, help="Train (and evaluate) one configuration.")

    p = _config_parser("Evaluate a checkpoint in every pooling mode.")
    p.add_argument("--checkpoint", type=str, required=True, help="model.pt or .ckpt file")
    add_config_arguments(p)
    sub.add_subcommand("evaluate", p, help="Evaluate a model.pt in every pooling mode.")

    p = _config_parser("Figure: image, GradCAM of the SSL loss, rationale, feature norm.")
    p.add_argument("--checkpoint", type=str, required=True, help="model.pt or .ckpt file")
    p.add_argument("--out", type=str, default="fig.png", help="figure file (.png)")
    p.add_argument("--n", type=PositiveInt, default=6, help="images in the figure")
    add_config_arguments(p)
    sub.add_subcommand(
        "visualize", p, help="Figure: image, GradCAM of the SSL loss, rationale, feature norm."
    )

    add_data_commands(sub, _parser)
    add_serving_commands(sub, _parser)
    parser.commands = dict(sub.choices)
    return parser


def check_command_line(parser: Parser, argv: List[str]) -> None:
    """Refuses an unknown command or option, naming the closest one.

    Checked before jsonargparse parses, against the commands and option strings the
    parser was built with.

    Raises:
        UsageError: For an unknown command or option.
    """
    if not argv or argv[0].startswith("-"):  # --help, or no command: jsonargparse says
        return
    command, names = argv[0], list(parser.commands)
    if command not in parser.commands:
        close = difflib.get_close_matches(command, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(names)}"
        raise UsageError(f"unknown command {command!r}; {hint}")
    flags = parser.commands[command].flags
    for token in argv[1:]:
        flag = token.split("=", 1)[0]
        if token.startswith("-") and not _is_number(token) and flag not in flags:
            close = difflib.get_close_matches(flag, sorted(flags), n=1)
            hint = f"did you mean {close[0]}?" if close else "see --help."
            raise UsageError(f"unknown option {flag}; {hint}")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _stored_config(args: Namespace) -> Optional[Dict[str, Any]]:
    """The config stored in the checkpoint a command starts from, if any."""
    if args.command in ("evaluate", "visualize"):
        return read_checkpoint(Path(args[args.command].checkpoint)).config
    given = args.pretrain if args.command == "pretrain" else None
    if given is None or not (given.resume or given.resume_from):
        return None
    if given.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    chosen = given.resume_from
    path = Path(chosen) if chosen else resume_checkpoint(to_config(given))
    if chosen and not path.is_file():
        raise UsageError(f"--resume-from {path}: no such file")
    if not path.is_file():
        raise UsageError(
            f"nothing to resume: {path} does not exist (no epoch of a run in "
            f"{given.out_dir} has finished); start over with --overwrite"
        )
    return resume_config(path, suggest_intact=not chosen)


def _config_files(argv: List[str]) -> List[str]:
    """Resolves ``--config`` values and checks that each file is a YAML mapping.

    A value is a file or the name of a shipped config (``--config imagenet_synthetic``);
    a missing file, invalid YAML or a YAML list is a one-line error naming the file, a key
    that is not a config field one naming the closest field.
    """
    import yaml

    out = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            index, value, prefix = i + 1, argv[i + 1], ""
        elif arg.startswith("--config="):
            index, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        path = Path(config_path(value))
        if not path.is_file():
            names = ", ".join(shipped_configs())
            raise UsageError(
                f"--config {value} does not exist (no such file, and no shipped config of that "
                f"name; shipped: {names})"
            )
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise UsageError(f"--config {path}: not valid YAML ({problem}{where})") from None
        if not isinstance(loaded, dict):
            got = (
                "nothing (the file is empty)"
                if loaded is None
                else f"a YAML {type(loaded).__name__}"
            )
            raise UsageError(
                f"--config {path}: expected a mapping of config keys ('key: value' lines), "
                f"got {got}"
            )
        for key in loaded:  # before jsonargparse, which would word it its own way
            if key not in FIELD_NAMES:
                raise unknown_key(str(key))
        out[index] = prefix + str(path)
    return out


def to_config(ns: Namespace) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of a command's parsed arguments.

    Raises:
        InvalidValue: Quoting the value as typed (``'-3'``: flags and YAML are text).
    """
    try:
        return ExperimentConfig(**{name: ns[name] for name in FIELD_NAMES})
    except InvalidValue as err:
        raise err.as_text() from None


def parse(argv: Optional[List[str]] = None) -> Tuple[Namespace, Optional[ExperimentConfig]]:
    """Parses a command line into its arguments and its :class:`ExperimentConfig`.

    For ``evaluate``/``visualize`` (and ``pretrain --resume``) the config stored in the
    checkpoint (``last.ckpt``) replaces the defaults: ``--config`` and flags override it.

    Args:
        argv: The arguments (``sys.argv[1:]`` when None).

    Returns:
        The parsed arguments and the config (None for commands without one).
    """
    argv = _config_files(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    check_command_line(parser, argv)
    args = parser.parse_args(argv)
    parser.commands[args.command].check_options(args[args.command])
    if args.command not in ("pretrain", "evaluate", "visualize"):
        return args, None
    stored = _stored_config(args)
    if stored is not None:
        defaults = {f"{args.command}.{k}": v for k, v in stored.items() if k in FIELD_NAMES}
        parser.set_defaults(defaults)
        out_dir = args[args.command].out_dir
        args = parser.parse_args(argv)
        parser.commands[args.command].check_options(args[args.command])
        args[args.command].out_dir = out_dir  # a moved run folder stays where it is now
    return args, to_config(args[args.command])


def one_line(err: BaseException) -> str:
    """An error's message on one line.

    For an error re-raised by a DataLoader worker, whose message holds the worker's
    traceback, the original message only.
    """
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def _run(argv: Optional[List[str]]) -> None:
    import yaml

    args, cfg = parse(argv)
    command, sub = args.command, args[args.command]
    if cfg is None:
        commands = {"demo": cmd_demo, "init": cmd_init, "export-synthetic": cmd_export}
        {**commands, **SERVING_COMMANDS}[command](sub)
        return
    if sub.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return
    {"pretrain": cmd_pretrain, "evaluate": cmd_evaluate, "visualize": cmd_visualize}[command](
        sub, cfg
    )


# Exit status of a run stopped by SIGTERM (as a shell reports a process killed by it).
SIGTERM_EXIT = 143

# User errors: one line on stderr, exit code 2. Anything else is a bug and tracebacks.
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DatasetNotFoundError,
    UsageError,
    MissingExtraError,
    ServingError,
)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``lcr-lightly`` console script."""
    from lcr_lightly.experiments.evaluate import EvaluationError
    from lcr_lightly.experiments.train import TrainingInterrupted

    if isinstance(sys.stdout, io.TextIOWrapper) and not sys.stdout.isatty():
        sys.stdout.reconfigure(line_buffering=True)  # a log file shows each line as it comes
    try:
        _run(argv)
    except TrainingInterrupted as err:  # 128 + 15: the status of a process ended by SIGTERM
        print(f"interrupted: {err}", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except (*USER_ERRORS, ArgumentError, EvaluationError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
