"""Hook-based capture of feature maps and GradCAM of the self-supervised loss.

The capture follows pytorch-grad-cam's ``ActivationsAndGradients``: a forward hook
on one layer records its outputs, nothing in the user's model is edited, and the hook
is removable. Unlike a classifier's Grad-CAM, LCR needs the GradCAM of the *SSL loss*
for every view that passed through the online backbone in the current step, so the
capture keeps a list of maps and ignores outputs computed without gradient (momentum
encoders, ``torch.no_grad`` blocks).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lcr_lightly.hooks import LayerHook

Reshape = Callable[[Tensor], Tensor]

GRADCAM_MODES = ("elementwise", "channel")


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


class FeatureCapture(LayerHook):
    """Records the outputs of one layer during a training step.

    Every output that requires gradient is kept, in call order, so BYOL/SimSiam's two
    online views and multi-crop's many views are all seen; outputs computed under
    ``torch.no_grad`` or by frozen copies are ignored. By default only outputs computed
    while the layer is in training mode are recorded (``training_only``), so evaluation
    passes never accumulate maps.

    Args:
        layer: The module whose output is the feature map.
        reshape: Optional callable turning the raw output into a (B, C, H, W) map,
            e.g. :func:`tokens_to_map` for ViT tokens.
        training_only: Record only while ``layer.training`` is True.
        require_grad: Record only outputs that require gradient (the online path of a
            training step); False records every output, e.g. to tap features in eval.
        name: Dotted name of the layer, used in messages (its class name if None).

    Example:
        >>> with FeatureCapture(backbone.layer4) as capture:
        ...     loss = ssl_loss(model, views)
        ...     cams = gradcam(loss, capture.maps)
    """

    def __init__(
        self,
        layer: nn.Module,
        reshape: Optional[Reshape] = None,
        training_only: bool = True,
        require_grad: bool = True,
        name: Optional[str] = None,
    ) -> None:
        self.reshape = reshape
        self.training_only = training_only
        self.require_grad = require_grad
        self.name = name or type(layer).__name__
        self.outputs: List[Tensor] = []
        super().__init__(layer)

    @property
    def maps(self) -> List[Tensor]:
        """The recorded feature maps, (B, C, H, W) each (``reshape`` applied)."""
        if self.reshape is None:
            return list(self.outputs)
        return [self.reshape(o) for o in self.outputs]

    @property
    def layer(self) -> nn.Module:
        """The hooked layer."""
        return self.module

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """Records ``output`` if it is an online map of the current training step."""
        if self.training_only and not module.training:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor):
            return
        if self.require_grad and not (torch.is_grad_enabled() and out.requires_grad):
            return
        fmap = self.reshape(out) if self.reshape is not None else out
        if fmap.dim() != 4:
            raise ValueError(
                f"The captured layer {self.name!r} produced a "
                f"{fmap.dim()}-D output of shape {tuple(fmap.shape)}; LCR needs a 4-D map "
                "(B, C, H, W). Choose a convolutional stage with layer=..., or pass "
                "reshape=tokens_to_map for ViT tokens."
            )
        self.outputs.append(out)

    def clear(self) -> None:
        """Drops the recorded outputs (and the graph they keep alive)."""
        self.outputs = []

    def release(self) -> None:
        """Removes the hook and drops the recorded maps."""
        super().release()
        self.clear()

    def _transient_state(self) -> dict:
        return {"_handle": None, "outputs": []}


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
