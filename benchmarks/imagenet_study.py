"""LCR from an ImageNet-trained backbone: recipe chosen on validation, then seeds on test.

EfficientNet-Lite0 with real ImageNet weights (``weights: imagenet``), the synthetic
fine-grained set at 128 px (``lcr_lightly/experiments/configs/imagenet_synthetic.yaml``), CPU.

1. Recipe, on the synthetic set's **validation** split (seed 0): every (base lr, momentum
   encoder EMA) pair of the grid, for the baseline and for LCR alike. Each method keeps the
   pair with the best validation score of its own representation (baseline: GAP; LCR:
   rationale pooling; mAP for MoCo v2, linear top-1 for BYOL, the paper's metrics).
2. Seeds on the **test** split, each method at its own recipe: the initialisation alone,
   the baseline, LCR (defaults, official preset, ``detach_features``, nu sweep for MoCo v2).

Results: ``benchmarks/results/imagenet_<method>_recipe.*`` and ``imagenet_<method>.*``.

    python benchmarks/imagenet_study.py --methods mocov2
    python benchmarks/imagenet_study.py --methods byol --lrs 0.03 0.3 1.0 --momenta 0.999
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from synthetic_ablation import base_config, run_study

from lcr_lightly.experiments.config import config_path

CONFIG = Path(config_path("imagenet_synthetic"))
LRS = (0.003, 0.03, 0.3)
MOMENTA = (0.99, 0.999)
# (pooling, metric) each method is judged by on validation, as in the paper's tables.
SELECT = {"mocov2": "mAP", "byol": "linear"}


def grid(
    method: str, lrs: Sequence[float] = LRS, momenta: Sequence[float] = MOMENTA
) -> Dict[str, Dict[str, Any]]:
    """The recipe grid: base lr x EMA momentum, with and without LCR."""
    return {
        f"{'LCR' if lcr else 'baseline'} lr={lr} m={m}": {
            "method": method,
            "lcr": lcr,
            "lr": lr,
            "ema_momentum": m,
        }
        for lcr in (False, True)
        for lr in lrs
        for m in momenta
    }


def choose(
    raw: Dict[str, List[Dict[str, Any]]], variants: Dict[str, Dict[str, Any]], metric: str
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The best recipe of the baseline (GAP) and of LCR (rationale pooling), on validation."""
    best: Dict[bool, Tuple[float, Dict[str, Any]]] = {}
    for name, runs in raw.items():
        lcr = bool(variants[name]["lcr"])
        pooling = "rationale" if lcr else "gap"
        score = float(np.mean([r[pooling][metric] for r in runs]))
        recipe = {k: variants[name][k] for k in ("lr", "ema_momentum")}
        if lcr not in best or score > best[lcr][0]:
            best[lcr] = (score, recipe)
    return best[False][1], best[True][1]


def seed_variants(baseline: Dict[str, Any], lcr: Dict[str, Any], method: str) -> Dict[str, Any]:
    """The rows of the test-split study, each method at its own recipe."""
    rows: Dict[str, Dict[str, Any]] = {
        "init only (no training)": {"method": method, "lcr": False, "epochs": 0},
        "baseline (no LCR)": {"method": method, "lcr": False, **baseline},
        "LCR default (nu=0.01)": {"method": method, **lcr},
    }
    if method == "mocov2":
        rows.update(
            {
                "official preset (sum, views=first)": {
                    "method": method,
                    "official_loss": True,
                    "views": "first",
                    **lcr,
                },
                "LCR detach_features": {"method": method, "detach_features": True, **lcr},
                "LCR nu=0.001": {"method": method, "weight": 0.001, **lcr},
                "LCR nu=0.1": {"method": method, "weight": 0.1, **lcr},
            }
        )
    return rows


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["mocov2", "byol"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=list(LRS), help="base learning rates of the grid"
    )
    parser.add_argument(
        "--momenta", type=float, nargs="+", default=list(MOMENTA), help="EMA momenta of the grid"
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(list(argv) or None)

    def flag(name: str, values: Sequence[Any], default: Sequence[Any]) -> str:
        return f" --{name} {' '.join(map(str, values))}" if tuple(values) != tuple(default) else ""

    command = (
        f"python benchmarks/imagenet_study.py --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))}"
        + flag("lrs", args.lrs, LRS)
        + flag("momenta", args.momenta, MOMENTA)
        + (f" --config {args.config}" if args.config != CONFIG else "")
        + (f" --set {' '.join(args.set)}" if args.set else "")
    )
    base = base_config(args.config, args.set)
    for method in args.methods:
        variants = grid(method, args.lrs, args.momenta)
        raw = run_study(
            f"imagenet_{method}_recipe",
            variants,
            replace(base, eval_split="val"),
            [0],
            args.out,
            command=command,
        )
        baseline, lcr = choose(raw, variants, SELECT[method])
        print(f"{method}: recipe chosen on validation: baseline {baseline}, LCR {lcr}", flush=True)
        run_study(
            f"imagenet_{method}",
            seed_variants(baseline, lcr, method),
            base,
            args.seeds,
            args.out,
            command=command,
        )


if __name__ == "__main__":
    main()
