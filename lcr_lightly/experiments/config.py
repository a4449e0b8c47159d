"""The experiment configuration: one dataclass, validated from Python, YAML and flags alike.

:class:`ExperimentConfig` is the single source of the fields: their types (``Literal``
choices and jsonargparse's restricted numbers) are the choices and ranges, their
docstring ``Attributes`` the flags' ``--help``. :func:`check_field` converts and checks a
value against a field's type (YAML strings such as ``"3e-2"`` or ``"false"`` included),
so ``lcr-lightly pretrain --epochs -3``, ``epochs: -3`` in YAML and
``ExperimentConfig(epochs=-3)`` fail with the same one-line :class:`InvalidValue`; an
unknown key names the closest field (:func:`unknown_key`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Dict,
    List,
    Literal,
    Optional,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from jsonargparse import ArgumentParser

from lcr_lightly.experiments.values import (
    ConfigError,
    FiniteNonNegativeFloat,
    FinitePositiveFloat,
    NonNegativeInt,
    PositiveInt,
    ScaleFloat,
    Seed,
    check_field,
    describe,
)
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.models.backbones import is_known_backbone
from lcr_lightly.models.pretrained import IMAGENET, IMAGENET_SOURCES

Dataset = Literal["synthetic", "cub", "cars", "aircraft", "cifar100", "imagefolder", "folder"]
DATASETS = get_args(Dataset)

# ``weights: generic_init``: the synthetic generic-set init that ships in the package
# (lcr_lightly/assets), for small_resnet with these widths.
GENERIC_INIT = "generic_init"
GENERIC_INIT_WIDTHS = (16, 32, 64, 128)
GENERIC_INIT_FILE = Path(__file__).parent.parent / "assets" / "init_small_resnet_w16_64px.pth"

# Configs that ship in the package: ``--config NAME`` loads ``configs/NAME.yaml``.
SHIPPED_CONFIGS = Path(__file__).parent / "configs"


class UsageError(ValueError):
    """A command that cannot run as given (message: one line)."""


@dataclass
class LCRConfig:
    """LCR's options, the one place the experiment runner declares them.

    Every field but ``lcr`` and ``official_loss`` is named after the argument it sets: of
    :class:`~lcr_lightly.losses.GradCAMFitLoss` (``tau``, ``target``, ``head``,
    ``direction``, ``detach_target``, ``reduction``, ``softmax``) or of
    :func:`~lcr_lightly.with_common_rationale` / :class:`~lcr_lightly.CommonRationale`
    (the rest), so :meth:`loss` and :meth:`wrapper_kwargs` pass them on by name.
    ``official_loss`` replaces the loss fields by ``GradCAMFitLoss.official(script)``:
    ``"byol"`` (``true`` means the same, as in configs written before the MoCo preset)
    or ``"moco"``; ``false`` uses the fields.

    Attributes:
        lcr: Add the LCR head and its KL loss (false: the plain SSL baseline).
        k: Number of 1x1 projections of the head (the paper's K).
        weight: Weight of the KL term in the training loss (the paper's nu).
        tau: Softmax temperature of the KL between GradCAM and head maps.
        target: GradCAM target: raw, or max (each map divided by its maximum).
        head: Head map in the KL: raw, or minmax (min-max normalised over the batch).
        direction: KL direction: forward KL(G||A) (official code) or reverse KL(A||G) (paper).
        detach_target: Stop the gradient through the GradCAM target.
        reduction: KL reduction over the batch: batchmean or sum (official code).
        softmax: Softmax over the whole map, or over each row (official MoCo script).
        official_loss: An official script's loss, byol (or true) or moco, instead of the
            loss options; false uses them.
        detach_features: Train the head on detached feature maps.
        gradcam_mode: GradCAM per position (elementwise) or with channel weights (channel).
        views: Fit the head on all views or the first view only (official code).
        pool_in_training: Pool with the rationale in training too (default: eval only).
        normalize: Inference normalisation of the rationale: per image, or per batch.
        head_hidden: Hidden width of an MLP head instead of the 1x1 conv (null: conv).
    """

    lcr: bool = True
    k: PositiveInt = 32
    weight: FiniteNonNegativeFloat = 0.01
    tau: FinitePositiveFloat = 1.0
    target: Literal["raw", "max"] = "raw"
    head: Literal["raw", "minmax"] = "minmax"
    direction: Literal["forward", "reverse"] = "forward"
    detach_target: bool = False
    reduction: Literal["batchmean", "sum"] = "sum"
    softmax: Literal["map", "rows"] = "rows"
    official_loss: Union[bool, Literal["byol", "moco"]] = False
    detach_features: bool = False
    gradcam_mode: Literal["elementwise", "channel"] = "elementwise"
    views: Literal["all", "first"] = "all"
    pool_in_training: bool = False
    normalize: Literal["image", "batch"] = "image"
    head_hidden: Optional[PositiveInt] = None

    def loss(self) -> GradCAMFitLoss:
        """The configured GradCAMFitLoss."""
        if self.official_loss:
            script = "byol" if self.official_loss is True else str(self.official_loss)
            return GradCAMFitLoss.official(script)
        return GradCAMFitLoss(**{name: getattr(self, name) for name in LOSS_FIELDS})

    def wrapper_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`~lcr_lightly.with_common_rationale`."""
        skip = {"lcr", "official_loss", *LOSS_FIELDS}
        kwargs = {name: getattr(self, name) for name in LCR_FIELDS if name not in skip}
        return {**kwargs, "loss": self.loss()}


LCR_FIELDS = tuple(f.name for f in dataclasses.fields(LCRConfig))
LOSS_FIELDS = tuple(
    name for name in inspect.signature(GradCAMFitLoss.__init__).parameters if name != "self"
)


@dataclass
class ExperimentConfig(LCRConfig):
    """Everything that defines one pretraining + evaluation run.

    Attributes mirror the CLI flags (``--epochs 20`` sets ``epochs``); their one-line
    descriptions below are the flags' ``--help``. The defaults are a small synthetic
    run; the shipped configs (``lcr_lightly/experiments/configs/*.yaml``, ``--config
    NAME``) hold the demo's, the studies' and the paper's settings. Values are checked
    (and YAML strings such as ``"3e-2"`` or ``"false"`` converted) on construction; a bad
    value raises :class:`ConfigError` naming the field, an unknown keyword a
    ``TypeError`` naming the closest field. ``eval_split: val`` evaluates on the
    synthetic set's own ``val`` split, or for real data on 10 % of each training class
    held out of SSL training too, for choosing recipes without touching the test split.
    ``label_fractions`` lists the fractions of the training labels (stratified, seeded
    with ``data_seed``) that linear probes are trained on besides all of them (the
    paper's Table 2: 1.0 0.5 0.2).
    With ``eval_split: val`` training also scores validation retrieval every epoch
    (:class:`~lcr_lightly.callbacks.RetrievalMonitor`), keeps the epoch with the best
    ``val/mAP_rationale`` (``val/mAP_gap`` without LCR) as ``checkpoints/best.ckpt``
    through Lightning's ``ModelCheckpoint`` and ends with its weights, and draws the maps
    every epoch (:class:`~lcr_lightly.callbacks.RationaleMaps`). ``dataset: folder``
    pretrains on every image under ``data_root`` without labels
    (:class:`~lcr_lightly.data.UnlabeledFolder`); the evaluation then uses ``eval_root``
    (``train/`` and ``test/`` class folders) or is skipped.

    Attributes:
        method: Self-supervised method.
        backbone: small_resnet, a torchvision ResNet name (resnet50) or a timm model name.
        widths: Stage widths of small_resnet (4 values).
        stem_pool: Keep a ResNet backbone's stem max-pool (false: the official BYOL
            backbone, a 14x14 last map at 224 px).
        weights: Initial backbone weights: null (random), imagenet (EfficientNet-Lite0,
            extra [imagenet]), generic_init (the shipped synthetic init of small_resnet
            16 32 64 128) or a local state-dict file.
        dataset: Data set; see "data sets" below for each one's folder layout.
        data_root: Folder of the data set (see "data sets" below); not for synthetic.
        eval_root: dataset folder only: a labelled folder (train/ and test/ class folders)
            to evaluate on; null skips the evaluation.
        image_size: Training and evaluation image size in pixels.
        num_classes: Synthetic set: number of classes.
        images_per_class: Synthetic set: training images per class.
        test_images_per_class: Synthetic set: test (and val) images per class.
        eval_split: Evaluate on the test split, or on a validation split (choose recipes).
        data_seed: Seed of the synthetic set and of the validation split.
        min_scale: Smallest crop area of the SSL augmentation (RandomResizedCrop).
        epochs: SSL training epochs (0: evaluate the initialisation only).
        batch_size: Training batch size (per device).
        lr: Base learning rate (null: the method's default).
        warmup_epochs: Linear learning-rate warm-up epochs.
        memory_bank_size: MoCo v2 queue length (negatives).
        ema_momentum: Momentum encoder EMA (MoCo v2; BYOL's start); null: the method's.
        precision: Lightning training precision.
        seed: Seed of model initialisation and training.
        num_workers: DataLoader worker processes.
        devices: Number of devices to train on.
        accelerator: Lightning accelerator.
        out_dir: Run folder (checkpoints, model.pt, config.yaml, results.json, logs).
        progress: Show progress (a bar on a terminal, periodic lines in a log file).
        logger: Lightning logger: csv (map figures as PNG files) or tensorboard.
        label_fractions: Fractions of the training labels linear probes also train on.
        checkpoint_every: Keep checkpoints/epochNNN.ckpt every N epochs (0: last.ckpt only).
    """

    # method
    method: Literal["mocov2", "byol", "simsiam", "simclr"] = "mocov2"
    # backbone
    backbone: str = "small_resnet"
    widths: List[PositiveInt] = field(default_factory=lambda: [16, 32, 64, 128])
    weights: Optional[str] = None
    stem_pool: bool = True
    # data
    dataset: Dataset = "synthetic"
    data_root: Optional[str] = None
    eval_root: Optional[str] = None
    image_size: PositiveInt = 64
    num_classes: PositiveInt = 10
    images_per_class: PositiveInt = 40
    test_images_per_class: PositiveInt = 20
    eval_split: Literal["test", "val"] = "test"
    label_fractions: List[ScaleFloat] = field(default_factory=lambda: [1.0])
    data_seed: Seed = 0
    min_scale: ScaleFloat = 0.2
    # optimisation
    epochs: NonNegativeInt = 20
    batch_size: PositiveInt = 64
    lr: Optional[FinitePositiveFloat] = None
    warmup_epochs: FiniteNonNegativeFloat = 0.0
    memory_bank_size: PositiveInt = 256
    ema_momentum: Optional[ScaleFloat] = None
    precision: Literal["64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed"] = (
        "32-true"
    )
    seed: Seed = 0
    num_workers: NonNegativeInt = 0
    devices: PositiveInt = 1
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    # output
    out_dir: str = "outputs/run"
    progress: bool = True
    checkpoint_every: NonNegativeInt = 10
    logger: Literal["csv", "tensorboard"] = "csv"

    def __new__(cls, *args: Any, **kwargs: Any) -> ExperimentConfig:
        """Refuses an unknown keyword with the closest field (a ``TypeError``, as Python's)."""
        for key in kwargs:  # Python's own TypeError names no close field
            if key not in FIELD_NAMES:
                close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "; see ExperimentConfig"
                raise TypeError(f"ExperimentConfig got an unknown option {key!r}{hint}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name, hint in field_types().items():
            setattr(self, name, check_field(name, hint, getattr(self, name)))
        self.check_combinations()

    def check_combinations(self) -> None:
        """Refuses fields that are valid alone but cannot run together."""
        if self.backbone == "small_resnet":
            if len(self.widths) != 4:
                raise ConfigError(
                    f"widths: small_resnet needs 4 stage widths, got {self.widths} "
                    f"({len(self.widths)} values)."
                )
        elif not is_known_backbone(self.backbone):
            raise ConfigError(
                f"backbone: unknown backbone {self.backbone!r}; expected 'small_resnet', a "
                "torchvision ResNet name such as 'resnet50' or a timm model name such as "
                "'efficientnet_lite0'."
            )
        if self.weights == GENERIC_INIT and (
            self.backbone != "small_resnet" or list(self.widths) != list(GENERIC_INIT_WIDTHS)
        ):
            raise ConfigError(
                f"weights: {GENERIC_INIT} is the shipped init of backbone small_resnet with "
                f"widths {list(GENERIC_INIT_WIDTHS)}, not of {self.backbone!r} with widths "
                f"{self.widths}; pass weights null or a local weights file."
            )
        if self.weights == IMAGENET and self.backbone not in IMAGENET_SOURCES:
            raise ConfigError(
                f"weights: no ImageNet weights ship in a package for backbone {self.backbone!r} "
                f"(available: {sorted(IMAGENET_SOURCES)}); pass a local weights file."
            )
        if self.ema_momentum is not None and self.method not in ("mocov2", "byol"):
            raise ConfigError(
                f"ema_momentum: {self.method} has no momentum encoder; ema_momentum applies "
                "to mocov2 (key encoder) and byol (start of its cosine schedule)."
            )
        if self.dataset == "folder" and self.data_root is None:
            raise ConfigError(
                "data_root: dataset 'folder' needs data_root, a folder of images (any depth)."
            )
        if self.dataset == "imagefolder" and self.data_root is None:
            raise ConfigError(
                "data_root: dataset 'imagefolder' needs data_root with train/ and test/."
            )

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> ExperimentConfig:
        """Builds a config, rejecting unknown keys with their name.

        Raises:
            ConfigError: For an unknown key or a bad value.
        """
        for key in values:
            if key not in FIELD_NAMES:
                raise unknown_key(key)
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The config as a plain dict."""
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


@functools.lru_cache(maxsize=1)
def field_types() -> Dict[str, Any]:
    """Each field's type (``Literal``, restricted number, ``Optional``, ``List``)."""
    return get_type_hints(ExperimentConfig)


def shipped_configs() -> List[str]:
    """Names of the configs that ship in the package (``--config NAME``)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_path(value: str) -> str:
    """A ``--config`` value as a file: an existing path, else a shipped config's name.

    Args:
        value: A YAML file, or the name of a shipped config with or without ``.yaml``.

    Returns:
        The path (``value`` itself when no shipped config has that name, so that the
        parser reports the missing file).
    """
    if Path(value).expanduser().is_file():
        return value
    shipped = SHIPPED_CONFIGS / (value if value.endswith(".yaml") else value + ".yaml")
    return str(shipped) if "/" not in value and shipped.is_file() else value


def weights_file(weights: Optional[str]) -> Optional[str]:
    """The ``weights`` field as build_backbone takes it: ``generic_init`` becomes its file."""
    return str(GENERIC_INIT_FILE) if weights == GENERIC_INIT else weights


def add_config_arguments(parser: ArgumentParser) -> None:
    """Adds one flag per :class:`ExperimentConfig` field (``--out-dir`` for ``out_dir``).

    Booleans get ``--x [true|false]`` and ``--no-x``; lists take several values
    (``--widths 8 8 16 16``). The flags take any text: :class:`ExperimentConfig` converts
    and checks the values (:func:`check_field`), so flags, YAML and Python give the same
    errors. A ``--config`` YAML file maps the same keys.

    Args:
        parser: A jsonargparse parser.
    """
    docs = field_docs()
    for f in dataclasses.fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = field_types()[f.name]
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        doc = f"{docs.get(f.name)} (type: {describe(hint)})"
        if hint is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const=True, default=default, help=doc)
            parser.add_argument(  # its own default must not replace the field's
                "--no-" + flag[2:],
                dest=f.name,
                action="store_false",
                default=default,
                help=f"same as {flag} false",
            )
        else:
            nargs = "+" if get_origin(hint) is list else None
            parser.add_argument(flag, dest=f.name, nargs=nargs, default=default, help=doc)


@functools.lru_cache(maxsize=1)
def field_docs() -> Dict[str, str]:
    """Each field's one-line description (its ``--help``).

    Read from the ``Attributes`` sections of the config classes' docstrings by
    docstring-parser, the parser jsonargparse uses for docstrings.
    """
    import docstring_parser

    docs: Dict[str, str] = {}
    for cls in reversed(ExperimentConfig.__mro__):
        for param in docstring_parser.parse(cls.__doc__ or "").params:
            if param.args[0] == "attribute" and param.description:
                docs[param.arg_name] = " ".join(param.description.split())
    return docs


def unknown_key(key: str) -> ConfigError:
    """The error for a key (or ``--flag``) that is not a field, with the closest field."""
    flag = key.startswith("-")
    close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), FIELD_NAMES, n=1)
    what = f"unknown option {key}" if flag else f"unknown config key {key!r}"
    if not close:
        return ConfigError(f"{what}; see --help.")
    name = "--" + close[0].replace("_", "-") if flag else repr(close[0])
    return ConfigError(f"{what}; did you mean {name}?")
