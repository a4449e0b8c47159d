"""The official recipes against this library's earlier defaults, under both evaluation protocols.

From real ImageNet weights (EfficientNet-Lite0) at 224 px (a 7x7 last map, as the paper's
ResNet-50), on the synthetic fine-grained set (the shipped config ``official_study``),
CPU. Each run trains once, keeps every epoch and is scored by
:func:`lcr_lightly.experiments.protocol.run_protocols`: the honest protocol (the fixed
budget, and the epoch chosen on the validation split) and, labelled, the official scripts'
(each metric's best epoch on the test split).

Rows, over paired seeds:

* ``mocov2``: the ImageNet initialisation alone; MoCo v2; + LCR with the official MoCo
  preset (``GradCAMFitLoss.official("moco")``, GradCAM of the query view only, batch-wide
  min-max at inference); + LCR at this library's earlier defaults (``tau=0.4``, max-scaled
  target, batch mean, pinned in the config); the official preset with the per-image map at
  inference; the official MoCo loss alone (every view, per-image map), which this study made
  the library's default loss.
* ``byol``: BYOL; + LCR with the official BYOL preset (``official("byol")``, view 1 only).
  EfficientNet-Lite0 has no stem max-pool, so the official BYOL backbone's change
  (``stem_pool: false``) does not apply to it.

Per seed the study file holds ``{PROTOCOL_POOLING: metrics}`` with PROTOCOL ``budget``,
``val`` or ``official`` (test-split metrics under each protocol) or ``valsplit`` (the
validation split's retrieval at the fixed budget, on which defaults are decided) and
POOLING ``gap``, ``rationale`` or ``norm`` (feature-norm pooling), which
``results_tables.py`` turns into RESULTS.md's tables. Finished runs are reused, so the same
command after a kill continues where it stopped.

    python benchmarks/official_study.py --methods mocov2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml

from lcr_lightly.atomic import atomic_write
from lcr_lightly.experiments.config import ExperimentConfig, config_path
from lcr_lightly.experiments.protocol import run_protocols
from lcr_lightly.experiments.provenance import provenance

CONFIG = Path(config_path("official_study"))
# The names the study file gives each protocol of protocol.summarize.
PROTOCOL_KEYS = {"fixed_budget": "budget", "val_selected": "val", "official": "official"}

VARIANTS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "mocov2": {
        "init only (no training)": {"lcr": False, "epochs": 0},
        "MoCo v2": {"lcr": False},
        "+ LCR (official MoCo preset)": {
            "official_loss": "moco",
            "views": "first",
            "normalize": "batch",
        },
        # the loss of official_study.yaml: this library's defaults before this study
        "+ LCR (earlier defaults)": {},
        # which part of the official recipe matters: inference per image, then loss alone
        "+ LCR (official MoCo preset, per-image map)": {
            "official_loss": "moco",
            "views": "first",
        },
        "+ LCR (official MoCo loss only)": {"official_loss": "moco"},
    },
    "byol": {
        "BYOL": {"method": "byol", "lcr": False},
        "+ LCR (official BYOL preset)": {
            "method": "byol",
            "official_loss": "byol",
            "views": "first",
        },
    },
}


def flatten(result: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """``{protocol: {pooling: metrics}}`` as ``{PROTOCOL_POOLING: metrics}``.

    Adds ``valsplit_POOLING``: the validation split's retrieval at the fixed budget (what
    defaults are decided on).
    """
    out = {
        f"{PROTOCOL_KEYS[name]}_{pooling}": metrics
        for name, poolings in result["protocols"].items()
        for pooling, metrics in poolings.items()
    }
    for pooling, metrics in result["epochs"][-1]["val"].items():
        out[f"valsplit_{pooling}"] = metrics
    return out


def finished(cfg: ExperimentConfig) -> Any:
    """The stored result of an identical finished run, or None."""
    path = Path(cfg.out_dir) / "protocols.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    current = replace(cfg, checkpoint_every=1).to_dict()
    defaults = ExperimentConfig().to_dict()
    # a field added since the run was stored must be at its default (the run did not set it)
    same = all(stored["config"].get(k, defaults[k]) == v for k, v in current.items())
    return stored if same else None


def run(
    method: str,
    base: ExperimentConfig,
    seeds: Sequence[int],
    out: Path,
    command: str,
    tag: str = "",
) -> Dict[str, List[Dict[str, Any]]]:
    """Every variant of ``method`` over seeds; writes ``<out>/official_<method><tag>.json``."""
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in VARIANTS[method]}
    start = time.time()
    for seed in seeds:  # seeds outermost: the file holds paired rows after every seed
        for name, changes in VARIANTS[method].items():
            cfg = replace(
                base,
                seed=seed,
                out_dir=f"outputs/official/{method}{tag}/{name}/{seed}",
                **changes,
            )
            result = finished(cfg) or run_protocols(cfg, keep_checkpoints=False)
            runs[name].append(flatten(result))
            print(
                f"[{time.time() - start:6.0f}s] {name} seed {seed}: "
                + ", ".join(f"{key} mAP {100 * m['mAP']:.1f}" for key, m in runs[name][-1].items()),
                flush=True,
            )
        out.mkdir(parents=True, exist_ok=True)
        data = {
            "base": base.to_dict(),
            "provenance": provenance(base.weights, base.backbone),
            "command": command,
            "runs": runs,
        }
        atomic_write(out / f"official_{method}{tag}.json", json.dumps(data, indent=2))
    return runs


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(VARIANTS), default=["mocov2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--only", nargs="+", default=None, help="run only these rows")
    parser.add_argument(
        "--tag", default="", help="suffix of the study file and run folders (another setting)"
    )
    args = parser.parse_args(list(argv) or None)
    if args.only:  # e.g. to spread the rows of one seed over processes
        for method in args.methods:
            VARIANTS[method] = {k: v for k, v in VARIANTS[method].items() if k in args.only}
    values = yaml.safe_load(args.config.read_text())
    values.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    base = ExperimentConfig.from_dict({**values, "progress": False})
    command = (
        f"python benchmarks/official_study.py --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))}"
        + (f" --config {args.config}" if args.config != CONFIG else "")
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + (f" --only {' '.join(repr(r) for r in args.only)}" if args.only else "")
        + (f" --tag {args.tag}" if args.tag else "")
    )
    for method in args.methods:
        run(method, base, args.seeds, args.out, command, args.tag)


if __name__ == "__main__":
    main()
