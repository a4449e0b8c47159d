"""Reproduce the paper's Table 2 (MoCo v2 +- Ours) and Table 3 (BYOL +- Ours).

Runs the configuration with and without LCR (same seed and budget), evaluates on the
test split and prints a table in the paper's layout with the paper's numbers beside.
The training epochs are fixed in advance (no checkpoint is chosen on the test split).

    python benchmarks/paper_tables.py --table 2 \
        --config lcr_lightly/experiments/configs/table2_mocov2_cub.yaml
    python benchmarks/paper_tables.py --table 3 \
        --config lcr_lightly/experiments/configs/table3_byol_cub_bs128.yaml

Any config field can be overridden with ``--set key=value`` (e.g. a tiny budget on the
synthetic CUB-layout export: ``--set epochs=1 backbone=small_resnet weights=null``).
Each run checkpoints every epoch into ``<out>/table<N>/{base,lcr}/checkpoints``; after a
kill, the same command with ``--resume`` continues both runs from their ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict

import yaml

from lcr_lightly.data import DatasetNotFoundError
from lcr_lightly.experiments.atomic import atomic_write
from lcr_lightly.experiments.checkpointing import CheckpointError
from lcr_lightly.experiments.config import config_path
from lcr_lightly.experiments.pipeline import (
    ConfigError,
    EvaluationError,
    ExperimentConfig,
    last_checkpoint,
    run,
)

PAPER = {
    # Table 2, CUB-200-2011 retrieval (rank-1, rank-5, mAP) and linear top-1, in %.
    2: {
        "MoCo v2": {"rank1": 17.07, "rank5": None, "mAP": None, "linear": None},
        "MoCo v2 + Ours": {"rank1": 49.69, "rank5": None, "mAP": None, "linear": None},
    },
    # Table 3, CUB-200-2011 linear top-1 (batch size 128), in %.
    3: {
        "BYOL": {"linear": 39.27},
        "BYOL + Ours": {"linear": 51.20},
    },
}


def fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", type=int, choices=[2, 3], required=True)
    parser.add_argument(
        "--config",
        type=lambda v: Path(config_path(v)),
        required=True,
        help="a YAML file or a shipped config's name (table2_mocov2_cub, ...)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides")
    parser.add_argument("--out", type=Path, default=Path("outputs/paper"))
    parser.add_argument(
        "--resume", action="store_true", help="continue runs from their last.ckpt, if any"
    )
    args = parser.parse_args()
    try:
        table(args)
    except (ConfigError, CheckpointError, DatasetNotFoundError, EvaluationError) as err:
        parser.exit(2, f"error: {err}\n")


def table(args: argparse.Namespace) -> None:
    values: Dict[str, Any] = yaml.safe_load(args.config.read_text())
    values.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    base = ExperimentConfig.from_dict(values)
    name = "MoCo v2" if args.table == 2 else "BYOL"
    rows = {}
    for lcr in (False, True):
        label = f"{name} + Ours" if lcr else name
        cfg = replace(
            base, lcr=lcr, out_dir=str(args.out / f"table{args.table}" / ("lcr" if lcr else "base"))
        )
        res = run(cfg, resume=args.resume and last_checkpoint(cfg).is_file())["results"]
        rows[label] = res["rationale"] if lcr else res["gap"]  # LCR: rationale pooling
        if lcr:
            rows[f"{label} (GAP)"] = res["gap"]
    keys = ["rank1", "rank5", "mAP", "linear"] if args.table == 2 else ["linear"]
    lines = [
        f"Table {args.table}: {base.dataset}, {base.backbone}, {base.image_size} px, "
        f"{base.epochs} epochs, batch {base.batch_size}, seed {base.seed}, init {base.weights}",
        "",
        "| method | " + " | ".join(f"{k} (ours) | {k} (paper)" for k in keys) + " |",
        "|---|" + "---:|---:|" * len(keys),
    ]
    for label, metrics in rows.items():
        paper = PAPER[args.table].get(label, {})
        cells = [f"{100 * metrics[k]:.2f} | {fmt(paper.get(k))}" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"table{args.table}.md", text + "\n")
    atomic_write(args.out / f"table{args.table}.json", json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
