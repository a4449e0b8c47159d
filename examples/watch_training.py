"""Watching LCR train: the maps and validation retrieval per pooling, in TensorBoard.

MoCo v2 + LCR from the demo's start (ImageNet-trained EfficientNet-Lite0, synthetic
fine-grained set at 128 px, the demo's recipe and 8 epochs), with two callbacks added to
an ordinary Lightning Trainer: ``RationaleMaps`` and ``RetrievalMonitor`` on the
synthetic *validation* split, and ``ModelCheckpoint`` keeping the epoch with the best
validation rationale-pooling mAP. Afterwards the TensorBoard file is read back to draw
the curves (GAP vs rationale vs feature-norm pooling per epoch) and to save the last
map figure.

    OMP_NUM_THREADS=1 nice python examples/watch_training.py --figures docs  # ~3.5 CPU min
    python examples/watch_training.py --tiny        # seconds (used by the tests)
    tensorboard --logdir outputs/watch_training     # the same, live
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lcr_lightly import RationaleMaps, RetrievalMonitor
from lcr_lightly.experiments.build import make_data, make_model
from lcr_lightly.experiments.config import ExperimentConfig
from lcr_lightly.experiments.demo import demo_config

POOLINGS = {"gap": "GAP", "rationale": "rationale (LCR)", "norm": "feature norm"}
TINY = dict(
    backbone="small_resnet",
    widths=[8, 8, 16, 16],
    weights=None,
    image_size=32,
    num_classes=3,
    images_per_class=4,
    test_images_per_class=4,
    batch_size=4,
    memory_bank_size=8,
    epochs=2,
)


def curves_figure(history: dict, best_epoch: int, path: Path, title: str) -> None:
    """mAP and rank-1 per epoch for the three poolings (epoch 0: the start)."""
    fig = Figure(figsize=(8, 3.2), dpi=110, layout="constrained")
    for ax, (metric, label) in zip(fig.subplots(1, 2), [("mAP", "mAP"), ("rank1", "rank-1")]):
        for pooling, name in POOLINGS.items():
            values = 100 * np.asarray(history[f"val/{metric}_{pooling}"])
            ax.plot(range(len(values)), values, marker="o", ms=3, label=name)
        ax.axvline(best_epoch + 1, color="grey", ls=":", lw=1)
        ax.set_xlabel("epochs trained")
        ax.set_ylabel(f"{label} on the validation split (%)")
        ax.grid(alpha=0.3)
    ax.text(best_epoch + 1, ax.get_ylim()[0], " kept", color="grey", fontsize=8, va="bottom")
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    FigureCanvasAgg(fig)
    fig.savefig(path)


def main(tiny: bool = False, out_dir: str = "", figures: str = "") -> dict:
    """Trains and writes the figures; ``tiny`` without ``out_dir`` works in a temporary folder."""
    if tiny and not out_dir:
        with tempfile.TemporaryDirectory() as scratch:
            return run(tiny, Path(scratch), figures)
    return run(tiny, Path(out_dir or "outputs/watch_training"), figures)


def run(tiny: bool, out: Path, figures: str) -> dict:
    cfg = demo_config(str(out), eval_split="val", progress=False)
    if tiny:
        cfg = ExperimentConfig(**{**cfg.to_dict(), **TINY})
    data = make_data(cfg)  # eval_split val: test_eval is the synthetic validation split
    model = make_model(cfg)  # MoCo v2 wrapped with LCR (seeded)
    val = data.test_eval
    step = max(len(val) // 6, 1)  # the split is ordered by class: one image per class
    images = torch.stack([val[i * step][0] for i in range(min(6, len(val)))])

    maps = RationaleMaps(images, every_n_epochs=1)
    # gallery=DataLoader(data.train_eval) would add kNN accuracy (val/knn_*), at the cost of
    # extracting the training images every epoch too
    monitor = RetrievalMonitor(DataLoader(val, batch_size=64))
    start = monitor.compute(model)  # the initialisation, for the curves' epoch 0
    logger = TensorBoardLogger(str(out), name="tensorboard")
    best = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="best", monitor="val/mAP_rationale", mode="max"
    )
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[maps, monitor, best],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    train = DataLoader(data.ssl_train, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    began = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - began

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    history = {
        name: [value] + [s.value for s in events.Scalars(name)] for name, value in start.items()
    }
    best_epoch = int(torch.load(best.best_model_path, weights_only=False)["epoch"])
    init = "ImageNet-trained" if cfg.weights else "random"
    title = (
        f"MoCo v2 + LCR, {cfg.backbone} from {init} weights, seed {cfg.seed}\n"
        f"synthetic set: {cfg.num_classes} classes, {len(val)} validation images, "
        f"{cfg.image_size} px; kept (best val/mAP_rationale): after {best_epoch + 1} epochs"
    )
    folder = Path(figures) if figures else out
    folder.mkdir(parents=True, exist_ok=True)
    curves = folder / "watch_training_curves.png"
    curves_figure(history, best_epoch, curves, title)
    figure = folder / "watch_training_maps.png"
    figure.write_bytes(events.Images("rationale_maps")[-1].encoded_image_string)

    print("| epoch | " + " | ".join(f"mAP {p}" for p in POOLINGS) + " |")
    for epoch in range(len(history["val/mAP_gap"])):
        cells = " | ".join(f"{100 * history[f'val/mAP_{p}'][epoch]:.1f}" for p in POOLINGS)
        print(f"| {epoch} | {cells} |")
    print(f"kept: after {best_epoch + 1} epochs ({best.best_model_path}); fit {seconds:.0f} s")
    print(
        f"last call of RationaleMaps: {maps.seconds:.2f} s ({len(images)} images), of "
        f"RetrievalMonitor: {monitor.seconds:.2f} s ({len(val)} images, 3 poolings)"
    )
    print(f"wrote {curves} and {figure}")
    kl = float(trainer.callback_metrics["train_lcr_kl"])
    return {"kl": kl, "history": history, "best_epoch": best_epoch, "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out-dir", default="", help="default: outputs/watch_training")
    parser.add_argument("--figures", default="", help="folder for the two PNGs (default: out)")
    args = parser.parse_args()
    main(args.tiny, args.out_dir, args.figures)
