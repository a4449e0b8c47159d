"""Data and model factories of an experiment: what a config builds, before any training.

:func:`make_data` builds the SSL training set and the evaluation splits
(:class:`DataBundle`), :func:`make_model` the (LCR-wrapped) SSL model, and
:func:`load_model` that model with a checkpoint's weights. ``dataset: folder`` pretrains
on every image under ``data_root`` without labels (:class:`~lcr_lightly.data.UnlabeledFolder`);
its evaluation uses ``eval_root`` (``train/`` and ``test/`` class folders, read as
``dataset: imagefolder``) or is skipped with :data:`NO_LABELS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import pytorch_lightning as pl
from torch import nn
from torch.utils.data import Dataset, Subset

from lcr_lightly.data import (
    CUB200,
    DatasetNotFoundError,
    SyntheticFineGrained,
    UnlabeledFolder,
    cifar100,
    eval_transform,
    fgvc_aircraft,
    image_folder,
    ssl_transform,
    stanford_cars,
)
from lcr_lightly.data.fgvc import CUBLocalization
from lcr_lightly.eval import stratified_split
from lcr_lightly.experiments.checkpointing import CheckpointError, read_checkpoint
from lcr_lightly.experiments.config import (
    GENERIC_INIT,
    ConfigError,
    ExperimentConfig,
    weights_file,
)
from lcr_lightly.lightning import with_common_rationale
from lcr_lightly.models import METHODS, SmallResNet
from lcr_lightly.models.pretrained import IMAGENET
from lcr_lightly.rationale import SUBMODULE

# The environment variable each real data set's loader reads when data_root is null.
ROOT_VARIABLES = {
    "cub": "LCR_CUB_ROOT",
    "cars": "LCR_CARS_ROOT",
    "aircraft": "LCR_AIRCRAFT_ROOT",
    "cifar100": "LCR_CIFAR100_ROOT",
}

# Fraction of each training class held out when ``eval_split`` is ``"val"`` (real data).
VAL_FRACTION = 0.1

NO_LABELS = (
    "evaluation skipped: dataset 'folder' has no labels (pass --eval-root DIR with train/ "
    "and test/ class folders to evaluate retrieval, kNN and the linear probe)"
)


# Each data set's folder layout, as ``--help`` shows it.
DATASET_LAYOUTS = """data sets (--dataset, --data-root DIR; nothing is ever downloaded):
  synthetic    generated in memory (no --data-root)
  cub          DIR = the extracted CUB_200_2011 folder: images.txt, image_class_labels.txt,
               train_test_split.txt, images/<class>/<image>.jpg (bounding_boxes.txt and
               parts/part_locs.txt add localisation); or set LCR_CUB_ROOT
  cars         DIR holds stanford_cars/ in torchvision's layout; or set LCR_CARS_ROOT
  aircraft     DIR holds fgvc-aircraft-2013b/ in torchvision's layout; or LCR_AIRCRAFT_ROOT
  cifar100     DIR holds cifar-100-python/{train,test,meta}; or set LCR_CIFAR100_ROOT
  imagefolder  DIR/train/<class>/<image> and DIR/test/<class>/<image> (same class names)
An image that cannot be decoded stops the run with its file name.
"""


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
    else:  # the config's Literal type admits no other value
        make_train, make_test = pairs[cfg.dataset]
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


def folder_bundle(cfg: ExperimentConfig, views: Any) -> Any:
    """The data bundle of ``dataset: folder`` (``num_classes`` 0 without ``eval_root``).

    Args:
        cfg: The experiment config.
        views: The SSL multi-view transform.

    Returns:
        A :class:`DataBundle`.
    """
    ssl_train = UnlabeledFolder(str(cfg.data_root), transform=views)
    if cfg.eval_root is None:
        plain = ssl_train.with_transform(eval_transform(cfg.image_size))
        return DataBundle(ssl_train, plain, plain, 0, masks=False)
    labelled = make_data(
        replace(cfg, dataset="imagefolder", data_root=cfg.eval_root, eval_root=None)
    )
    return DataBundle(
        ssl_train, labelled.train_eval, labelled.test_eval, labelled.num_classes, masks=False
    )


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
    has_head = any(k.startswith(SUBMODULE + ".") for k in state)
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
