"""The common rationale head (GFB): the rationale map A of a feature map.

The head is the paper's "GradCAM fitting branch": a 1x1 convolution projects the
C-channel feature map onto K directions, batch norm and ReLU follow, and the maximum
over the K responses at each position is the rationale map ``A``. At inference ``A``,
min-max normalised per image, weights the average pooling of the feature map.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from lcr_lightly._validation import check_choice, check_positive_int
from lcr_lightly.pooling import NORMALIZE_MODES, minmax_normalize, weighted_average_pool


class CommonRationaleHead(nn.Module):
    """Learns the common rationale map from a backbone's feature map.

    1x1 conv C -> K (no bias) -> BatchNorm2d -> ReLU -> max over K.

    Args:
        in_channels: Channels C of the feature map (2048 for a ResNet-50 ``layer4``).
        k: Number of projections K (the paper uses 32; 4-64 work).
        normalize: How :meth:`attention` normalises the map: ``"image"`` (the paper,
            default) or ``"batch"`` (the official code's inference, for ablation only).
        hidden_channels: If set, an MLP (1x1 conv C -> hidden, BN, ReLU, 1x1 conv ->
            K) replaces the single 1x1 conv: the paper's failing variant, for ablation.

    Example:
        >>> head = CommonRationaleHead(2048, k=32)
        >>> feats = torch.randn(8, 2048, 7, 7)
        >>> head(feats).shape, head.pool(feats).shape
        (torch.Size([8, 7, 7]), torch.Size([8, 2048]))
    """

    def __init__(
        self,
        in_channels: int,
        k: int = 32,
        normalize: str = "image",
        hidden_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        k = check_positive_int("k", k)
        if hidden_channels is not None:
            hidden_channels = check_positive_int("hidden_channels", hidden_channels)
        check_choice("normalize", normalize, NORMALIZE_MODES)
        self.in_channels = in_channels
        self.k = k
        self.normalize = normalize
        self.hidden_channels = hidden_channels
        self.mlp: Optional[nn.Module] = None
        width = in_channels
        if hidden_channels is not None:
            self.mlp = nn.Sequential(
                nn.Conv2d(in_channels, hidden_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(hidden_channels),
                nn.ReLU(inplace=True),
            )
            width = hidden_channels
        self.conv = nn.Conv2d(width, k, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(k)
        self.relu = nn.ReLU(inplace=True)

    def _check(self, features: Tensor) -> None:
        if features.dim() != 4:
            raise ValueError(
                f"CommonRationaleHead expects a (B, C, H, W) map, got {tuple(features.shape)}."
            )
        if features.shape[1] != self.in_channels:
            raise ValueError(
                f"CommonRationaleHead was built for in_channels={self.in_channels} but the "
                f"feature map has {features.shape[1]} channels; pass in_channels="
                f"{features.shape[1]} (or the right layer=)."
            )

    def projections(self, features: Tensor) -> Tensor:
        """The K projection maps after BN and ReLU.

        Args:
            features: Feature map (B, C, H, W).

        Returns:
            Projection maps (B, K, H, W).
        """
        self._check(features)
        if self.mlp is not None:
            features = self.mlp(features)
        return self.relu(self.bn(self.conv(features)))

    def forward(self, features: Tensor) -> Tensor:
        """The raw rationale map A.

        Args:
            features: Feature map (B, C, H, W).

        Returns:
            Rationale map (B, H, W), max over the K projections.
        """
        return self.projections(features).amax(dim=1)

    def attention(self, features: Tensor) -> Tensor:
        """The normalised rationale map A' in [0, 1].

        Args:
            features: Feature map (B, C, H, W).

        Returns:
            Map (B, H, W), min-max normalised per image (or per batch, see ``normalize``).
        """
        return minmax_normalize(self(features), over=self.normalize)

    def pool(self, features: Tensor) -> Tensor:
        """Rationale pooling: the average pooling of F weighted by A'.

        Args:
            features: Feature map (B, C, H, W).

        Returns:
            Pooled representation (B, C) = sum_hw A' * F / (H * W).
        """
        return weighted_average_pool(features, self.attention(features))

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        extra = f", hidden_channels={self.hidden_channels}" if self.hidden_channels else ""
        return f"in_channels={self.in_channels}, k={self.k}, normalize={self.normalize!r}{extra}"
