"""GradCAMFitLoss: fitting the rationale map to the GradCAM of the SSL loss.

Both maps are flattened over positions, divided by a temperature and turned into
distributions with a softmax; the loss is a KL divergence between them. The paper and
its official code differ in several details, so each is an option:

==================  ===============================  ===================================
option              paper (eq. 6)                    official code (GANPerf/LCR, BYOL)
==================  ===============================  ===================================
``direction``       ``"reverse"``: KL(A || G)        ``"forward"``: KL(G || A)
``head``            raw map A                        ``"minmax"`` over the whole batch
``detach_target``   (not stated)                     ``False``: gradient flows through G
``reduction``       (not stated)                     ``"sum"`` over the batch
==================  ===============================  ===================================

``target="max"`` divides each GradCAM map by its own maximum before the temperature.
Raw GradCAM values of a mean-reduced SSL loss are tiny (~1e-3), so softmax(G / 0.4) is
almost uniform and carries almost no spatial information; the per-image maximum
rescales G to [0, 1] like the head map. See ``benchmarks/RESULTS.md`` for the ablation
behind the defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcr_lightly._validation import check_choice as _check_choice
from lcr_lightly._validation import check_real
from lcr_lightly.pooling import minmax_normalize

TARGETS = ("raw", "max")
HEADS = ("raw", "minmax")
DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("batchmean", "sum")


class GradCAMFitLoss(nn.Module):
    """KL divergence between the softmaxed rationale map and GradCAM map.

    Args:
        tau: Softmax temperature (0.4 in the paper and code); finite and positive.
        target: ``"raw"`` uses G as is; ``"max"`` divides each G by its maximum.
        head: ``"raw"`` uses the head map A; ``"minmax"`` min-max normalises A over the
            whole batch first (official code).
        direction: ``"forward"``: KL(softmax(G/tau) || softmax(A/tau)) (official code);
            ``"reverse"``: KL(softmax(A/tau) || softmax(G/tau)) (paper eq. 6).
        detach_target: Stop the gradient through G (True) or let it flow into the
            features that G is computed from (False, official code).
        reduction: ``"batchmean"``: sum over positions, mean over images;
            ``"sum"``: sum over positions and images (official code).

    Example:
        >>> loss_fn = GradCAMFitLoss()
        >>> kl = loss_fn(head_map, gradcam_map)  # both (B, H, W)
    """

    def __init__(
        self,
        tau: float = 0.4,
        target: str = "max",
        head: str = "raw",
        direction: str = "forward",
        detach_target: bool = True,
        reduction: str = "batchmean",
    ) -> None:
        super().__init__()
        _check_choice("target", target, TARGETS)
        _check_choice("head", head, HEADS)
        _check_choice("direction", direction, DIRECTIONS)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.tau = check_real("tau", tau)
        self.target = target
        self.head = head
        self.direction = direction
        self.detach_target = detach_target
        self.reduction = reduction

    @classmethod
    def official(cls) -> GradCAMFitLoss:
        """The official code's BYOL loss (GANPerf/LCR ``main.py``), reproduced exactly.

        ``kl_div(log(softmax(minmax_batch(A) / 0.4)), softmax(G / 0.4), reduction="sum")``
        on flattened maps, with gradient through G.

        Returns:
            A configured loss.
        """
        return cls(
            tau=0.4,
            target="raw",
            head="minmax",
            direction="forward",
            detach_target=False,
            reduction="sum",
        )

    def forward(self, head_map: Tensor, gradcam: Tensor) -> Tensor:
        """Computes the loss.

        Args:
            head_map: Rationale map A from the head, (B, H, W) (or (B, N)).
            gradcam: GradCAM map G of the SSL loss, same shape.

        Returns:
            Scalar loss in float32.
        """
        if head_map.shape != gradcam.shape:
            raise ValueError(
                f"head_map {tuple(head_map.shape)} and gradcam {tuple(gradcam.shape)} "
                "must have the same shape."
            )
        with torch.autocast(device_type=head_map.device.type, enabled=False):
            a = head_map.float().flatten(1)
            g = gradcam.float().flatten(1)
            if self.detach_target:
                g = g.detach()
            if self.head == "minmax":
                a = minmax_normalize(a, over="batch")
            if self.target == "max":
                g = g / g.amax(dim=1, keepdim=True).clamp_min(1e-12)
            log_a = F.log_softmax(a / self.tau, dim=1)
            log_g = F.log_softmax(g / self.tau, dim=1)
            if self.direction == "forward":
                log_p, log_q = log_g, log_a
            else:
                log_p, log_q = log_a, log_g
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
            return kl.sum() if self.reduction == "sum" else kl.mean()

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return (
            f"tau={self.tau}, target={self.target!r}, head={self.head!r}, "
            f"direction={self.direction!r}, detach_target={self.detach_target}, "
            f"reduction={self.reduction!r}"
        )
