"""Ablations and method comparisons on the synthetic fine-grained set, over seeds.

Each study is one command, e.g.::

    python benchmarks/synthetic_ablation.py --study loss --seeds 0 1 2

Every variant trains from the same backbone initialisation with the same data, budget
and seeds; results (mean +- std over seeds, test split, leave-one-out retrieval) go to
``benchmarks/results/<study>.md`` and ``.json``. Fields of ``ExperimentConfig`` can be
overridden for all variants with ``--set key=value``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from lcr_lightly.experiments.build import make_data
from lcr_lightly.experiments.config import LCR_FIELDS, ExperimentConfig, config_path
from lcr_lightly.experiments.provenance import provenance
from lcr_lightly.experiments.report import mean_std
from lcr_lightly.experiments.train import run

LOSS_VARIANTS: Dict[str, Dict[str, Any]] = {
    "baseline (no LCR)": {"lcr": False},
    "LCR default": {},
    "target raw": {"target": "raw"},
    "head batch-min-max": {"head": "minmax"},
    "KL reverse (paper eq. 6)": {"direction": "reverse"},
    "live target": {"detach_target": False},
    "reduction sum": {"reduction": "sum"},
    "official preset (views=first)": {"official_loss": True, "views": "first"},
    "detach_features": {"detach_features": True},
    "channel-weighted GradCAM": {"gradcam_mode": "channel"},
    "batch normalisation at inference": {"normalize": "batch"},
    "rationale pooling in training": {"pool_in_training": True},
    "MLP head (hidden 128)": {"head_hidden": 128},
}

STUDIES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "main": {"baseline (no LCR)": {"lcr": False}, "LCR default": {}},
    "headline": {
        "baseline (no LCR)": {"lcr": False},
        "LCR nu=0.01": {"weight": 0.01},
        "LCR nu=1": {"weight": 1.0},
        "LCR nu=1, detach_features": {"weight": 1.0, "detach_features": True},
        "official preset (nu=0.01, sum, views=first)": {"official_loss": True, "views": "first"},
    },
    "loss": LOSS_VARIANTS,
    "k": {
        "baseline (no LCR)": {"lcr": False},
        **{f"K={k}": {"k": k} for k in (1, 4, 8, 16, 32, 64)},
    },
    "weight": {
        "baseline (no LCR)": {"lcr": False},
        **{f"nu={w}": {"weight": w} for w in (1.0, 0.1, 0.01, 0.001)},
    },
    "lr": {
        f"{'LCR' if lcr else 'baseline'} lr={lr}": {"lr": lr, "lcr": lcr}
        for lr in (0.003, 0.03, 0.3)
        for lcr in (False, True)
    },
    "methods": {
        f"{m}{' + LCR' if lcr else ''}": {"method": m, "lcr": lcr}
        for m in ("mocov2", "byol", "simsiam", "simclr")
        for lcr in (False, True)
    },
}

SYNTHETIC_INIT = Path(config_path("synthetic_init"))
METRICS = ("rank1", "rank5", "mAP", "knn", "linear")
# Config fields that do not change what a run computes.
_NOT_IN_KEY = ("out_dir", "progress")


# Fields a run without LCR never reads.
_LCR_ONLY = tuple(name for name in LCR_FIELDS if name != "lcr")


def run_key(config: Dict[str, Any]) -> str:
    """What identifies a run's result.

    The config without output folder and progress bar, and without the LCR options when
    LCR is off (a baseline is the same run whatever they say).
    """
    unused = _NOT_IN_KEY + (_LCR_ONLY if not config.get("lcr", True) else ())
    return json.dumps({k: v for k, v in config.items() if k not in unused}, sort_keys=True)


def finished_runs(root: Path) -> Dict[str, Path]:
    """``run_key -> results.json`` for every finished run under ``root``.

    A run is reused only when its whole config (seed, method, every loss option, budget,
    init file) equals the requested one, whichever study produced it, so adding seeds to a
    study or re-running an interrupted one trains only what is missing.
    """
    found: Dict[str, Path] = {}
    for path in sorted(root.glob("**/results.json")):
        try:
            found[run_key(json.loads(path.read_text())["config"])] = path
        except (OSError, ValueError, KeyError):
            continue
    return found


def summarize(per_seed: List[Dict[str, Any]]) -> Dict[str, Dict[str, List[float]]]:
    """Metric lists per pooling over seeds."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for res in per_seed:
        for pooling, metrics in res.items():
            for key, value in metrics.items():
                out.setdefault(pooling, {}).setdefault(key, []).append(value)
    return out


