"""Rationale pooling arithmetic: min-max normalisation, weighted and feature-norm pooling.

At inference the rationale map ``A``, min-max normalised per image (``A'``), weights the
average pooling of the feature map ``F``: ``mean_hw(A' * F)``. :func:`norm_pool` is the
parameter-free baseline that weights positions by their feature norm. Pure functions:
the hooks that put them in place of a model's pool are in :mod:`lcr_lightly.inference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMALIZE_MODES = ("image", "batch")


def minmax_normalize(maps: Tensor, over: str = "image", eps: float = 1e-7) -> Tensor:
    """Min-max normalises maps to [0, 1].

    Args:
        maps: Maps of shape (B, H, W).
        over: ``"image"``: each map by its own min and max (the paper);
            ``"batch"``: by the min and max of the whole batch (the official code).
        eps: Added to the range to avoid division by zero.

    Returns:
        Normalised maps of shape (B, H, W). A constant map (e.g. a 1x1 map) has no
        spatial preference and becomes all ones, so that pooling with it equals average
        pooling instead of giving zero features.
    """
    if over not in NORMALIZE_MODES:
        raise ValueError(f"Unknown normalisation {over!r}; expected one of {NORMALIZE_MODES}.")
    if over == "batch":
        low = maps.min()
        shifted = maps - low
        span = shifted.max()
        # a NaN span (non-finite maps) must stay NaN for the non-finite checks downstream
        return torch.ones_like(maps) if span == 0 else shifted / (span + eps)
    flat = maps.flatten(1)
    low = flat.min(dim=1).values
    high = flat.max(dim=1).values
    shape = (-1,) + (1,) * (maps.dim() - 1)
    out = (maps - low.view(shape)) / (high - low + eps).view(shape)
    constant = (high == low).view(shape)
    return torch.where(constant, torch.ones_like(out), out)


def weighted_average_pool(features: Tensor, weights: Tensor) -> Tensor:
    """Average pooling of a feature map weighted per position.

    Args:
        features: Feature map (B, C, H, W).
        weights: Per-position weights (B, H, W).

    Returns:
        Pooled features (B, C): ``sum_hw weights * features / (H * W)``.
    """
    b, c, h, w = features.shape
    pooled = torch.bmm(features.reshape(b, c, h * w), weights.reshape(b, h * w, 1).to(features))
    return pooled.squeeze(2) / (h * w)


def norm_pool(features: Tensor) -> Tensor:
    """Parameter-free attention pooling: weights are the per-position feature norms.

    Args:
        features: Feature map (B, C, H, W).

    Returns:
        (B, C): average pooling weighted by the per-image min-max normalised L2 norm of
        the feature vector at each position (the baseline beside the learned rationale).
    """
    return weighted_average_pool(features, minmax_normalize(features.norm(dim=1)))
