"""Experiments end to end: data, (LCR-wrapped) SSL model, training, evaluation.

Used by the CLI (``lcr-lightly pretrain/evaluate/demo``), the demo and the scripts in
``benchmarks/``. One :class:`ExperimentConfig` describes a run; every field can be set
from a YAML file and overridden on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lcr_lightly.data import (
    CUB200,
    SyntheticFineGrained,
    cifar100,
    eval_transform,
    fgvc_aircraft,
    image_folder,
    ssl_transform,
    stanford_cars,
)
from lcr_lightly.eval import (
    extract_features,
    knn_accuracy,
    linear_probe,
    localization_report,
    retrieval_metrics,
)
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.models import METHODS, SmallResNet
from lcr_lightly.wrap import with_common_rationale

DATASETS = ("synthetic", "cub", "cars", "aircraft", "cifar100", "imagefolder")


@dataclass
class ExperimentConfig:
    """Everything that defines one pretraining + evaluation run.

    Attributes mirror the CLI flags (``--epochs 20`` sets ``epochs``). The defaults are
    the CPU demo's; ``benchmarks/configs/*.yaml`` hold the paper's settings.
    """

    # method
    method: str = "mocov2"
    lcr: bool = True
    k: int = 32
    weight: float = 0.01
    tau: float = 0.4
    target: str = "max"
    head: str = "raw"
    direction: str = "forward"
    detach_target: bool = True
    reduction: str = "batchmean"
    official_loss: bool = False
    detach_features: bool = False
    gradcam_mode: str = "elementwise"
    views: str = "all"
    pool_in_training: bool = False
    normalize: str = "image"
    head_hidden: Optional[int] = None
    # backbone
    backbone: str = "small_resnet"
    widths: List[int] = field(default_factory=lambda: [16, 32, 64, 128])
    weights: Optional[str] = None
    # data
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    image_size: int = 64
    num_classes: int = 10
    images_per_class: int = 40
    test_images_per_class: int = 20
    data_seed: int = 0
    min_scale: float = 0.2
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: Optional[float] = None
    warmup_epochs: float = 0.0
    memory_bank_size: int = 256
    precision: str = "32-true"
    seed: int = 0
    num_workers: int = 0
    devices: int = 1
    accelerator: str = "auto"
    # output
    out_dir: str = "outputs/run"
    progress: bool = True

    def loss(self) -> GradCAMFitLoss:
        """The configured GradCAMFitLoss."""
        if self.official_loss:
            return GradCAMFitLoss.official()
        return GradCAMFitLoss(
            tau=self.tau,
            target=self.target,
            head=self.head,
            direction=self.direction,
            detach_target=self.detach_target,
            reduction=self.reduction,
        )

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> ExperimentConfig:
        """Builds a config, rejecting unknown keys with their name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}; valid keys: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The config as a plain dict."""
        return dataclasses.asdict(self)


@dataclass
class DataBundle:
    """The three views of a data set an experiment needs."""

    ssl_train: Dataset
    train_eval: Dataset
    test_eval: Dataset
    num_classes: int
    masks: bool


def make_data(cfg: ExperimentConfig) -> DataBundle:
    """Builds the SSL training set (two views) and the evaluation splits.

    Args:
        cfg: The experiment config.

    Returns:
        The data bundle.
    """
    views = ssl_transform(cfg.method, cfg.image_size, min_scale=cfg.min_scale)
    if cfg.dataset == "synthetic":
        kw = dict(num_classes=cfg.num_classes, image_size=cfg.image_size, seed=cfg.data_seed)
        plain = eval_transform(cfg.image_size, crop=False)
        train = SyntheticFineGrained(images_per_class=cfg.images_per_class, **kw)  # type: ignore[arg-type]
        test = SyntheticFineGrained(
            images_per_class=cfg.test_images_per_class,
            split="test",
            return_masks=True,
            transform=plain,
            **kw,  # type: ignore[arg-type]
        )
        ssl_train = SyntheticFineGrained(
            images_per_class=cfg.images_per_class,
            transform=views,
            **kw,  # type: ignore[arg-type]
        )
        ssl_train._cache = train._cache  # share rendered images
        synthetic_eval = SyntheticFineGrained(
            images_per_class=cfg.images_per_class,
            transform=plain,
            **kw,  # type: ignore[arg-type]
        )
        synthetic_eval._cache = train._cache
        return DataBundle(ssl_train, synthetic_eval, test, cfg.num_classes, masks=True)
    tf = eval_transform(cfg.image_size)
    pairs: Dict[str, Tuple[Any, Any]] = {
        "cub": (
            lambda t: CUB200(cfg.data_root, "train", t),
            lambda t: CUB200(cfg.data_root, "test", t),
        ),
        "cars": (
            lambda t: stanford_cars(cfg.data_root, "train", t),
            lambda t: stanford_cars(cfg.data_root, "test", t),
        ),
        "aircraft": (
            lambda t: fgvc_aircraft(cfg.data_root, "trainval", t),
            lambda t: fgvc_aircraft(cfg.data_root, "test", t),
        ),
        "cifar100": (
            lambda t: cifar100(cfg.data_root, "train", t),
            lambda t: cifar100(cfg.data_root, "test", t),
        ),
    }
    if cfg.dataset == "imagefolder":
        if cfg.data_root is None:
            raise ValueError("dataset 'imagefolder' needs data_root with train/ and test/.")
        root = Path(cfg.data_root)
        make_train = lambda t: image_folder(root / "train", t)  # noqa: E731
        make_test = lambda t: image_folder(  # noqa: E731
            root / "test", t, classes=image_folder(root / "train").classes
        )
    elif cfg.dataset in pairs:
        make_train, make_test = pairs[cfg.dataset]
    else:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; expected one of {DATASETS}.")
    train_eval: Any = make_train(tf)
    labels = getattr(train_eval, "targets", None) or getattr(train_eval, "_labels", None)
    classes = int(max(labels)) + 1 if labels is not None else len(train_eval.classes)
    return DataBundle(make_train(views), train_eval, make_test(tf), classes, masks=False)


def make_backbone(cfg: ExperimentConfig) -> nn.Module:
    """The backbone module (``small_resnet`` uses ``widths`` and a stride-8 stem)."""
    if cfg.backbone == "small_resnet":
        return SmallResNet(widths=tuple(cfg.widths), small_input=True)
    import torchvision

    if not hasattr(torchvision.models, cfg.backbone):
        raise ValueError(f"Unknown backbone {cfg.backbone!r}.")
    return getattr(torchvision.models, cfg.backbone)(weights=None)


def make_model(cfg: ExperimentConfig, num_classes: Optional[int] = None) -> pl.LightningModule:
    """Builds the SSL model (wrapped with LCR when ``cfg.lcr``).

    Args:
        cfg: The experiment config.
        num_classes: Classes of the online linear classifier (None: no classifier).

    Returns:
        The LightningModule.
    """
    if cfg.method not in METHODS:
        raise ValueError(f"Unknown method {cfg.method!r}; expected one of {sorted(METHODS)}.")
    pl.seed_everything(cfg.seed, verbose=False)
    kwargs: Dict[str, Any] = dict(
        backbone=make_backbone(cfg),
        batch_size=cfg.batch_size,
        weights=cfg.weights,
        num_classes=num_classes,
        lr=cfg.lr,
        warmup_epochs=cfg.warmup_epochs,
    )
    small = cfg.backbone == "small_resnet"
    if cfg.method == "mocov2":
        kwargs["memory_bank_size"] = cfg.memory_bank_size
    if small:  # heads sized to the small backbone
        dim = cfg.widths[-1] * 4
        if cfg.method in ("mocov2", "simclr", "byol"):
            kwargs.update(hidden_dim=dim, out_dim=128)
        else:
            kwargs.update(proj_dim=dim, pred_hidden_dim=dim // 4)
    model = METHODS[cfg.method](**kwargs)
    if cfg.lcr:
        model = with_common_rationale(
            model,
            k=cfg.k,
            weight=cfg.weight,
            loss=cfg.loss(),
            detach_features=cfg.detach_features,
            gradcam_mode=cfg.gradcam_mode,
            views=cfg.views,
            pool_in_training=cfg.pool_in_training,
            normalize=cfg.normalize,
            head_hidden=cfg.head_hidden,
        )
    return model


def fit(cfg: ExperimentConfig, model: pl.LightningModule, data: DataBundle) -> pl.LightningModule:
    """Trains a model with a Lightning Trainer (CSV log of losses and learning rate).

    Args:
        cfg: The experiment config.
        model: The model.
        data: The data bundle.

    Returns:
        The trained model.
    """
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    pl.seed_everything(cfg.seed, verbose=False)
    loader = DataLoader(
        data.ssl_train,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,  # type: ignore[arg-type]
        logger=CSVLogger(cfg.out_dir, name="logs"),
        callbacks=[LearningRateMonitor(logging_interval="step")],
        enable_checkpointing=False,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=False,
    )
    trainer.fit(model, loader)
    return model


def _loader(dataset: Dataset, cfg: ExperimentConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=max(cfg.batch_size, 64), num_workers=cfg.num_workers)


def evaluate(
    model: nn.Module, data: DataBundle, cfg: ExperimentConfig
) -> Dict[str, Dict[str, float]]:
    """Retrieval, kNN and linear probe per pooling, and localisation of the maps.

    Retrieval is leave-one-out on the test split (as CUB retrieval in the paper);
    kNN and the probe train on the training split and score the test split. No
    choice is made on the test split.

    Args:
        model: A trained model (wrapped or not).
        data: The data bundle.
        cfg: The experiment config.

    Returns:
        ``{pooling: {metric: value}}`` plus ``"localization"`` when masks exist.
    """
    wrapped = hasattr(model, "common_rationale")
    poolings = ("gap", "rationale", "norm") if wrapped else ("gap", "norm")
    test = extract_features(
        model,
        _loader(data.test_eval, cfg),
        poolings,
        return_maps=data.masks,
        progress=cfg.progress,
        desc="test",
        extras=data.masks,
    )
    train = extract_features(
        model, _loader(data.train_eval, cfg), poolings, progress=cfg.progress, desc="train"
    )
    results: Dict[str, Dict[str, float]] = {}
    for pooling in poolings:
        row = retrieval_metrics(test[pooling], test["labels"])
        row["knn"] = knn_accuracy(train[pooling], train["labels"], test[pooling], test["labels"])
        row["linear"] = linear_probe(
            train[pooling], train["labels"], test[pooling], test["labels"]
        )["top1"]
        results[pooling] = row
    if data.masks:  # test batches are (image, label, object mask, part mask)
        results["localization"] = localize(test, test["extra0"], test["extra1"])
    return results


def localize(features: Dict[str, Tensor], objects: Tensor, parts: Tensor) -> Dict[str, float]:
    """Pointing game and energy of the rationale and feature-norm maps vs masks.

    Args:
        features: Output of :func:`~lcr_lightly.eval.extract_features` with
            ``return_maps=True`` (``"norm_map"`` and, for LCR models, ``"rationale_map"``).
        objects: Object masks (N, H, W).
        parts: Discriminative-part masks (N, H, W).

    Returns:
        Flat dict: ``{map}_{mask}_{metric}`` and the chance levels.
    """
    out: Dict[str, float] = {}
    for name in ("rationale", "norm"):
        maps = features.get(f"{name}_map")
        if maps is None:
            continue
        for mask_name, masks in (("object", objects), ("part", parts)):
            rep = localization_report(maps, masks)
            out[f"{name}_{mask_name}_pointing"] = rep["pointing"]
            out[f"{name}_{mask_name}_energy"] = rep["energy"]
            out[f"chance_{mask_name}"] = rep["chance"]
    return out


def run(cfg: ExperimentConfig, data: Optional[DataBundle] = None) -> Dict[str, Any]:
    """Builds, trains and evaluates one configuration; writes ``results.json``.

    Args:
        cfg: The experiment config.
        data: A data bundle to reuse (built from ``cfg`` when None).

    Returns:
        ``{"config": ..., "results": ..., "train_seconds": ...}``.
    """
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    data = data or make_data(cfg)
    model = make_model(cfg, num_classes=None)
    start = time.time()
    if cfg.epochs > 0:
        fit(cfg, model, data)
    elapsed = time.time() - start
    results = evaluate(model, data, cfg)
    out = {"config": cfg.to_dict(), "results": results, "train_seconds": elapsed}
    save_run(cfg, model)
    Path(cfg.out_dir, "results.json").write_text(json.dumps(out, indent=2))
    return out


def save_run(cfg: ExperimentConfig, model: nn.Module) -> Path:
    """Writes ``model.pt`` (state_dict) and ``config.yaml`` into ``cfg.out_dir``.

    ``lcr-lightly evaluate/visualize --config <dir>/config.yaml --checkpoint
    <dir>/model.pt`` then rebuilds exactly this model.

    Args:
        cfg: The run's config.
        model: The trained model.

    Returns:
        The output folder.
    """
    import yaml

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    return out


def format_table(rows: List[Tuple[str, Dict[str, float]]], keys: List[str]) -> str:
    """A Markdown table of metric rows (fractions shown as percentages).

    Args:
        rows: ``(label, metrics)`` pairs.
        keys: Metric names to show.

    Returns:
        The table.
    """
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, metrics in rows:
        cells = [f"{100 * metrics[k]:.1f}" if k in metrics else "–" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


class SupervisedClassifier(pl.LightningModule):
    """A backbone + linear classifier trained with cross-entropy (init stage).

    Args:
        backbone: Backbone returning (B, D) features.
        feature_dim: D.
        num_classes: Number of classes.
        lr: AdamW learning rate (cosine schedule).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, lr: float = 2e-3):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.classifier(self.backbone(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy and accuracy."""
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        """AdamW with a cosine schedule (fast convergence from scratch on small data)."""
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def pretrain_generic_init(
    out_path: str,
    widths: Tuple[int, ...] = (16, 32, 64, 128),
    image_size: int = 64,
    num_classes: int = 8,
    images_per_class: int = 500,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    lr: float = 2e-3,
) -> Dict[str, float]:
    """Pretrains a small backbone, supervised, on the generic synthetic variant.

    The saved ``state_dict`` stands in for ImageNet weights: it is loaded through the
    same ``weights=`` path. The generic set's classes (object templates) are disjoint
    from the fine-grained set's.

    Args:
        out_path: Where to write the backbone weights (``.pth``).
        widths: SmallResNet stage widths.
        image_size: Image size.
        num_classes: Generic classes (templates), at most 8.
        images_per_class: Training images per class.
        epochs: Training epochs.
        batch_size: Batch size.
        seed: Seed (data and model).
        progress: Show progress bars.
        lr: AdamW learning rate.

    Returns:
        ``{"train_acc": ..., "test_acc": ...}`` on the generic set.
    """
    from torchvision import transforms as T

    pl.seed_everything(seed, verbose=False)
    norm = eval_transform(image_size, crop=False)
    augment = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.4, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            *norm.transforms[1:],
        ]
    )
    kw = dict(num_classes=num_classes, image_size=image_size, seed=seed, variant="generic")
    train = SyntheticFineGrained(images_per_class=images_per_class, transform=augment, **kw)  # type: ignore[arg-type]
    test = SyntheticFineGrained(images_per_class=50, split="test", transform=norm, **kw)  # type: ignore[arg-type]
    backbone = SmallResNet(widths=widths, small_input=True)
    backbone.fc = nn.Identity()  # type: ignore[assignment]
    model = SupervisedClassifier(backbone, widths[-1], num_classes, lr=lr)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=128):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    torch.save(backbone.state_dict(), out_path)
    return {
        "train_acc": float(trainer.callback_metrics.get("train_acc", torch.tensor(0.0))),
        "test_acc": correct / max(total, 1),
    }
