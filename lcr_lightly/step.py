"""What one LCR step computed, kept for tests, benchmarks and figures.

:class:`~lcr_lightly.CommonRationale` fills a :class:`StepRecord` in ``last_step`` only
while its ``record`` flag is set, so a training step keeps no extra references.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor


def clock(tensor: Tensor) -> float:
    """``time.perf_counter()`` after the tensor's device has finished its queued work."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


@dataclass
class StepRecord:
    """What :meth:`lcr_lightly.CommonRationale.kl_term` computed in one step.

    Kept in ``CommonRationale.last_step`` only while ``CommonRationale.record`` is True
    (tests, benchmarks, figures), so the training step keeps no extra references.

    Attributes:
        layer_name: Dotted name of the layer the maps come from.
        maps: Feature maps F that entered the KL, one per view, (B, C, H, W), detached.
        gradcams: Their GradCAMs G of the SSL loss, (B, H, W), float32.
        head_maps: The head's rationale maps A, (B, H, W), detached.
        kls: The fitting loss of each view (scalar tensors, detached).
        kl: Their mean (the returned term), detached.
        ssl_loss: The SSL loss the GradCAMs are of, detached.
        seconds: Wall time of the call (on CUDA the device is synchronised before both
            clock reads, only while recording).
    """

    layer_name: str
    maps: List[Tensor] = field(default_factory=list)
    gradcams: List[Tensor] = field(default_factory=list)
    head_maps: List[Tensor] = field(default_factory=list)
    kls: List[Tensor] = field(default_factory=list)
    kl: Optional[Tensor] = None
    ssl_loss: Optional[Tensor] = None
    seconds: float = 0.0
