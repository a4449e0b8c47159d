"""Localisation metrics of attention maps against masks and part keypoints.

Maps (B, h, w) are bilinearly resized to the masks' (B, H, W). Each metric comes with
its chance level so that a number is read against what a random map would get. The
masks themselves are drawn by :mod:`lcr_lightly.data.masks` (``keypoint_masks`` is
re-exported here).
"""

from __future__ import annotations

from typing import Dict, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lcr_lightly._validation import check_finite_rows
from lcr_lightly.data.masks import keypoint_masks

__all__ = [
    "energy_inside",
    "keypoint_masks",
    "localization_report",
    "mask_area",
    "pointing_game",
]


def _as_tensor(x: Union[Tensor, np.ndarray]) -> Tensor:
    return x.detach().float().cpu() if isinstance(x, Tensor) else torch.as_tensor(x).float()


def _resize(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _prepare(maps: Union[Tensor, np.ndarray], masks: Union[Tensor, np.ndarray]) -> tuple:
    m = _as_tensor(maps)
    check_finite_rows("maps", m, rows_are="images")
    k = _as_tensor(masks) > 0.5
    if m.dim() != 3 or k.dim() != 3 or m.shape[0] != k.shape[0]:
        raise ValueError(
            f"maps must be (B, h, w) and masks (B, H, W), got {tuple(m.shape)} and "
            f"{tuple(k.shape)}."
        )
    return _resize(m, (k.shape[1], k.shape[2])), k


def pointing_game(maps: Union[Tensor, np.ndarray], masks: Union[Tensor, np.ndarray]) -> float:
    """Fraction of images whose map maximum falls inside the mask.

    Images with an empty mask are left out. A constant map (e.g. an all-zero GradCAM)
    points nowhere and counts as a miss, so that it cannot score by where its first
    pixel happens to be; the chance level of a random map stays :func:`mask_area`.

    Args:
        maps: Attention maps (B, h, w), finite.
        masks: Binary masks (B, H, W).

    Returns:
        Hit rate in [0, 1].

    Raises:
        ValueError: If all masks are empty or a map holds NaN or inf.
    """
    m, k = _prepare(maps, masks)
    valid = k.flatten(1).any(1)
    if not valid.any():
        raise ValueError("All masks are empty.")
    flat = m.flatten(1)
    arg = flat.argmax(1)
    constant = flat.amax(1) == flat.amin(1)
    hits = k.flatten(1).gather(1, arg[:, None])[:, 0] & ~constant
    return float(hits[valid].float().mean())


def energy_inside(maps: Union[Tensor, np.ndarray], masks: Union[Tensor, np.ndarray]) -> float:
    """Mean fraction of (non-negative) attention energy inside the mask.

    Args:
        maps: Attention maps (B, h, w), finite; negative values are clipped to 0.
        masks: Binary masks (B, H, W).

    Returns:
        Mean fraction in [0, 1] over images with a non-empty mask and non-zero map.

    Raises:
        ValueError: If no image qualifies or a map holds NaN or inf.
    """
    m, k = _prepare(maps, masks)
    m = m.clamp_min(0).flatten(1)
    total = m.sum(1)
    inside = (m * k.flatten(1)).sum(1)
    valid = (total > 0) & k.flatten(1).any(1)
    if not valid.any():
        raise ValueError("No image has both a non-empty mask and a non-zero map.")
    return float((inside[valid] / total[valid]).mean())


def mask_area(masks: Union[Tensor, np.ndarray]) -> float:
    """Mean mask area fraction: the chance level of both metrics above.

    Args:
        masks: Binary masks (B, H, W).

    Returns:
        Mean area fraction in [0, 1].
    """
    k = _as_tensor(masks) > 0.5
    return float(k.flatten(1).float().mean(1).mean())


def localization_report(
    maps: Union[Tensor, np.ndarray], masks: Union[Tensor, np.ndarray]
) -> Dict[str, float]:
    """Pointing game, energy inside, and their chance level, in one dict.

    Args:
        maps: Attention maps (B, h, w).
        masks: Binary masks (B, H, W).

    Returns:
        ``{"pointing": ..., "energy": ..., "chance": ...}``.
    """
    return {
        "pointing": pointing_game(maps, masks),
        "energy": energy_inside(maps, masks),
        "chance": mask_area(masks),
    }
