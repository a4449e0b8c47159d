"""The modules an exported embedder is made of: plain ``nn.Module`` s, no hooks.

:class:`Embedder` runs features, an optional pool, ``flatten(1)`` and L2 normalisation;
:class:`RationalePool` is the head's rationale pooling in place of a global average
pool; :class:`LayerOutput` is an encoder cut after its feature layer, as a map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from lcr_lightly.heads import CommonRationaleHead


class RationalePool(nn.Module):
    """The head's rationale pooling as a module, in place of a global average pool.

    Args:
        head: The trained :class:`~lcr_lightly.CommonRationaleHead`.
        keepdim: Return (B, C, 1, 1) like ``nn.AdaptiveAvgPool2d`` (else (B, C)).
        reshape: Turns the pool's input into (B, C, H, W) (a channels-last map), or None.
    """

    def __init__(
        self,
        head: CommonRationaleHead,
        keepdim: bool,
        reshape: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.keepdim = keepdim
        self.reshape = reshape

    def forward(self, features: Tensor) -> Tensor:
        """Pools a map (B, C, H, W) into (B, C) or (B, C, 1, 1)."""
        if self.reshape is not None:
            features = self.reshape(features)
        pooled = self.head.pool(features)
        return pooled[:, :, None, None] if self.keepdim else pooled


class LayerOutput(nn.Module):
    """An encoder cut after its feature layer (an fx graph), its output as a map.

    Args:
        graph: ``create_feature_extractor`` output returning ``{"map": layer output}``.
        reshape: Callable turning the layer output into (B, C, H, W) (ViT tokens), or None.
        tokens: ``(prefix tokens, grid height, grid width)`` when ``reshape`` is a
            :class:`~lcr_lightly.tokens.TokenMap`: the same operations with the grid
            fixed, so that ``torch.jit.trace`` does not see it computed from a shape.
    """

    def __init__(
        self,
        graph: nn.Module,
        reshape: Optional[Callable[[Tensor], Tensor]],
        tokens: Optional[Tuple[int, int, int]] = None,
    ) -> None:
        super().__init__()
        self.graph = graph
        self.reshape = reshape
        self.tokens = tokens

    def forward(self, images: Tensor) -> Tensor:
        """The feature map (B, C, H, W) of a batch of images."""
        out = self.graph(images)["map"]
        if self.tokens is not None:
            prefix, height, width = self.tokens
            patches = out[:, prefix:, :]
            return patches.transpose(1, 2).reshape(
                patches.shape[0], patches.shape[2], height, width
            )
        return self.reshape(out) if self.reshape is not None else out


@dataclass(frozen=True)
class EmbedderInfo:
    """What an :class:`Embedder` computes (printed by ``lcr-lightly export``).

    Attributes:
        encoder: Name of the encoder in the model (``""``: the model itself).
        layer: Dotted name of the feature layer in the model (None: unwrapped model).
        pool: Dotted name of the replaced pool, or None (cut after the layer, or GAP).
        pooling: ``"rationale"`` or ``"gap"``.
        normalize: Whether the output rows are L2-normalised.
        input_size: (C, H, W) of the example batch the export was checked on.
        out_dim: Width D of the embedding.
    """

    encoder: str
    layer: Optional[str]
    pool: Optional[str]
    pooling: str
    normalize: bool
    input_size: Tuple[int, int, int]
    out_dim: int

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict."""
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        return out


class Embedder(nn.Module):
    """A hook-free image embedder: features, optional pooling, flatten, L2 norm.

    Built by :func:`export_embedder`; a plain module that ``torch.jit.trace``,
    ``torch.export.export``, ``torch.compile`` and ``torch.onnx.export`` accept.

    Args:
        features: Images (B, C, H, W) to features (an encoder copy, or a cut encoder).
        pool: Applied to the features when not None (rationale pooling of a cut encoder).
        normalize: L2-normalise the output rows.
        info: What the module computes.
    """

    def __init__(
        self,
        features: nn.Module,
        pool: Optional[nn.Module],
        normalize: bool,
        info: EmbedderInfo,
    ) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.normalize = normalize
        self.info = info

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings (B, D) of images (B, C, H, W)."""
        out = self.features(images)
        if self.pool is not None:
            out = self.pool(out)
        out = out.flatten(1)
        if self.normalize:
            out = nn.functional.normalize(out, dim=1)
        return out
