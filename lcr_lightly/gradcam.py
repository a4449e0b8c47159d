"""GradCAM of the self-supervised loss: ``G = ReLU(sum_c F * dL/dF)``.

The algorithm beside its hook, as in pytorch-grad-cam (``base_cam.py`` beside
``activations_and_gradients.py``): :mod:`lcr_lightly.capture` records the maps F of a
step, :func:`gradcam` differentiates the step's SSL loss with respect to them. Unlike a
classifier's Grad-CAM the target is the SSL loss itself, not a class score, and the
gradient is taken without ``create_graph`` (a fixed target for the head).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from lcr_lightly.capture import Reshape

GRADCAM_MODES = ("elementwise", "channel")


# Initial loss scale for float16 maps (GradScaler's default initial scale).
FP16_LOSS_SCALE = 2.0**16


def _fp16_autocast(device_type: str) -> bool:
    """Whether float16 autocast is active for this device type."""
    try:
        return bool(
            torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.float16
        )
    except (TypeError, AttributeError):  # torch < 2.4: CUDA-only query
        return bool(
            device_type == "cuda"
            and torch.is_autocast_enabled()
            and torch.get_autocast_gpu_dtype() == torch.float16
        )


def gradcam(
    loss: Tensor,
    maps: Union[Tensor, Sequence[Tensor]],
    mode: str = "elementwise",
    retain_graph: bool = True,
    allow_unused: bool = False,
    reshape: Optional[Reshape] = None,
    loss_scale: Optional[float] = None,
) -> List[Optional[Tensor]]:
    """GradCAM of a scalar loss with respect to feature maps.

    ``elementwise`` (LCR, the official code): ``ReLU(sum_c F * dL/dF)``;
    ``channel`` (classic Grad-CAM, for ablation): ``ReLU(sum_c mean_hw(dL/dF) * F)``.
    When ``F`` reaches the loss only through global average pooling, ``dL/dF`` is the same
    at every position and the two modes give the same map.
    Computed in float32 whatever the maps' dtype. The gradient itself is not part of the
    graph (no ``create_graph``), so the returned maps depend on the features only
    through ``F``; detach them to use them as a fixed target.

    Args:
        loss: Scalar loss whose graph contains ``maps``.
        maps: One map or a list of maps, each (B, C, H, W).
        mode: ``"elementwise"`` or ``"channel"``.
        retain_graph: Keep the graph for the main backward (default True).
        allow_unused: Return None for maps the loss does not depend on, instead of
            raising.
        reshape: For layers whose output is not a map (ViT tokens): the gradient is
            taken w.r.t. the raw outputs given in ``maps`` and both the output and its
            gradient are turned into (B, C, H, W) maps by this callable.
        loss_scale: Multiplies the loss before differentiating and divides the
            gradient after (as ``GradScaler`` does for the main backward). None: 2**16
            when a map is float16 or float16 autocast is on (small gradients otherwise
            underflow to zero in the fp16 backward through the heads), else 1. While
            a scaled gradient is not finite the scale is divided by 256 and the
            gradient recomputed (one device sync per try; only on this fp16 path).

    Returns:
        One GradCAM map (B, H, W) in float32 per input map (None for unused maps when
        ``allow_unused``).

    Raises:
        ValueError: On an unknown mode, a non-scalar loss, or maps outside the graph.
    """
    if mode not in GRADCAM_MODES:
        raise ValueError(f"Unknown GradCAM mode {mode!r}; expected one of {GRADCAM_MODES}.")
    if loss.dim() != 0:
        raise ValueError(f"GradCAM needs a scalar loss, got shape {tuple(loss.shape)}.")
    maps = [maps] if isinstance(maps, Tensor) else list(maps)
    if not maps:
        return []
    scale = loss_scale
    if scale is None:
        fp16 = any(m.dtype == torch.float16 for m in maps) or _fp16_autocast(loss.device.type)
        scale = FP16_LOSS_SCALE if fp16 else 1.0
    while True:
        last = scale <= 1.0 or loss_scale is not None
        grads = torch.autograd.grad(
            loss * scale if scale != 1.0 else loss,
            maps,
            retain_graph=retain_graph or not last,
            allow_unused=True,
        )
        if last or all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            break
        scale = max(scale / 256.0, 1.0)  # overflow in the scaled fp16 backward: retry
    cams: List[Optional[Tensor]] = []
    for feature, grad in zip(maps, grads):
        if grad is None and allow_unused:
            cams.append(None)
            continue
        if grad is None:
            raise ValueError(
                "The SSL loss does not depend on a captured feature map: the hooked layer "
                "is not on the path from the online view to the loss."
            )
        if reshape is not None:
            feature, grad = reshape(feature), reshape(grad)
        f32, g32 = feature.float(), grad.float()
        if scale != 1.0:
            g32 = g32 / scale
        if mode == "channel":
            g32 = g32.mean(dim=(2, 3), keepdim=True)
        cams.append(torch.relu((f32 * g32).sum(dim=1)))
    return cams
