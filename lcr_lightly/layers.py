"""Finding the feature layer and the global pooling of a backbone.

LCR works on the last convolutional stage of a backbone (``layer4`` of a ResNet, a
7x7 map at 224 px). This module finds that stage automatically for torchvision and
timm ResNets and for lightly-style ``nn.Sequential(*list(resnet.children())[:-1])``
backbones, resolves explicit overrides given as a dotted name or a module, and finds
the global pooling module that follows the stage so that it can be replaced by
rationale pooling at inference.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

from torch import nn

LayerSpec = Union[str, nn.Module, None]

_POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _candidates(root: nn.Module) -> Iterator[str]:
    for name, module in root.named_modules():
        if name and _has_conv(module):
            yield name


def _candidate_text(root: nn.Module, limit: int = 12) -> str:
    names = list(_candidates(root))
    # Prefer the shallow names (stages) over every nested conv.
    names.sort(key=lambda n: (n.count("."), 0))
    shown = names[:limit]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in shown) + more if shown else "none"


def find_feature_layer(backbone: nn.Module) -> Tuple[str, nn.Module]:
    """Finds the last convolutional stage of a backbone.

    The rule: a ``layer4`` attribute (torchvision and timm ResNets) wins; otherwise the
    last direct child that contains a ``Conv2d`` (lightly-style ``nn.Sequential``
    backbones, where the children are ``conv1 ... layer4, avgpool``).

    Args:
        backbone: The backbone module.

    Returns:
        The dotted name of the stage inside ``backbone`` and the stage module.

    Raises:
        ValueError: If the backbone has no convolutional stage.
    """
    layer4 = getattr(backbone, "layer4", None)
    if isinstance(layer4, nn.Module) and _has_conv(layer4):
        return "layer4", layer4
    last: Optional[Tuple[str, nn.Module]] = None
    for name, child in backbone.named_children():
        if _has_conv(child):
            last = (name, child)
    if last is None:
        if isinstance(backbone, nn.Conv2d):
            return "", backbone
        raise ValueError(
            f"Cannot find a convolutional stage in backbone {type(backbone).__name__}: it "
            "contains no nn.Conv2d. LCR needs a spatial feature map (B, C, H, W); pass "
            "layer=<dotted name or module> (and reshape= for token maps of a ViT)."
        )
    return last


def resolve_layer(root: nn.Module, layer: LayerSpec) -> Tuple[str, nn.Module]:
    """Resolves a layer given by dotted name, by module, or automatically.

    Args:
        root: Module to search (a backbone or a whole model).
        layer: ``None`` for automatic discovery, a dotted name relative to ``root``
            (``"layer4"``, ``"backbone.7"``) or the module itself.

    Returns:
        The dotted name and the module.

    Raises:
        ValueError: If the name does not exist or the module is not part of ``root``;
            the message lists the candidate layers.
    """
    if layer is None:
        return find_feature_layer(root)
    if isinstance(layer, nn.Module):
        for name, module in root.named_modules():
            if module is layer:
                return name, module
        raise ValueError(
            f"The given layer module ({type(layer).__name__}) is not part of "
            f"{type(root).__name__}. Candidates: {_candidate_text(root)}."
        )
    if isinstance(layer, str):
        modules = dict(root.named_modules())
        if layer not in modules:
            raise ValueError(
                f"No layer named {layer!r} in {type(root).__name__}. "
                f"Candidates: {_candidate_text(root)}."
            )
        return layer, modules[layer]
    raise TypeError(f"layer must be None, a dotted name or an nn.Module, not {type(layer)}.")


def find_token_layer(backbone: nn.Module) -> Optional[Tuple[str, nn.Module, int, int]]:
    """Finds the last transformer block of a ViT backbone.

    Recognises timm ``VisionTransformer`` (``blocks``, ``patch_embed``), lightly's
    ``MaskedVisionTransformerTIMM`` (a timm ViT under ``.vit``) and torchvision's
    ``VisionTransformer`` (``encoder.layers``, ``class_token``).

    Args:
        backbone: The backbone module.

    Returns:
        ``(dotted name, block, embedding width, number of prefix tokens)`` or None when
        the backbone is not a recognised ViT. Prefix (class/register) tokens come first.
        When the ViT pools with its class token, the patch tokens *output* by the last
        block never reach the loss (their GradCAM is zero), so the block before it is
        returned; with average pooling the last block is.
    """
    vit = getattr(backbone, "vit", backbone)
    prefix = "vit." if vit is not backbone else ""
    blocks = getattr(vit, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) and hasattr(vit, "patch_embed"):
        width = int(getattr(vit, "embed_dim", 0) or getattr(vit, "num_features", 0))
        prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        token_pooled = getattr(vit, "global_pool", "token") in ("token", "")
        i = len(blocks) - 2 if token_pooled and len(blocks) > 1 else len(blocks) - 1
        return f"{prefix}blocks.{i}", blocks[i], width, prefix_tokens
    encoder = getattr(vit, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) and hasattr(vit, "class_token"):
        width = int(getattr(vit, "hidden_dim", 0))
        i = max(len(layers) - 2, 0)  # torchvision pools with the class token
        return f"{prefix}encoder.layers.{i}", layers[i], width, 1
    return None


def _is_global_pool(module: nn.Module) -> bool:
    if isinstance(module, _POOL_TYPES):
        return True
    # timm's SelectAdaptivePool2d and other adaptive poolers.
    name = type(module).__name__.lower()
    return "adaptive" in name and "pool" in name


def find_global_pool(root: nn.Module, layer: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """Finds the global pooling module that follows ``layer`` inside ``root``.

    Modules are visited in registration order (the order of a ResNet's forward); the
    first pooling module after ``layer`` that is not inside it is returned.

    Args:
        root: The backbone or model that contains ``layer``.
        layer: The feature layer.

    Returns:
        ``(name, module)`` or ``None`` when the backbone pools functionally (no module).
    """
    seen_layer = False
    inside = {id(m) for m in layer.modules()}
    for name, module in root.named_modules():
        if module is layer:
            seen_layer = True
            continue
        if seen_layer and id(module) not in inside and _is_global_pool(module):
            return name, module
    return None


def infer_channels(layer: nn.Module) -> Optional[int]:
    """Infers the number of output channels of a conv stage from its last conv/BN.

    Args:
        layer: A convolutional stage.

    Returns:
        The channel count, or ``None`` when it cannot be read off the modules.
    """
    channels: Optional[int] = None
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
        elif isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
    return channels
