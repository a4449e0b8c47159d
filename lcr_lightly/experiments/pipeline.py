"""Experiments end to end: data, (LCR-wrapped) SSL model, training, evaluation.

Used by the CLI (``lcr-lightly pretrain/evaluate/demo``), the demo and the scripts in
``benchmarks/``. One :class:`ExperimentConfig` describes a run; every field can be set
from a YAML file and overridden on the command line.

A run writes into ``cfg.out_dir``: ``checkpoints/last.ckpt`` after every epoch (and
``checkpoints/epochNNN.ckpt`` every ``checkpoint_every`` epochs), then ``model.pt`` (the
weights with their config) and ``config.yaml`` as soon as training ends, then
``results.json``. ``run(cfg, resume=True)`` continues a killed run from ``last.ckpt``
and ends with the same weights as an uninterrupted run (on CPU). On SIGTERM training
stops after the current step, saves ``checkpoints/interrupted.ckpt`` and raises
:class:`TrainingInterrupted`; ``resume=True`` continues from whichever of the two
checkpoints is newer.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lcr_lightly.data import (
    CUB200,
    DatasetNotFoundError,
    SyntheticFineGrained,
    cifar100,
    eval_transform,
    fgvc_aircraft,
    image_folder,
    ssl_transform,
    stanford_cars,
)
from lcr_lightly.data.fgvc import CUBLocalization
from lcr_lightly.eval import (
    extract_features,
    knn_accuracy,
    linear_probe,
    localization_report,
    retrieval_metrics,
    stratified_split,
)
from lcr_lightly.experiments.atomic import atomic_write
from lcr_lightly.experiments.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    ConfigInCheckpoint,
    EpochSeededLoader,
    SigtermCheckpoint,
    read_checkpoint,
    save_model,
)
from lcr_lightly.experiments.config import (
    DATASETS,
    GENERIC_INIT,
    ConfigError,
    ExperimentConfig,
    weights_file,
)
from lcr_lightly.experiments.progress import LogProgress, quiet_lightning
from lcr_lightly.experiments.provenance import provenance
from lcr_lightly.lightning import with_common_rationale
from lcr_lightly.models import METHODS, SmallResNet
from lcr_lightly.models.pretrained import IMAGENET

__all__ = [
    "DATASETS",
    "ConfigError",
    "DataBundle",
    "EvaluationError",
    "ExperimentConfig",
    "TrainingInterrupted",
    "evaluate",
    "fit",
    "aligned_table",
    "format_table",
    "initialisation",
    "last_checkpoint",
    "resume_checkpoint",
    "load_model",
    "localize",
    "make_backbone",
    "make_data",
    "make_model",
    "mean_std",
    "run",
    "save_run",
]

CHECKPOINT_DIR = "checkpoints"
# Fields that may differ between a killed run and its resumption.
RESUME_FREE = ("out_dir", "progress", "num_workers", "accelerator", "checkpoint_every", "logger")


class EvaluationError(RuntimeError):
    """Evaluation failed after training; the trained model is saved (message: one line)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM; ``interrupted.ckpt`` holds its state (message: one line).

    Attributes:
        checkpoint: The checkpoint written at the signal.
    """

    def __init__(self, message: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


# The environment variable each real data set's loader reads when data_root is null.
ROOT_VARIABLES = {
    "cub": "LCR_CUB_ROOT",
    "cars": "LCR_CARS_ROOT",
    "aircraft": "LCR_AIRCRAFT_ROOT",
    "cifar100": "LCR_CIFAR100_ROOT",
}

# Fraction of each training class held out when ``eval_split`` is ``"val"`` (real data).
VAL_FRACTION = 0.1


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

    The synthetic test split, and a CUB test split whose root has ``bounding_boxes.txt``
    and ``parts/part_locs.txt`` (:class:`~lcr_lightly.data.fgvc.CUBLocalization`), come
    with object and part masks (``masks=True``): :func:`evaluate` then localises.

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
            split=cfg.eval_split,
            return_masks=True,
            transform=plain,
            **kw,  # type: ignore[arg-type]
        )
        ssl_train = train.with_transform(views)  # every view shares the rendered images
        synthetic_eval = train.with_transform(plain)
        return DataBundle(ssl_train, synthetic_eval, test, cfg.num_classes, masks=True)
    if cfg.dataset == "folder":  # unlabeled images; labels only from eval_root
        from lcr_lightly.experiments.folder_data import folder_bundle

        return folder_bundle(cfg, views)
    variable = ROOT_VARIABLES.get(cfg.dataset)
    if (
        cfg.data_root is None
        and variable
        and not (os.environ.get(variable) or os.environ.get("LCR_DATA_ROOT"))
    ):  # the loaders' own message speaks of root=..., the Python argument
        raise DatasetNotFoundError(
            f"No root for dataset {cfg.dataset!r}: pass --data-root DIR (data_root in a "
            f"config file) or set {variable} (or LCR_DATA_ROOT); see --help for the layout. "
            "lcr-lightly never downloads data sets."
        )
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
        root = Path(str(cfg.data_root))
        make_train = lambda t: image_folder(root / "train", t)  # noqa: E731
        make_test = lambda t: image_folder(  # noqa: E731
            root / "test", t, classes=image_folder(root / "train").classes
        )
    elif cfg.dataset in pairs:
        make_train, make_test = pairs[cfg.dataset]
    else:
        raise ConfigError(f"dataset: unknown dataset {cfg.dataset!r}; expected one of {DATASETS}.")
    train_eval: Any = make_train(tf)
    labels = getattr(train_eval, "targets", None) or getattr(train_eval, "_labels", None)
    classes = int(max(labels)) + 1 if labels is not None else len(train_eval.classes)
    if cfg.eval_split == "val":  # carve a validation split out of train, for every use
        if labels is None:
            labels = [int(train_eval[i][1]) for i in range(len(train_eval))]
        train_idx, val_idx = stratified_split(np.asarray(labels), VAL_FRACTION, cfg.data_seed)
        return DataBundle(
            Subset(make_train(views), train_idx.tolist()),
            Subset(train_eval, train_idx.tolist()),
            Subset(make_train(tf), val_idx.tolist()),
            classes,
            masks=False,
        )
    test_eval: Any = make_test(tf)
    annotated = (  # CUB with boxes and part keypoints: localisation too
        cfg.dataset == "cub"
        and cfg.eval_split == "test"
        and all(
            (test_eval.root / f).is_file() for f in ("bounding_boxes.txt", "parts/part_locs.txt")
        )
    )
    if annotated:
        test_eval = CUBLocalization(test_eval, cfg.image_size)
    return DataBundle(make_train(views), train_eval, test_eval, classes, masks=annotated)


def make_backbone(cfg: ExperimentConfig) -> Union[nn.Module, str]:
    """The backbone: a ``SmallResNet`` module (``widths``, stride-8 stem) or a name.

    Names (torchvision ResNets, timm models) are built by
    :func:`~lcr_lightly.models.build_backbone`, which also loads ``weights``
    (``"imagenet"`` or a local file).
    """
    if cfg.backbone == "small_resnet":
        return SmallResNet(widths=tuple(cfg.widths), small_input=True)
    return cfg.backbone


def make_model(cfg: ExperimentConfig, num_classes: Optional[int] = None) -> pl.LightningModule:
    """Builds the SSL model (wrapped with LCR when ``cfg.lcr``).

    Args:
        cfg: The experiment config.
        num_classes: Classes of the online linear classifier (None: no classifier).

    Returns:
        The LightningModule.
    """
    if cfg.method not in METHODS:
        raise ConfigError(
            f"method: unknown method {cfg.method!r}; expected one of {sorted(METHODS)}."
        )
    weights = weights_file(cfg.weights)
    if weights not in (None, IMAGENET) and not Path(str(weights)).is_file():
        raise ConfigError(
            f"weights: file {cfg.weights} does not exist (lcr-lightly never downloads weights; "
            "pass weights null to start from random initialisation)."
        )
    pl.seed_everything(cfg.seed, verbose=False)
    kwargs: Dict[str, Any] = dict(
        backbone=make_backbone(cfg),
        batch_size=cfg.batch_size,
        weights=weights,
        num_classes=num_classes,
        lr=cfg.lr,
        warmup_epochs=cfg.warmup_epochs,
    )
    if not cfg.stem_pool:  # only passed when set: a module built by name keeps its default
        kwargs["stem_pool"] = False
    small = cfg.backbone == "small_resnet"
    if cfg.method == "mocov2":
        kwargs["memory_bank_size"] = cfg.memory_bank_size
    if cfg.ema_momentum is not None:
        kwargs["momentum" if cfg.method == "mocov2" else "momentum_start"] = cfg.ema_momentum
    if small:  # heads sized to the small backbone
        dim = cfg.widths[-1] * 4
        if cfg.method in ("mocov2", "simclr", "byol"):
            kwargs.update(hidden_dim=dim, out_dim=128)
        else:
            kwargs.update(proj_dim=dim, pred_hidden_dim=dim // 4)
    try:
        model = METHODS[cfg.method](**kwargs)
    except ValueError as err:
        if cfg.stem_pool:
            raise
        raise ConfigError(f"stem_pool: {err}") from None
    if cfg.lcr:
        model = with_common_rationale(model, **cfg.wrapper_kwargs())
    return model


def initialisation(cfg: ExperimentConfig) -> str:
    """What a run's backbone starts from, in words (printed when a run starts).

    Example: ``"random initialisation (weights: null, no pretrained weights loaded)"``.
    """
    if cfg.weights is None:
        return "random initialisation (weights: null, no pretrained weights loaded)"
    if cfg.weights == IMAGENET:
        return f"ImageNet weights loaded (weights: imagenet, {cfg.backbone})"
    if cfg.weights == GENERIC_INIT:
        return (
            f"shipped generic-set init loaded (weights: generic_init, {weights_file(GENERIC_INIT)})"
        )
    return f"weights loaded from {cfg.weights}"


def last_checkpoint(cfg: ExperimentConfig) -> Path:
    """Where a run's latest training checkpoint is (``<out_dir>/checkpoints/last.ckpt``)."""
    return Path(cfg.out_dir) / CHECKPOINT_DIR / "last.ckpt"


