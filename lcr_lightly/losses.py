"""GradCAMFitLoss: fitting the rationale map to the GradCAM of the SSL loss.

Both maps are divided by a temperature and turned into distributions with a softmax
(over all positions of a map, or over each row); the loss is a KL divergence between
them. The paper and its two official scripts differ in several details, so each is an
option and :meth:`GradCAMFitLoss.official` reproduces each script:

=================  ======================  ========================  ========================
option             paper (eq. 6)           official BYOL             official MoCo v2
                                           (``main.py``)             (``main_moco.py``)
=================  ======================  ========================  ========================
``direction``      ``"reverse"``: KL(A||G)  ``"forward"``: KL(G||A)   ``"forward"``
``softmax``        over the map             ``"map"`` (flattened)     ``"rows"``: each row
                                                                      of W positions
``tau``            0.4                      0.4                       1 (no temperature)
``head``           raw map A                ``"minmax"``, batch-wide  ``"minmax"``, batch-wide
``detach_target``  (not stated)             ``False``: grad through G ``False``
``reduction``      (not stated)             ``"sum"``                 ``"sum"``
=================  ======================  ========================  ========================

The defaults are the official MoCo v2 loss: on the validation split of the study in
``benchmarks/RESULTS.md`` (section 11: MoCo v2, ImageNet EfficientNet-Lite0, 5 paired
seeds) it beat this library's earlier defaults (``tau=0.4, target="max"``, raw head,
``detach_target=True``, ``"batchmean"``, ``softmax="map"``) in rationale-pooled mAP on
every seed. ``reduction="sum"`` makes the term grow with the batch size and the map
height: the weight nu = 0.01 is the official one at the official batch size (128).
``target="max"`` divides each GradCAM map by its own maximum before the temperature.
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
SOFTMAX_AXES = ("map", "rows")
OFFICIAL_SCRIPTS = ("byol", "moco")


class GradCAMFitLoss(nn.Module):
    """KL divergence between the softmaxed rationale map and GradCAM map.

    Args:
        tau: Softmax temperature (0.4 in the paper and the official BYOL code, none -- 1 --
            in the official MoCo code, the default); finite and positive.
        target: ``"raw"`` uses G as is; ``"max"`` divides each G by its maximum.
        head: ``"raw"`` uses the head map A; ``"minmax"`` min-max normalises A over the
            whole batch first (official code).
        direction: ``"forward"``: KL(softmax(G/tau) || softmax(A/tau)) (official code);
            ``"reverse"``: KL(softmax(A/tau) || softmax(G/tau)) (paper eq. 6).
        detach_target: Stop the gradient through G (True) or let it flow into the
            features that G is computed from (False, official code).
        reduction: ``"batchmean"``: sum over positions, mean over images;
            ``"sum"``: sum over positions and images (official code).
        softmax: ``"map"``: one distribution over the H*W positions of each map (paper,
            official BYOL); ``"rows"``: one distribution over the W positions of each of
            the H rows, the KL summed over rows (official MoCo: its softmax runs over the
            last axis of (B, H, W) maps). ``"rows"`` needs (B, H, W) maps.

    The defaults equal ``GradCAMFitLoss.official("moco")`` (see the module docstring).

    Example:
        >>> loss_fn = GradCAMFitLoss()
        >>> kl = loss_fn(head_map, gradcam_map)  # both (B, H, W)
    """

    def __init__(
        self,
        tau: float = 1.0,
        target: str = "raw",
        head: str = "minmax",
        direction: str = "forward",
        detach_target: bool = False,
        reduction: str = "sum",
        softmax: str = "rows",
    ) -> None:
        super().__init__()
        _check_choice("softmax", softmax, SOFTMAX_AXES)
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
        self.softmax = softmax

    @classmethod
    def official(cls, script: str = "byol") -> GradCAMFitLoss:
        """The loss of one of the official scripts (GANPerf/LCR), reproduced exactly.

        Both use the head map min-max normalised over the whole batch, the raw GradCAM
        of the SSL loss with its gradient flowing into the features (the factor
        ``dL/dF`` is computed without ``create_graph``, as :func:`~lcr_lightly.gradcam`
        does), ``F.kl_div(log softmax(A), softmax(G), reduction="sum")``, i.e.
        KL(G || A) summed over the batch:

        * ``"byol"`` (``main.py``, Table 3): maps flattened to (B, H*W), both divided by
          a temperature of 0.4 before the softmax.
        * ``"moco"`` (``main_moco.py`` + ``moco/builder.py``, Tables 2 and 4): (B, H, W)
          maps, the softmax over the last axis only (each row of W positions is its own
          distribution), no temperature.

        Args:
            script: ``"byol"`` or ``"moco"``.

        Returns:
            A configured loss.
        """
        _check_choice("script", script, OFFICIAL_SCRIPTS)
        return cls(
            tau=0.4 if script == "byol" else 1.0,
            target="raw",
            head="minmax",
            direction="forward",
            detach_target=False,
            reduction="sum",
            softmax="map" if script == "byol" else "rows",
        )

    def forward(self, head_map: Tensor, gradcam: Tensor) -> Tensor:
        """Computes the loss.

        Args:
            head_map: Rationale map A from the head, (B, H, W) (or (B, N) with
                ``softmax="map"``).
            gradcam: GradCAM map G of the SSL loss, same shape.

        Returns:
            Scalar loss in float32.
        """
        if head_map.shape != gradcam.shape:
            raise ValueError(
                f"head_map {tuple(head_map.shape)} and gradcam {tuple(gradcam.shape)} "
                "must have the same shape."
            )
        if self.softmax == "rows" and head_map.dim() != 3:
            raise ValueError(f"softmax='rows' needs (B, H, W) maps, got {tuple(head_map.shape)}.")
        batch = head_map.shape[0]
        with torch.autocast(device_type=head_map.device.type, enabled=False):
            a = head_map.float().flatten(1)
            g = gradcam.float().flatten(1)
            if self.detach_target:
                g = g.detach()
            if self.head == "minmax":
                a = minmax_normalize(a, over="batch")
            if self.target == "max":
                g = g / g.amax(dim=1, keepdim=True).clamp_min(1e-12)
            if self.softmax == "rows":  # (B, H*W) -> (B*H, W): each row its own softmax
                width = head_map.shape[-1]
                a, g = a.reshape(-1, width), g.reshape(-1, width)
            log_a = F.log_softmax(a / self.tau, dim=1)
            log_g = F.log_softmax(g / self.tau, dim=1)
            if self.direction == "forward":
                log_p, log_q = log_g, log_a
            else:
                log_p, log_q = log_a, log_g
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).reshape(batch, -1).sum(dim=1)
            return kl.sum() if self.reduction == "sum" else kl.mean()

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return (
            f"tau={self.tau}, target={self.target!r}, head={self.head!r}, "
            f"direction={self.direction!r}, detach_target={self.detach_target}, "
            f"reduction={self.reduction!r}, softmax={self.softmax!r}"
        )