def table(rows: Dict[str, Dict[str, Dict[str, List[float]]]]) -> str:
    """Markdown: one line per variant and pooling, mean +- std in %."""
    lines = [
        "| variant | pooling | " + " | ".join(METRICS) + " | object pointing | part pointing |",
        "|---|---|" + "---:|" * (len(METRICS) + 2),
    ]
    for variant, res in rows.items():
        loc = res.get("localization", {})
        for pooling in ("gap", "rationale", "norm"):
            if pooling not in res:
                continue
            cells = []
            for key in METRICS:
                m, s = mean_std(res[pooling][key])
                cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
            for mask in ("object", "part"):
                key = f"rationale_{mask}_pointing" if pooling == "rationale" else ""
                if pooling == "norm":
                    key = f"norm_{mask}_pointing"
                if key and key in loc:
                    m, s = mean_std(loc[key])
                    cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
                else:
                    cells.append("")
            lines.append(f"| {variant} | {pooling} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def references(study: str, names: List[str]) -> Dict[str, str]:
    """``variant -> baseline variant`` it is compared with, seed by seed.

    ``methods``: ``"byol + LCR"`` against ``"byol"``; ``lr``: ``"LCR lr=x"`` against
    ``"baseline lr=x"`` (likewise in ``*_recipe`` grids); every other study: against
    ``"baseline (no LCR)"``. A baseline maps to itself (its non-GAP poolings are compared
    with its GAP).
    """
    out: Dict[str, str] = {}
    for name in names:
        if study == "methods":
            ref = name.replace(" + LCR", "")
        elif study == "lr" or study.endswith("_recipe"):
            ref = name.replace("LCR", "baseline")
        else:
            ref = "baseline (no LCR)"
        if ref in names:
            out[name] = ref
    return out


def paired_table(rows: Dict[str, Dict[str, Dict[str, List[float]]]], pairs: Dict[str, str]) -> str:
    """Markdown: per-seed differences of each variant against its baseline's GAP row.

    Seeds are paired (same data order and initialisation), which removes most of the
    seed-to-seed spread that the unpaired table shows. A baseline's own other poolings
    are included (e.g. parameter-free feature-norm pooling). Cells: mean +- std of the
    difference in points, and on how many seeds it is positive.
    """
    lines = [
        "| variant | pooling | baseline | " + " | ".join(METRICS) + " |",
        "|---|---|---|" + "---:|" * len(METRICS),
    ]
    for variant, ref in pairs.items():
        if variant not in rows or ref not in rows:
            continue
        reference = rows[ref]["gap"]
        for pooling in ("gap", "rationale", "norm"):
            if variant == ref and pooling == "gap":
                continue
            res = rows[variant].get(pooling)
            if res is None or len(res["rank1"]) != len(reference["rank1"]):
                continue
            cells = []
            for key in METRICS:
                diffs = [100 * (a - b) for a, b in zip(res[key], reference[key])]
                m, sd = mean_std(diffs)
                wins = sum(d > 1e-6 for d in diffs)  # not float summation-order noise
                cells.append(f"{m:+.1f} ± {sd:.1f} ({wins}/{len(diffs)})")
            lines.append(f"| {variant} | {pooling} | {ref}, GAP | " + " | ".join(cells) + " |")
    title = (
        "\n\nPaired per-seed differences against the baseline's GAP row, in points "
        "(mean ± std; in brackets: seeds with a difference above zero).\n\n"
    )
    return title + "\n".join(lines) if len(lines) > 2 else ""


def base_config(config: Optional[Path] = None, sets: Sequence[str] = ()) -> ExperimentConfig:
    """The studies' base: the shipped ``synthetic_init`` config, a YAML file, ``key=value``s."""
    values = yaml.safe_load(SYNTHETIC_INIT.read_text())
    base = ExperimentConfig(**values, out_dir="outputs/ablation", progress=False)
    if config is not None:
        base = replace(base, **yaml.safe_load(config.read_text()))
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in sets)}
    return replace(base, **overrides)


