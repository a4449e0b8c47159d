"""Rationale pooling: min-max normalisation, weighted and feature-norm pooling, the hook.

At inference the rationale map ``A``, min-max normalised per image (``A'``), weights the
average pooling of the feature map ``F``: ``mean_hw(A' * F)``. The
:class:`RationalePooling` hook puts that in place of the output of the backbone's global
average pool (found by :func:`lcr_lightly.layers.find_feature_path`), so ``model(x)``
returns rationale-pooled features without editing the model; :class:`PoolingCheck` warns
when a forward in eval mode ran none of the hooked pools. :func:`norm_pool` is the
parameter-free baseline that weights positions by their feature norm.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Protocol

import torch
from torch import Tensor, nn

from lcr_lightly.hooks import LayerHook, OwnedHook


class _Pooler(Protocol):
    def pool(self, features: Tensor) -> Tensor: ...


class PoolingOwner(Protocol):
    """What the pooling hooks read from their owner, a :class:`~lcr_lightly.CommonRationale`."""

    pooling: str
    pool_in_training: bool
    pool_calls: int
    pool_calls_seen: int

    @property
    def head(self) -> _Pooler:
        """The head whose ``pool`` replaces average pooling."""

    @property
    def pool_names(self) -> List[str]:
        """Dotted names of the hooked pools."""


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
        return shifted / (span + eps) if span > 0 else torch.ones_like(maps)
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


POOLING_MODES = ("gap", "rationale")


class RationalePooling(LayerHook):
    """Replaces the output of a global pooling module by rationale pooling.

    Active when the pooling module is in eval mode and ``owner.pooling == "rationale"``
    (or in training mode too when ``owner.pool_in_training`` is set, an ablation of the
    paper's failing variant; never for a momentum/teacher copy, ``eval_only``).

    Args:
        pool: The global average pool that consumes the feature map.
        owner: The :class:`CommonRationale` whose head pools.
        eval_only: Never pool in training mode (pools of momentum/teacher copies).
    """

    def __init__(self, pool: nn.Module, owner: PoolingOwner, eval_only: bool) -> None:
        self.owner = owner
        self.eval_only = eval_only
        super().__init__(pool)

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> Optional[Tensor]:
        """Returns the rationale-pooled features shaped like ``output``."""
        owner = self.owner
        if owner.pooling != "rationale":
            return None
        if module.training and (self.eval_only or not owner.pool_in_training):
            return None
        features = args[0] if args else None
        if not isinstance(features, Tensor) or features.dim() != 4:
            return None
        owner.pool_calls += 1
        pooled = owner.head.pool(features)
        return pooled.reshape(output.shape).to(output.dtype)


class PoolingCheck(OwnedHook):
    """Warns when ``model(x)`` in eval mode with rationale pooling ran none of the pools.

    A forward hook on the wrapped model: ``set_pooling("rationale")`` is then never a
    silent no-op (a ``forward`` that evaluates an encoder LCR did not hook, or pools
    functionally, warns). O(1) per call. A copy of the model gets a copy of the check
    that watches the copy's own ``common_rationale``.

    Args:
        owner: The model's :class:`CommonRationale`.
    """

    def __init__(self, owner: PoolingOwner) -> None:
        self.owner = owner

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """Warns if no rationale pooling happened since the previous call."""
        owner = self.owner
        pooled = owner.pool_calls != owner.pool_calls_seen
        owner.pool_calls_seen = owner.pool_calls
        if module.training or owner.pooling != "rationale" or pooled:
            return
        pools = ", ".join(map(repr, owner.pool_names))
        warnings.warn(
            f"{type(module).__name__}(x) ran in eval mode with rationale pooling, but none of "
            f"the pools LCR hooks ({pools}) ran: its output is not "
            "rationale-pooled. Its forward evaluates another encoder or pools functionally; "
            "pool the feature map with common_rationale.head.pool(map), or pass pool=.",
            RuntimeWarning,
            stacklevel=2,
        )
