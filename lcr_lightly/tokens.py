"""Token backbones (ViTs): their patch tokens as a feature map, and which block to hook.

A ViT has no spatial map and pools its tokens in code (class token or mean). LCR treats
the patch tokens of one transformer block as a (B, C, h, w) map: :func:`tokens_to_map`
drops the prefix (class/register) tokens and lays the rest out on the patch grid, and
:func:`find_token_layer` picks the last block whose patch tokens reach the loss.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn


def tokens_to_map(tokens: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Turns ViT tokens (B, N, C) into a feature map (B, C, h, w).

    Args:
        tokens: Token sequence of shape (B, N, C), prefix (class/register) tokens first.
        num_prefix_tokens: How many leading tokens to drop.

    Returns:
        Feature map of shape (B, C, h, w) with h = w = sqrt(N - num_prefix_tokens).

    Raises:
        ValueError: If the remaining tokens do not form a square grid.
    """
    if tokens.dim() != 3:
        raise ValueError(f"Expected tokens of shape (B, N, C), got {tuple(tokens.shape)}.")
    patches = tokens[:, num_prefix_tokens:, :]
    n = patches.shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(
            f"{n} patch tokens (after dropping {num_prefix_tokens} prefix tokens) do not "
            "form a square grid; pass a reshape callable for this backbone."
        )
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)


def _child_names(blocks: nn.Sequential) -> List[str]:
    """The names of ``blocks``' children by position, shared (weight-tied) blocks included.

    ``named_children`` lists a module once however often it is a child.
    """
    return [n for n, _ in blocks.named_modules(remove_duplicate=False) if n and "." not in n]


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
        return f"{prefix}blocks.{_child_names(blocks)[i]}", blocks[i], width, prefix_tokens
    encoder = getattr(vit, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) and hasattr(vit, "class_token"):
        width = int(getattr(vit, "hidden_dim", 0))
        i = max(len(layers) - 2, 0)  # torchvision pools with the class token
        # torchvision names its blocks encoder_layer_0, ...: the real dotted name.
        return f"{prefix}encoder.layers.{_child_names(layers)[i]}", layers[i], width, 1
    return None
