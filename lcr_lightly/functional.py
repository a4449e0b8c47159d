"""The functional API: LCR for a backbone trained by a plain PyTorch loop.

:func:`attach` resolves where to hook a backbone (:func:`lcr_lightly.resolve.resolve`)
and returns its :class:`~lcr_lightly.CommonRationale`, whose
:meth:`~lcr_lightly.CommonRationale.kl_term` the loop adds to its SSL loss. Lightning
models use :func:`lcr_lightly.lightning.with_common_rationale` instead.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from lcr_lightly._validation import check_options
from lcr_lightly.capture import Reshape
from lcr_lightly.layers import LayerSpec
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.rationale import OPTIONS, CommonRationale
from lcr_lightly.resolve import resolve


def attach(
    backbone: nn.Module,
    k: int = 32,
    loss: Optional[GradCAMFitLoss] = None,
    layer: LayerSpec = None,
    pool: LayerSpec = None,
    in_channels: Optional[int] = None,
    reshape: Optional[Reshape] = None,
    **options: Any,
) -> CommonRationale:
    """Attaches LCR to a backbone and returns the :class:`CommonRationale` module.

    The functional entry point for plain PyTorch training loops::

        lcr = attach(backbone, k=32)
        optimizer = SGD([*model.parameters(), *lcr.parameters()], lr=0.03)
        loss = ssl_loss(model, views)            # forward through backbone as usual
        total = loss + 0.01 * lcr.kl_term(loss)  # GradCAM -> head -> KL
        total.backward()

    The feature layer and the pool are found together by one dry forward of the
    backbone (:func:`~lcr_lightly.resolve.resolve`): the head is trained on exactly the
    tensor that the global average pool consumes at inference.

    Args:
        backbone: Module containing the feature layer (and its global pooling); its
            ``forward`` takes an image batch.
        k: Number of head projections K.
        loss: The fitting loss; ``GradCAMFitLoss()`` when None.
        layer: Feature layer: None (automatic), dotted name in ``backbone``, or module.
        pool: Global pooling to replace at inference: None (the average pool that
            consumes the layer's output, if any), name or module.
        in_channels: Channels of the feature map; read off the dry forward when None.
        reshape: Callable turning the layer output into a (B, C, H, W) map (inferred
            for recognised ViTs and channels-last maps).
        **options: Further :class:`CommonRationale` options (``detach_features``,
            ``gradcam_mode``, ``views``, ``nonfinite``, ``normalize``,
            ``pool_in_training``).

    Returns:
        The attached module (on the backbone's device).

    Raises:
        ValueError: For a bad layer name, a backbone with no map that a global average
            pool consumes (functional or max pooling, a 1x1 map; the message lists the
            candidates), or ``in_channels`` that disagree with the map.
    """
    check_options("attach", options, OPTIONS)
    resolution = resolve(backbone, layer, pool, in_channels, reshape)
    module = CommonRationale.from_resolution(resolution, k=k, loss=loss, **options)
    module.place_like(backbone)
    return module
