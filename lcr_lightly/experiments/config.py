"""The experiment configuration: typed fields, validated from Python, YAML and flags alike.

:class:`ExperimentConfig` is the single source of the fields. Their types (``Literal``
choices and jsonargparse's restricted numbers) drive both the command line (through
jsonargparse, see :func:`add_config_arguments`) and the checks in
``ExperimentConfig.__post_init__``, so ``lcr-lightly pretrain --epochs -3``, ``epochs: -3``
in YAML and ``ExperimentConfig(epochs=-3)`` fail with the same one-line
:class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import re
from argparse import ArgumentError
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
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

from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.models.backbones import is_known_backbone
from lcr_lightly.models.pretrained import IMAGENET, IMAGENET_SOURCES

if TYPE_CHECKING:  # static checkers see the plain number types
    PositiveInt = int
    NonNegativeInt = int
    FinitePositiveFloat = float
    FiniteNonNegativeFloat = float
    ScaleFloat = float
    Seed = int
else:
    from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

    FinitePositiveFloat = restricted_number_type(
        "FinitePositiveFloat", float, [(">", 0.0), ("<", math.inf)], docstring="finite float > 0"
    )
    FiniteNonNegativeFloat = restricted_number_type(
        "FiniteNonNegativeFloat",
        float,
        [(">=", 0.0), ("<", math.inf)],
        docstring="finite float >= 0",
    )
    ScaleFloat = restricted_number_type(
        "ScaleFloat", float, [(">", 0.0), ("<=", 1.0)], docstring="float in (0, 1]"
    )
    Seed = restricted_number_type(
        "Seed", int, [(">=", 0), ("<", 2**32)], docstring="int in [0, 2**32)"
    )

DATASETS = ("synthetic", "cub", "cars", "aircraft", "cifar100", "imagefolder", "folder")

DESCRIPTIONS: Dict[Any, str] = {
    PositiveInt: "an integer > 0",
    NonNegativeInt: "an integer >= 0",
    FinitePositiveFloat: "a finite number > 0",
    FiniteNonNegativeFloat: "a finite number >= 0",
    ScaleFloat: "a number in (0, 1]",
    Seed: "an integer in [0, 2**32)",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


class ConfigError(ValueError):
    """A configuration value or combination that cannot run (message: one line)."""


@dataclass
class LCRConfig:
    """LCR's options, the one place the experiment runner declares them.

    Every field but ``lcr`` and ``official_loss`` is named after the argument it sets: of
    :class:`~lcr_lightly.losses.GradCAMFitLoss` (``tau``, ``target``, ``head``,
    ``direction``, ``detach_target``, ``reduction``) or of
    :func:`~lcr_lightly.with_common_rationale` / :class:`~lcr_lightly.CommonRationale`
    (the rest), so :meth:`loss` and :meth:`wrapper_kwargs` pass them on by name.
    ``official_loss`` replaces the loss fields by ``GradCAMFitLoss.official()``.
    """

    lcr: bool = True
    k: PositiveInt = 32
    weight: FiniteNonNegativeFloat = 0.01
    tau: FinitePositiveFloat = 0.4
    target: Literal["raw", "max"] = "max"
    head: Literal["raw", "minmax"] = "raw"
    direction: Literal["forward", "reverse"] = "forward"
    detach_target: bool = True
    reduction: Literal["batchmean", "sum"] = "batchmean"
    official_loss: bool = False
    detach_features: bool = False
    gradcam_mode: Literal["elementwise", "channel"] = "elementwise"
    views: Literal["all", "first"] = "all"
    pool_in_training: bool = False
    normalize: Literal["image", "batch"] = "image"
    head_hidden: Optional[PositiveInt] = None

    def loss(self) -> GradCAMFitLoss:
        """The configured GradCAMFitLoss."""
        if self.official_loss:
            return GradCAMFitLoss.official()
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

    Attributes mirror the CLI flags (``--epochs 20`` sets ``epochs``). The defaults are
    the CPU demo's; ``benchmarks/configs/*.yaml`` hold the paper's settings. Values are
    checked (and YAML strings such as ``"3e-2"`` or ``"false"`` converted) on
    construction; a bad value raises :class:`ConfigError` naming the field.
    ``epochs: 0`` evaluates the initialisation only. ``eval_split: val`` evaluates on a
    validation split instead of the test split (the synthetic set's own ``val`` split of
    ``test_images_per_class`` images per class; for real data 10 % of each training class,
    held out of SSL training too), for choosing recipes without touching the test split.
    ``ema_momentum`` sets the momentum encoder's EMA momentum (MoCo v2's key encoder;
    BYOL's value at step 0 of its cosine schedule to 1); None keeps the method's default.
    ``checkpoint_every: N`` keeps a checkpoint every N epochs besides
    ``checkpoints/last.ckpt`` (0: only the last). ``dataset: folder`` pretrains on every
    image under ``data_root`` without labels (:class:`~lcr_lightly.data.UnlabeledFolder`);
    the evaluation then uses ``eval_root`` (``train/`` and ``test/`` class folders) or is
    skipped.
    """

    # method
    method: Literal["mocov2", "byol", "simsiam", "simclr"] = "mocov2"
    # backbone
    backbone: str = "small_resnet"
    widths: List[PositiveInt] = field(default_factory=lambda: [16, 32, 64, 128])
    weights: Optional[str] = None
    # data
    dataset: Literal[
        "synthetic", "cub", "cars", "aircraft", "cifar100", "imagefolder", "folder"
    ] = "synthetic"
    data_root: Optional[str] = None
    eval_root: Optional[str] = None
    image_size: PositiveInt = 64
    num_classes: PositiveInt = 10
    images_per_class: PositiveInt = 40
    test_images_per_class: PositiveInt = 20
    eval_split: Literal["test", "val"] = "test"
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

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        try:
            parsed = _validator().parse_object(values)
        except ArgumentError as err:  # jsonargparse's, a long multi-line message
            raise condense(str(err), values) from None
        for name in values:
            setattr(self, name, _plain(parsed[name]))
        self._check_combinations()

    def _check_combinations(self) -> None:
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


