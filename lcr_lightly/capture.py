"""Recording the online feature maps of a training step (a removable forward hook).

The capture follows pytorch-grad-cam's ``ActivationsAndGradients``: a forward hook on
one layer records its outputs, nothing in the user's model is edited, and the hook is
removable. Unlike a classifier's Grad-CAM, LCR needs the GradCAM of the *SSL loss* for
every view that passed through the online backbone in the current step, so the capture
keeps a list of maps and ignores outputs computed without gradient (momentum encoders,
``torch.no_grad`` blocks). :func:`lcr_lightly.gradcam.gradcam` then differentiates the
loss with respect to them.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from lcr_lightly.hooks import LayerHook

Reshape = Callable[[Tensor], Tensor]


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
