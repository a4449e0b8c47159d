"""Token backbones (ViTs): their patch tokens as a feature map, and which block to hook.

A ViT has no spatial map and pools its tokens in code (class token or mean). LCR treats
the patch tokens of one transformer block as a (B, C, h, w) map: :class:`TokenMap` drops
the prefix (class/register) tokens and lays the rest out on the patch grid the ViT
declares (timm's ``patch_embed.grid_size``), and :func:`find_token_layer` picks the last
block whose patch tokens reach the loss.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

from torch import Tensor, nn

Grid = Tuple[int, int]


def tokens_to_map(
    tokens: Tensor, num_prefix_tokens: int = 1, grid: Optional[Grid] = None
) -> Tensor:
    """Turns ViT tokens (B, N, C) into a feature map (B, C, h, w).

    Args:
        tokens: Token sequence of shape (B, N, C), prefix (class/register) tokens first.
        num_prefix_tokens: How many leading tokens to drop.
        grid: The patch grid (h, w); used when it holds exactly the patch tokens (a ViT
            run at its declared size), else the tokens must form a square.

    Returns:
        Feature map of shape (B, C, h, w).

    Raises:
        ValueError: If the patch tokens fit neither ``grid`` nor a square.
    """
    if tokens.dim() != 3:
        raise ValueError(f"Expected tokens of shape (B, N, C), got {tuple(tokens.shape)}.")
    patches = tokens[:, num_prefix_tokens:, :]
    n = patches.shape[1]
    if grid is not None and grid[0] * grid[1] == n:
        h, w = grid
    else:
        h = w = int(round(n**0.5))
        if h * w != n:
            raise ValueError(
                f"{n} patch tokens (after dropping {num_prefix_tokens} prefix tokens) fit "
                f"neither the declared grid {grid} nor a square; pass a reshape callable "
                "for this backbone (or run it at its declared image size)."
            )
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)


class TokenMap:
    """The reshape of one ViT's tokens to maps (a picklable callable).

    Args:
        num_prefix_tokens: Leading class/register tokens to drop.
        grid: The declared patch grid (h, w), or None (square).
    """

    def __init__(self, num_prefix_tokens: int, grid: Optional[Grid] = None) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid

    def __call__(self, tokens: Tensor) -> Tensor:
        """(B, N, C) tokens as a (B, C, h, w) map."""
        return tokens_to_map(tokens, self.num_prefix_tokens, self.grid)

    def __repr__(self) -> str:
        return f"TokenMap(num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid})"


class TokenLayer(NamedTuple):
    """The block of a ViT whose patch tokens LCR reads.

    Attributes:
        name: Dotted name of the block inside the backbone.
        module: The block.
        width: Embedding width (channels of the map).
        reshape: Its tokens-to-map reshape.
    """

    name: str
    module: nn.Module
    width: int
    reshape: TokenMap


def _child_names(blocks: nn.Sequential) -> List[str]:
    """The names of ``blocks``' children by position, shared (weight-tied) blocks included.

    ``named_children`` lists a module once however often it is a child.
    """
    return [n for n, _ in blocks.named_modules(remove_duplicate=False) if n and "." not in n]


def _grid(patch_embed: object) -> Optional[Grid]:
    grid = getattr(patch_embed, "grid_size", None)
    if isinstance(grid, (tuple, list)) and len(grid) == 2:
        return int(grid[0]), int(grid[1])
    return None


def find_token_layer(backbone: nn.Module) -> Optional[TokenLayer]:
    """Finds the transformer block of a ViT backbone whose patch tokens LCR reads.

    Recognises timm ``VisionTransformer`` (``blocks``, ``patch_embed``), lightly's
    ``MaskedVisionTransformerTIMM`` (a timm ViT under ``.vit``) and torchvision's
    ``VisionTransformer`` (``encoder.layers``, ``class_token``).

    Args:
        backbone: The backbone module.

    Returns:
        The :class:`TokenLayer`, or None when the backbone is not a recognised ViT.
        When the ViT pools with its class token, the patch tokens *output* by the last
        block never reach the loss (their GradCAM is zero), so the block before it is
        returned; with average pooling the last block is.
    """
    vit = getattr(backbone, "vit", backbone)
    prefix = "vit." if vit is not backbone else ""
    blocks = getattr(vit, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) and hasattr(vit, "patch_embed"):
        width = int(getattr(vit, "embed_dim", 0) or getattr(vit, "num_features", 0))
        reshape = TokenMap(int(getattr(vit, "num_prefix_tokens", 1)), _grid(vit.patch_embed))
        token_pooled = getattr(vit, "global_pool", "token") in ("token", "")
        i = len(blocks) - 2 if token_pooled and len(blocks) > 1 else len(blocks) - 1
        return TokenLayer(f"{prefix}blocks.{_child_names(blocks)[i]}", blocks[i], width, reshape)
    encoder = getattr(vit, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) and hasattr(vit, "class_token"):
        width = int(getattr(vit, "hidden_dim", 0))
        side = getattr(vit, "image_size", 0) // max(getattr(vit, "patch_size", 1), 1)
        i = max(len(layers) - 2, 0)  # torchvision pools with the class token
        # torchvision names its blocks encoder_layer_0, ...: the real dotted name.
        name = f"{prefix}encoder.layers.{_child_names(layers)[i]}"
        return TokenLayer(name, layers[i], width, TokenMap(1, (side, side) if side else None))
    return None