def resume_checkpoint(cfg: ExperimentConfig) -> Path:
    """The checkpoint ``--resume`` continues from.

    The newer of ``last.ckpt`` and ``interrupted.ckpt`` (written on SIGTERM);
    ``last.ckpt``'s path when neither exists.
    """
    last = last_checkpoint(cfg)
    found = [p for p in (last, last.with_name(SigtermCheckpoint.FILENAME)) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else last


def check_steps(cfg: ExperimentConfig, data: DataBundle) -> None:
    """Refuses a batch larger than the training set (``drop_last`` would leave no step).

    Raises:
        ConfigError: If an epoch would have no training step.
    """
    images = len(data.ssl_train)  # type: ignore[arg-type]
    per_device = math.ceil(images / cfg.devices)
    if per_device < cfg.batch_size:
        where = f"{per_device} per device" if cfg.devices > 1 else f"{images} images"
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the training set ({where}); with "
            f"drop_last no training step would run. Use a batch size of {per_device} or less."
        )


def check_resumable(cfg: ExperimentConfig, path: Path, stored: Optional[Dict[str, Any]]) -> None:
    """Refuses to resume a checkpoint that was trained with other settings.

    Args:
        cfg: The config of the resumed run.
        path: The checkpoint.
        stored: The config stored in it.

    Raises:
        CheckpointError: If the checkpoint holds no lcr-lightly config.
        ConfigError: If a training setting differs (``RESUME_FREE`` fields may).
    """
    if stored is None:
        raise CheckpointError(
            f"not a readable lcr-lightly checkpoint: {path} (it holds no lcr-lightly config)"
        )
    current = cfg.to_dict()
    changed = [
        k for k in current if k in stored and k not in RESUME_FREE and stored[k] != current[k]
    ]
    if changed:
        diffs = ", ".join(f"{k}={stored[k]!r} there but {current[k]!r} now" for k in changed)
        raise ConfigError(
            f"cannot resume {path}: it was trained with other settings ({diffs}); resume with "
            "the same settings or start over."
        )