def run_study(
    study: str,
    variants: Dict[str, Dict[str, Any]],
    base: ExperimentConfig,
    seeds: Sequence[int],
    out: Path = Path("benchmarks/results"),
    tag: str = "",
    command: str = "",
    rerun: bool = False,
) -> Dict[str, List[Dict[str, Any]]]:
    """Trains and evaluates every variant over seeds; writes ``<out>/<study><tag>.md/.json``.

    Args:
        study: Study name (file stem and output folder).
        variants: ``{row name: config changes}``.
        base: The base config.
        seeds: Seeds.
        out: Folder of the result files.
        tag: Suffix of the result files.
        command: The command that reproduces the study (shown in the table's header).
        rerun: Train every run even if an identical one finished.

    Returns:
        ``{row name: [results of each seed]}``.
    """
    rows: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    raw: Dict[str, List[Dict[str, Any]]] = {}
    cache = {} if rerun else finished_runs(Path("outputs/ablation"))
    data = make_data(base)
    start = time.time()
    split = "validation" if base.eval_split == "val" else "test"
    for name, changes in variants.items():
        per_seed = []
        for seed in seeds:
            cfg: ExperimentConfig = replace(
                base, seed=seed, out_dir=f"outputs/ablation/{study}/{name}/{seed}", **changes
            )
            cached = cache.get(run_key(cfg.to_dict()))
            if cached is not None:
                res = json.loads(cached.read_text())["results"]
                origin = f" (reused {cached.parent})"
            else:
                same_data = cfg.method == base.method and cfg.image_size == base.image_size
                res = run(cfg, data if same_data else make_data(cfg))["results"]
                origin = ""
                if not rerun:  # a later variant of this study may be the same run
                    cache[run_key(cfg.to_dict())] = Path(cfg.out_dir) / "results.json"
            per_seed.append(res)
            print(
                f"[{time.time() - start:6.0f}s] {name} seed {seed}{origin}: "
                + ", ".join(
                    f"{p}/rank1={100 * r['rank1']:.1f}" for p, r in res.items() if "rank1" in r
                ),
                flush=True,
            )
        rows[name] = summarize(per_seed)
        raw[name] = per_seed
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{study}{tag}"
        shown = {k: v for k, v in base.to_dict().items() if k != "progress"}
        header = (
            f"Study `{study}` on the synthetic set (CPU), seeds {list(seeds)}; base config:\n\n"
            f"```\n{yaml.safe_dump(shown, sort_keys=True)}```\n"
            f"Command: `{command}`\n\nMean ± std over seeds, in %. Retrieval: leave-one-out "
            f"on the {split} split. kNN / linear: train split -> {split} split. Pointing: argmax "
            f"of the map inside the mask ({split} split).\n\n"
        )
        paired = paired_table(rows, references(study, list(variants)))
        stem.with_suffix(".md").write_text(header + table(rows) + paired + "\n")
        stem.with_suffix(".json").write_text(
            json.dumps(
                {
                    "base": base.to_dict(),
                    "provenance": provenance(base.weights, base.backbone),
                    "command": command,
                    "runs": raw,
                },
                indent=2,
            )
        )
    print(table(rows) + paired_table(rows, references(study, list(variants))))
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=None, help="YAML base config")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument(
        "--rerun", action="store_true", help="train every run even if an identical one finished"
    )
    args = parser.parse_args()
    variants = STUDIES[args.study]
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    command = (
        f"python benchmarks/synthetic_ablation.py --study {args.study} --seeds "
        f"{' '.join(map(str, args.seeds))}"
        + (f" --config {args.config}" if args.config else "")
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + (f" --tag {args.tag}" if args.tag else "")
    )
    base = base_config(args.config, args.set)
    run_study(args.study, variants, base, args.seeds, args.out, args.tag, command, args.rerun)


if __name__ == "__main__":
    main()