def add_config_arguments(parser: ArgumentParser) -> None:
    """Adds one typed flag per :class:`ExperimentConfig` field (``--out-dir`` for ``out_dir``).

    Booleans get ``--x [true|false]`` and ``--no-x``; lists take several values
    (``--widths 8 8 16 16``). A ``--config`` YAML file maps the same keys.

    Args:
        parser: A jsonargparse parser.
    """
    hints = get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        if hint is bool:
            parser.add_argument(
                flag, dest=f.name, type=bool, nargs="?", const=True, default=default
            )
            parser.add_argument(  # its own default must not replace the field's
                "--no-" + flag[2:],
                dest=f.name,
                action="store_false",
                default=default,
                help=f"same as {flag} false",
            )
        elif get_origin(hint) is list:
            parser.add_argument(
                flag, dest=f.name, type=get_args(hint)[0], nargs="+", default=default
            )
        else:
            parser.add_argument(flag, dest=f.name, type=hint, default=default)


@functools.lru_cache(maxsize=1)
def _validator() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False, print_config=None)
    add_config_arguments(parser)
    return parser


def _plain(value: Any) -> Any:
    """Turns jsonargparse's restricted numbers (int/float subclasses) back into int/float."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe(hint: Any) -> str:
    """Human text for a field's type, e.g. ``"an integer > 0 or null"``."""
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if origin is Union:
        parts = [describe(a) for a in get_args(hint) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(hint) else "")
    if origin is list:
        return f"a list of {describe(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return DESCRIPTIONS.get(hint, getattr(hint, "__name__", str(hint)))


def unknown_key(key: str) -> ConfigError:
    """The error for a key (or ``--flag``) that is not a field, with the closest field."""
    flag = key.startswith("-")
    close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), FIELD_NAMES, n=1)
    what = f"unknown option {key}" if flag else f"unknown config key {key!r}"
    if not close:
        return ConfigError(f"{what}; see --help.")
    name = "--" + close[0].replace("_", "-") if flag else repr(close[0])
    return ConfigError(f"{what}; did you mean {name}?")


_KEY = re.compile(r'Parser key "([\w.]+)"(?: element (\d+))?')
_VALUE = (
    re.compile(r"(?:Got|Given) value: (.*)"),
    re.compile(r"Not of type \w+: (.*?) (?:does not conform|not a number|not an integer)"),
    re.compile(r"invalid literal for int\(\) with base 10: '(.*)'"),
    re.compile(r"could not convert string to float: '(.*)'"),
)
_SUBCOMMAND_KEY = re.compile(r"\b(?:demo|pretrain|evaluate|visualize|init|export-synthetic)\.(\w+)")
_UNKNOWN = (
    re.compile(r"does not accept option '([\w.-]+)'"),
    re.compile(r'Key "([\w.-]+)" is not expected'),
    re.compile(r"unrecognized arguments: (\S+)"),
)


def condense(message: str, values: Optional[Dict[str, Any]] = None) -> ConfigError:
    """Condenses a (multi-line) jsonargparse error into one line naming key, value and type.

    Args:
        message: jsonargparse's error message.
        values: The values that were parsed (to quote the bad one exactly), if known.

    Returns:
        The :class:`ConfigError`; other messages (a command's own flags, argparse's
        usage errors) come back with their whitespace collapsed into one line.
    """
    match = _KEY.search(message)
    if match is None:
        for pattern in _UNKNOWN:
            unknown = pattern.search(message)
            if unknown is not None:
                return unknown_key(unknown.group(1))
        text = _SUBCOMMAND_KEY.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)
        return ConfigError(" ".join(text.split()) or "bad command line")
    key, element = match.group(1).rsplit(".", 1)[-1], match.group(2)  # "pretrain.k" -> "k"
    if key not in FIELD_NAMES:  # a command's own flag (--config, --n, ...)
        detail = message[match.end() :].strip(" :\n").splitlines()
        flag = "--" + key.replace("_", "-")
        return ConfigError(f"{flag}: {detail[0].strip() if detail else 'invalid value'}")
    hint = get_type_hints(ExperimentConfig)[key]
    if values is not None and key in values:
        value = values[key]
        if element is not None and isinstance(value, (list, tuple)):
            value = value[int(element) - 1]
        shown = repr(value)
    else:
        found = (p.search(message) for p in _VALUE)
        value_match = next((m for m in found if m is not None), None)
        shown = repr(value_match.group(1).strip()) if value_match else "(see --help)"
    if element is not None:
        key, hint = f"{key}[{int(element) - 1}]", get_args(hint)[0]
    return ConfigError(f"{key}: invalid value {shown}; expected {describe(hint)}.")
