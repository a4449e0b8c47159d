"""Command-line interface: ``lcr-lightly {demo,pretrain,evaluate,visualize,init,export-synthetic}``.

Every experiment flag is a field of :class:`~lcr_lightly.pipeline.ExperimentConfig`;
``--config file.yaml`` loads fields from YAML and flags given on the command line
override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, get_type_hints

from lcr_lightly.pipeline import ExperimentConfig


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with ExperimentConfig fields.")
    hints = get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        text = str(kind)
        kwargs: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "List[int]" in text or "list[int]" in text:
            kwargs.update(type=int, nargs="+")
        elif "float" in text:
            kwargs["type"] = float
        elif "int" in text:
            kwargs["type"] = int
        else:
            kwargs["type"] = str
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        parser.add_argument(flag, help=f"(default: {default})", **kwargs)


def load_config(args: argparse.Namespace) -> ExperimentConfig:
    """Merges ``--config`` YAML and explicit flags into an :class:`ExperimentConfig`.

    Args:
        args: Parsed arguments.

    Returns:
        The config.

    Raises:
        SystemExit: With a clear message for a missing file or unknown keys.
    """
    import yaml

    values: Dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        if not args.config.is_file():
            raise SystemExit(f"error: config file {args.config} does not exist.")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {args.config} must hold a mapping of config fields.")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return ExperimentConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from err


def _cmd_demo(args: argparse.Namespace) -> None:
    from lcr_lightly.demo import run_demo

    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    run_demo(out_dir=args.out, init=args.init, progress=not args.no_progress, **overrides)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from lcr_lightly.pipeline import run

    cfg = load_config(args)
    out = run(cfg)
    print(json.dumps(out["results"], indent=2))
    print(f"results and model.pt written to {cfg.out_dir}")


def _load_model(cfg: ExperimentConfig, checkpoint: Path) -> Any:
    import torch

    from lcr_lightly.pipeline import make_model

    if not checkpoint.is_file():
        raise SystemExit(f"error: checkpoint {checkpoint} does not exist.")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    model = make_model(cfg)
    has_head = any(k.startswith("common_rationale.") for k in state)
    if has_head != cfg.lcr:
        raise SystemExit(
            f"error: checkpoint {checkpoint} {'has' if has_head else 'has no'} LCR head but the "
            f"config says lcr={cfg.lcr}; pass --{'lcr' if has_head else 'no-lcr'}."
        )
    model.load_state_dict(state)
    return model


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from lcr_lightly.pipeline import evaluate, make_data

    cfg = load_config(args)
    model = _load_model(cfg, args.checkpoint)
    print(json.dumps(evaluate(model, make_data(cfg), cfg), indent=2))


def _cmd_visualize(args: argparse.Namespace) -> None:
    import torch

    from lcr_lightly.pipeline import make_data
    from lcr_lightly.viz import projection_figure, rationale_figure

    cfg = load_config(args)
    if not cfg.lcr:
        raise SystemExit("error: visualize needs an LCR checkpoint (lcr=true).")
    model = _load_model(cfg, args.checkpoint)
    data = make_data(cfg)
    test: Any = data.test_eval
    items = [test[i * max(len(test) // args.n, 1)] for i in range(args.n)]
    images = torch.stack([it[0] for it in items])
    masks = torch.stack([it[3] for it in items]).float() if data.masks else None
    out = rationale_figure(model, images, [images, images.flip(-1)], str(args.out), masks)
    proj = projection_figure(
        model, images, str(Path(args.out).with_suffix("")) + "_projections.png"
    )
    print(f"wrote {out} and {proj}")


def _cmd_init(args: argparse.Namespace) -> None:
    from lcr_lightly.pipeline import pretrain_generic_init

    result = pretrain_generic_init(
        args.out,
        widths=tuple(args.widths),
        image_size=args.image_size,
        images_per_class=args.images_per_class,
        epochs=args.epochs,
        seed=args.seed,
    )
    print(json.dumps(result))
    print(f"backbone weights written to {args.out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from lcr_lightly.data import SyntheticFineGrained, export_cub_layout

    kw = dict(num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
    splits = [
        SyntheticFineGrained(images_per_class=args.images_per_class, **kw),
        SyntheticFineGrained(images_per_class=args.test_images_per_class, split="test", **kw),
    ]
    root = export_cub_layout(splits, args.root)
    print(f"CUB-200-2011-style synthetic set written to {root}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(
        prog="lcr-lightly", description="Learning Common Rationale for SSL models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="MoCo v2 vs MoCo v2 + LCR on the synthetic set (CPU).")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--init", default=None, help="backbone init file (default: shipped)")
    p.add_argument("--epochs", type=int, default=None, help="SSL epochs per run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="Train (and evaluate) one configuration.")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("evaluate", help="Evaluate a model.pt in both pooling modes.")
    p.add_argument("--checkpoint", type=Path, required=True)
    _add_config_flags(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("visualize", help="Figure: image, GradCAM of SSL loss, rationale.")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("fig.png"))
    p.add_argument("--n", type=int, default=6, help="images in the figure")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("init", help="Pretrain a small backbone on the generic synthetic set.")
    p.add_argument("--out", required=True)
    p.add_argument("--widths", type=int, nargs=4, default=[16, 32, 64, 128])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--images-per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("export-synthetic", help="Write the synthetic set in CUB layout.")
    p.add_argument("--root", required=True)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--images-per-class", type=int, default=40)
    p.add_argument("--test-images-per-class", type=int, default=20)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``lcr-lightly`` console script."""
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