def _checkpoint_callbacks(folder: Path, every: int) -> List[pl.Callback]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    # enable_version_counter=False: overwrite, never write a "last-v1.ckpt" beside a stale file
    common: Dict[str, Any] = dict(dirpath=folder, enable_version_counter=False)
    periodic: Dict[str, Any] = dict(
        filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_top_k=-1
    )
    if every == 1:  # one callback: every epoch's file and last.ckpt
        return [ModelCheckpoint(every_n_epochs=1, save_last=True, **periodic, **common)]
    last = ModelCheckpoint(filename="last", every_n_epochs=1, **common)
    if every == 0:
        return [last]
    return [last, ModelCheckpoint(every_n_epochs=every, **periodic, **common)]


def _selection_callbacks(cfg: ExperimentConfig, data: DataBundle, folder: Path) -> List[Any]:
    """Retrieval on ``data.test_eval`` (the validation split), the best epoch's checkpoint, maps."""
    if cfg.eval_split != "val":  # never select on the test split
        raise ValueError("checkpoint selection needs eval_split 'val' (never the test split)")
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lcr_lightly.callbacks import RationaleMaps, RetrievalMonitor

    val: Any = data.test_eval  # the validation split when eval_split is "val"
    callbacks: List[Any] = [RetrievalMonitor(_loader(val, cfg))]
    if cfg.lcr:
        step = max(len(val) // 6, 1)
        images = torch.stack([val[i * step][0] for i in range(min(6, len(val)))])
        callbacks.append(RationaleMaps(images, num_images=len(images)))
    monitor = "val/mAP_rationale" if cfg.lcr else "val/mAP_gap"
    best = ModelCheckpoint(
        dirpath=folder, filename="best", monitor=monitor, mode="max", enable_version_counter=False
    )
    return [*callbacks, best]


def fit(
    cfg: ExperimentConfig,
    model: pl.LightningModule,
    data: DataBundle,
    resume: bool = False,
    checkpoint: Optional[Path] = None,
    select: bool = False,
) -> pl.LightningModule:
    """Trains a model with a Lightning Trainer (CSV or TensorBoard log, ``cfg.logger``).

    With ``select`` (``cfg.eval_split`` must be ``"val"`` and ``data`` made from it) it
    also scores retrieval on the validation split and draws the maps every epoch, and
    ends with the weights of the epoch whose validation mAP (rationale pooling with LCR,
    else GAP) was highest, ``checkpoints/best.ckpt``, kept by Lightning's
    ``ModelCheckpoint``.

    Checkpoints go to ``<out_dir>/checkpoints`` (see the module docstring). Every epoch
    is seeded from ``(cfg.seed, epoch)`` (:class:`EpochSeededLoader`), so a resumed run
    replays exactly what the killed run would have done.

    Args:
        cfg: The experiment config.
        model: The model.
        data: The data bundle.
        resume: Continue from :func:`resume_checkpoint` (optimizer, schedule, MoCo queue,
            epoch); otherwise checkpoints of an earlier run in ``out_dir`` are deleted.
        checkpoint: With ``resume``, continue from this file instead (e.g. an intact
            ``epochNNN.ckpt`` beside a damaged ``last.ckpt``).
        select: Select the checkpoint on validation retrieval (see above).

    Returns:
        The trained model (with ``select``, the selected epoch's weights).

    Raises:
        TrainingInterrupted: On SIGTERM, after saving ``checkpoints/interrupted.ckpt``.
        ConfigError: If the batch is larger than the training set, or the checkpoint
            to resume was trained with other settings.
        CheckpointError: If the checkpoint to resume is missing or unreadable.
    """
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    check_steps(cfg, data)
    folder = Path(cfg.out_dir) / CHECKPOINT_DIR
    ckpt_path: Optional[Path] = None
    first_epoch = 0
    if resume:
        ckpt_path = checkpoint or resume_checkpoint(cfg)
        if not ckpt_path.is_file():
            raise CheckpointError(
                f"nothing to resume: {ckpt_path} does not exist (no epoch of a run in "
                f"{cfg.out_dir} has finished)"
            )
        saved = read_checkpoint(ckpt_path, training=True)
        check_resumable(cfg, ckpt_path, saved.config)
        first_epoch = int(saved.next_epoch or 0)
    else:
        for stale in folder.glob("*.ckpt"):  # an earlier run's: never resume those
            stale.unlink()
    # on a terminal Lightning's bar; in a log file (CI, nohup, a cluster) whole lines
    log_lines = cfg.progress and not sys.stdout.isatty()
    progress = [LogProgress(cfg.batch_size * cfg.devices)] if log_lines else []
    selection = _selection_callbacks(cfg, data, folder) if select else []
    with quiet_lightning():  # the Trainer prints a tip when it is built
        trainer = pl.Trainer(
            max_epochs=cfg.epochs,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=cfg.precision,
            logger=(TensorBoardLogger if cfg.logger == "tensorboard" else CSVLogger)(
                cfg.out_dir, name="logs"
            ),
            callbacks=[
                LearningRateMonitor(logging_interval="step"),
                ConfigInCheckpoint(cfg.to_dict()),
                *selection,
                *_checkpoint_callbacks(folder, cfg.checkpoint_every),
                SigtermCheckpoint(folder),
                *progress,
            ],
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=cfg.progress,
            enable_model_summary=False,
            log_every_n_steps=1,
            deterministic=False,
        )
    loader = EpochSeededLoader(
        data.ssl_train,
        seed=cfg.seed,
        first_epoch=first_epoch,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
    )
    try:
        with quiet_lightning():
            trainer.fit(model, loader, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SystemExit with code 0: a job script would see success
        saved_at = folder / SigtermCheckpoint.FILENAME
        raise TrainingInterrupted(
            f"training stopped by SIGTERM at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; its state is saved in {saved_at}. Continue with: "
            f"lcr-lightly pretrain --out-dir {shlex.quote(str(cfg.out_dir))} --resume",
            saved_at,
        ) from None
    best = selection[-1].best_model_path if selection else ""
    if best:  # end with the epoch selected on validation retrieval
        model.load_state_dict(read_checkpoint(best).state_dict)
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

    Raises:
        ConfigError: If the data has no labels (``dataset: folder`` without ``eval_root``).
    """
    if data.num_classes == 0:
        from lcr_lightly.experiments.folder_data import NO_LABELS

        raise ConfigError(NO_LABELS.replace("evaluation skipped", "cannot evaluate"))
    wrapped = hasattr(model, "common_rationale")
    poolings = ("gap", "rationale", "norm") if wrapped else ("gap", "norm")
    bars = cfg.progress and sys.stderr.isatty()  # tqdm bars are noise in a log file
    test = extract_features(
        model,
        _loader(data.test_eval, cfg),
        poolings,
        return_maps=data.masks,
        progress=bars,
        desc="test",
        extras=data.masks,
    )
    train = extract_features(
        model, _loader(data.train_eval, cfg), poolings, progress=bars, desc="train"
    )
    results: Dict[str, Dict[str, float]] = {}
    for pooling in poolings:
        row = retrieval_metrics(test[pooling], test["labels"])
        row["knn"] = knn_accuracy(train[pooling], train["labels"], test[pooling], test["labels"])
        row.update(linear_rows(train[pooling], train["labels"], test[pooling], test["labels"], cfg))
        results[pooling] = row
    if data.masks:  # test batches are (image, label, object mask, part mask)
        results["localization"] = localize(test, test["extra0"], test["extra1"])
    return results


def linear_rows(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, cfg: ExperimentConfig
) -> Dict[str, float]:
    """Linear top-1/top-5 on all training labels and on each of ``cfg.label_fractions``.

    Returns:
        ``linear``, ``linear_top5`` (all labels) and ``linear_P``, ``linear_top5_P`` for
        each fraction P % below 100.
    """
    out: Dict[str, float] = {}
    for fraction in sorted({1.0, *cfg.label_fractions}, reverse=True):
        probe = linear_probe(
            train, train_labels, test, test_labels, label_fraction=fraction, seed=cfg.data_seed
        )
        suffix = "" if fraction == 1.0 else f"_{round(100 * fraction):d}"
        out[f"linear{suffix}"] = probe["top1"]
        out[f"linear_top5{suffix}"] = probe["top5"]
    return out


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


def run(
    cfg: ExperimentConfig,
    data: Optional[DataBundle] = None,
    resume: bool = False,
    checkpoint: Optional[Path] = None,
) -> Dict[str, Any]:
    """Builds, trains and evaluates one configuration; writes ``results.json``.

    The trained model is saved (``model.pt``, ``config.yaml``) before the evaluation
    starts, so an evaluation failure keeps it.

    Args:
        cfg: The experiment config.
        data: A data bundle to reuse (built from ``cfg`` when None).
        resume: Continue the run in ``cfg.out_dir`` from :func:`resume_checkpoint`.
        checkpoint: With ``resume``, continue from this training checkpoint instead.

    Returns:
        ``{"config": ..., "results": ..., "train_seconds": ..., "provenance": ...}``
        (commit, library versions and the initial weights' hash, see
        :mod:`lcr_lightly.experiments.provenance`).

    Raises:
        EvaluationError: If the evaluation fails (the message says how to re-run it).
    """
    data = data or make_data(cfg)
    model = make_model(cfg, num_classes=None)
    print(f"{cfg.backbone}: {initialisation(cfg)}", flush=True)  # never a silent random init
    start = time.time()
    if cfg.epochs > 0:
        fit(
            cfg,
            model,
            data,
            resume=resume,
            checkpoint=checkpoint,
            select=cfg.eval_split == "val",
        )
    elapsed = time.time() - start
    out_dir = save_run(cfg, model)
    try:
        if data.num_classes == 0:  # an unlabeled folder: nothing to score against
            from lcr_lightly.experiments.folder_data import NO_LABELS

            print(NO_LABELS)
            results: Dict[str, Any] = {}
        else:
            results = evaluate(model, data, cfg)
    except Exception as err:
        reason = str(err).strip().splitlines()
        saved_model = shlex.quote(str(out_dir / "model.pt"))
        raise EvaluationError(
            f"evaluation failed ({type(err).__name__}: {reason[0] if reason else ''}); the "
            f"trained model is saved, re-run the evaluation with: lcr-lightly evaluate "
            f"--checkpoint {saved_model}"
        ) from err
    out = {
        "config": cfg.to_dict(),
        "results": results,
        "train_seconds": elapsed,
        "provenance": provenance(cfg.weights, cfg.backbone),
    }
    atomic_write(out_dir / "results.json", json.dumps(out, indent=2))
    return out


def save_run(cfg: ExperimentConfig, model: nn.Module) -> Path:
    """Writes ``model.pt`` (weights and config) and ``config.yaml`` into ``cfg.out_dir``.

    Both are written atomically; the config inside ``model.pt`` is the one that counts
    (``config.yaml`` is a copy for reading and editing), so ``lcr-lightly
    evaluate/visualize --checkpoint <dir>/model.pt`` rebuilds exactly this model.

    Args:
        cfg: The run's config.
        model: The trained model.

    Returns:
        The output folder.
    """
    import yaml

    out = Path(cfg.out_dir)
    save_model(out / "model.pt", model.state_dict(), cfg.to_dict())
    atomic_write(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    return out


def load_model(cfg: ExperimentConfig, checkpoint: Path) -> pl.LightningModule:
    """Builds the configured model and loads weights from a checkpoint into it.

    Args:
        cfg: The config (its model fields must match the checkpoint's).
        checkpoint: A ``model.pt``, a Lightning ``.ckpt`` or a plain ``state_dict`` file.

    Returns:
        The model with the checkpoint's weights.

    Raises:
        CheckpointError: If the file is unreadable or its weights do not fit the model.
        ConfigError: If ``cfg.lcr`` disagrees with the checkpoint.
    """
    saved = read_checkpoint(checkpoint)
    state = saved.state_dict
    # the checkpoint holds every weight: the initial ones (cfg.weights) need not be at hand
    model = make_model(replace(cfg, weights=None))
    has_head = any(k.startswith("common_rationale.") for k in state)
    if has_head != cfg.lcr:
        raise ConfigError(
            f"lcr: checkpoint {checkpoint} {'has' if has_head else 'has no'} LCR head but the "
            f"config says lcr={cfg.lcr}; pass --{'lcr' if has_head else 'no-lcr'}."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
        hint = (
            ""
            if saved.config is not None
            else f"; the file holds no lcr-lightly config, so the model was built from the "
            f"flags and defaults (--backbone {cfg.backbone} --method {cfg.method}): pass the "
            "settings it was trained with, e.g. --backbone resnet18 --method mocov2"
        )
        raise CheckpointError(
            f"not a readable lcr-lightly checkpoint: {checkpoint} (its weights do not fit the "
            f"configured model: {len(missing)} missing {missing[:2]}, {len(unexpected)} "
            f"unexpected {unexpected[:2]}, {len(shapes)} of another shape {shapes[:2]}){hint}"
        ) from None
    return model


def format_table(rows: List[Tuple[str, Dict[str, float]]], keys: List[str]) -> str:
    """A Markdown table of metric rows (fractions shown as percentages).

    Args:
        rows: ``(label, metrics)`` pairs.
        keys: Metric names to show.

    Returns:
        The table.
    """
    cells = [[f"{100 * m[k]:.1f}" if k in m else "–" for k in keys] for _, m in rows]
    return aligned_table(["run", *keys], [[label, *c] for (label, _), c in zip(rows, cells)])


def aligned_table(header: List[str], rows: List[List[str]]) -> str:
    """A Markdown table whose columns line up as printed (first column left, others right).

    Args:
        header: Column titles.
        rows: Cells, one list per row.

    Returns:
        The table.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: List[str]) -> str:
        first = cells[0].ljust(widths[0])
        return (
            "| " + " | ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]) + " |"
        )

    rule = "|" + "-" * (widths[0] + 2) + "|" + "".join("-" * (w + 1) + ":|" for w in widths[1:])
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
