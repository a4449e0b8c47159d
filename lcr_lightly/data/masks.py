"""Binary masks drawn from annotations: part-keypoint disks and bounding boxes.

Both the data sets (:class:`~lcr_lightly.data.CUBLocalization` builds its masks here)
and the localisation metrics (:mod:`lcr_lightly.eval.localization`, which re-exports
:func:`keypoint_masks`) use them; they live with the data so that the data layer never
imports the evaluation layer.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def keypoint_masks(
    keypoints: Sequence[Sequence[Tuple[float, float]]],
    size: Tuple[int, int],
    radius: float,
) -> Tensor:
    """Disks around part keypoints (e.g. CUB's ``parts/part_locs.txt``).

    Args:
        keypoints: For each image, a list of visible ``(x, y)`` pixel positions.
        size: ``(H, W)`` of the masks.
        radius: Disk radius in pixels.

    Returns:
        Masks (B, H, W) as float tensors.
    """
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    masks = torch.zeros(len(keypoints), h, w)
    for b, points in enumerate(keypoints):
        for x, y in points:
            masks[b] += ((xx - x) ** 2 + (yy - y) ** 2 <= radius**2).float()
    return (masks > 0).float()


def box_mask(box: Tuple[float, float, float, float], size: int) -> Tensor:
    """The pixels of a square image whose centre lies inside a box.

    Args:
        box: ``(x0, y0, x1, y1)`` in continuous pixel coordinates (pixel ``i`` covers
            ``[i, i + 1)``), e.g. from :meth:`~lcr_lightly.data.transforms.EvalGeometry.box`.
        size: Side S of the image.

    Returns:
        The mask (S, S), ``uint8``, 1 inside.
    """
    x0, y0, x1, y1 = box
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    rows = (centres >= y0) & (centres < y1)
    cols = (centres >= x0) & (centres < x1)
    return (rows[:, None] & cols[None, :]).to(torch.uint8)
