"""MoCo v2, BYOL, SimSiam and SimCLR as LightningModules built from lightly blocks.

Hyper-parameters follow the papers and the LCR official code (GANPerf/LCR); each is a
constructor argument. ``forward(x)`` returns the online backbone's pooled features, so
``lightly.utils.benchmarking`` classifiers and :mod:`lcr_lightly.eval` work unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
)
from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from lcr_lightly.models.base import SSLModule


class MoCoV2(SSLModule):
    """MoCo v2: query encoder, momentum key encoder, queue of negatives.

    Defaults: queue 65536, momentum 0.999, temperature 0.2, SGD lr 0.03 x bs/256,
    weight decay 1e-4, projection head 2048-2048-256 (LCR official code).

    Args:
        memory_bank_size: Queue length (negatives).
        momentum: EMA momentum of the key encoder.
        temperature: InfoNCE temperature.
        hidden_dim: Projection head hidden width.
        out_dim: Projection output width.
        **kwargs: :class:`SSLModule` arguments (``backbone``, ``batch_size``, ...).
    """

    default_lr = 0.03
    default_weight_decay = 1e-4

    def __init__(
        self,
        memory_bank_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        hidden_dim: int = 2048,
        out_dim: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.momentum = momentum
        self.projection_head = MoCoProjectionHead(self.feature_dim, hidden_dim, out_dim)
        self.momentum_backbone = self.momentum_copy(self.backbone)
        self.momentum_projection_head = self.momentum_copy(self.projection_head)
        self.criterion = NTXentLoss(
            temperature=temperature, memory_bank_size=(memory_bank_size, out_dim)
        )

    def trainable_modules(self) -> List[nn.Module]:
        """Backbone and projection head."""
        return [self.backbone, self.projection_head]

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Saves the queue: lightly registers it as a non-persistent buffer."""
        bank = self.criterion.memory_bank
        checkpoint["moco_queue"] = {"bank": bank.bank.cpu(), "ptr": bank.bank_ptr.cpu()}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Restores the queue saved by :meth:`on_save_checkpoint` (if present)."""
        saved = checkpoint.get("moco_queue")
        if saved is None:
            return
        bank = self.criterion.memory_bank
        if tuple(saved["bank"].shape) != tuple(bank.bank.shape):
            raise ValueError(
                f"Checkpoint queue has shape {tuple(saved['bank'].shape)} but the model's is "
                f"{tuple(bank.bank.shape)}; use the same memory_bank_size and out_dim."
            )
        bank.bank.copy_(saved["bank"])
        bank.bank_ptr.copy_(saved["ptr"])

    @torch.no_grad()
    def forward_key(self, x: Tensor) -> Tensor:
        """Key projections of the momentum encoder, with (distributed) batch shuffling."""
        distributed = self._trainer is not None and self.trainer.world_size > 1
        x, shuffle = batch_shuffle(batch=x, distributed=distributed)
        keys = self.momentum_projection_head(self.momentum_backbone(x).flatten(1))
        return batch_unshuffle(batch=keys, shuffle=shuffle, distributed=distributed)

    def ssl_loss(self, views: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """InfoNCE between the query of view 0 and the key of view 1."""
        update_momentum(self.backbone, self.momentum_backbone, m=self.momentum)
        update_momentum(self.projection_head, self.momentum_projection_head, m=self.momentum)
        features = self.forward(views[0])
        query = self.projection_head(features)
        key = self.forward_key(views[1])
        return self.criterion(query, key), features


class BYOL(SSLModule):
    """BYOL: online network with predictor, EMA target network.

    Defaults: EMA 0.996 -> 1 (cosine), projector/predictor 4096-256, LARS
    lr 0.3 x bs/256 (the official LCR config), weight decay 1.5e-6, 10 warm-up epochs.

    Args:
        momentum_start: EMA momentum at step 0 (cosine schedule to ``momentum_end``).
        momentum_end: EMA momentum at the last step.
        hidden_dim: Projector/predictor hidden width.
        out_dim: Projection width.
        **kwargs: :class:`SSLModule` arguments.
    """

    default_lr = 0.3
    default_weight_decay = 1.5e-6
    optimizer_name = "lars"

    def __init__(
        self,
        momentum_start: float = 0.996,
        momentum_end: float = 1.0,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("warmup_epochs", 10.0)
        super().__init__(**kwargs)
        self.momentum_start = momentum_start
        self.momentum_end = momentum_end
        self.projection_head = BYOLProjectionHead(self.feature_dim, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.momentum_backbone = self.momentum_copy(self.backbone)
        self.momentum_projection_head = self.momentum_copy(self.projection_head)
        self.criterion = NegativeCosineSimilarity()

    def trainable_modules(self) -> List[nn.Module]:
        """Backbone, projector and predictor."""
        return [self.backbone, self.projection_head, self.prediction_head]

    def current_momentum(self) -> float:
        """EMA momentum at the current step (cosine from start to end)."""
        if self._trainer is None:
            return self.momentum_start
        return cosine_schedule(
            step=self.trainer.global_step,
            max_steps=max(int(self.trainer.estimated_stepping_batches), 1),
            start_value=self.momentum_start,
            end_value=self.momentum_end,
        )

    @torch.no_grad()
    def forward_target(self, x: Tensor) -> Tensor:
        """Target projections."""
        return self.momentum_projection_head(self.momentum_backbone(x).flatten(1))

    def ssl_loss(self, views: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """Symmetric normalised-MSE (2 - 2 cos) between predictions and targets."""
        m = self.current_momentum()
        update_momentum(self.backbone, self.momentum_backbone, m=m)
        update_momentum(self.projection_head, self.momentum_projection_head, m=m)
        features0 = self.forward(views[0])
        features1 = self.forward(views[1])
        p0 = self.prediction_head(self.projection_head(features0))
        p1 = self.prediction_head(self.projection_head(features1))
        t0, t1 = self.forward_target(views[0]), self.forward_target(views[1])
        loss = 2 * self.criterion(p0, t1) + 2 * self.criterion(p1, t0)
        return loss, features0


class SimSiam(SSLModule):
    """SimSiam: shared encoder, predictor, stop-gradient.

    Defaults: projector 2048-2048, predictor 512, SGD lr 0.05 x bs/256, weight decay 1e-4.

    Args:
        proj_dim: Projection width.
        pred_hidden_dim: Predictor bottleneck width.
        **kwargs: :class:`SSLModule` arguments.
    """

    default_lr = 0.05
    default_weight_decay = 1e-4

    def __init__(self, proj_dim: int = 2048, pred_hidden_dim: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.projection_head = SimSiamProjectionHead(self.feature_dim, proj_dim, proj_dim)
        self.prediction_head = SimSiamPredictionHead(proj_dim, pred_hidden_dim, proj_dim)
        self.criterion = NegativeCosineSimilarity()

    def trainable_modules(self) -> List[nn.Module]:
        """Backbone, projector and predictor."""
        return [self.backbone, self.projection_head, self.prediction_head]

    def ssl_loss(self, views: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """Symmetric negative cosine similarity with stop-gradient on the projections."""
        features0 = self.forward(views[0])
        features1 = self.forward(views[1])
        z0, z1 = self.projection_head(features0), self.projection_head(features1)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        return loss, features0


class SimCLR(SSLModule):
    """SimCLR: shared encoder, NT-Xent over the two views of the batch.

    Defaults: projection 2048-128, temperature 0.1, LARS lr 0.3 x bs/256,
    weight decay 1e-6, 10 warm-up epochs.

    Args:
        temperature: NT-Xent temperature.
        hidden_dim: Projection hidden width.
        out_dim: Projection output width.
        **kwargs: :class:`SSLModule` arguments.
    """

    default_lr = 0.3
    default_weight_decay = 1e-6
    optimizer_name = "lars"

    def __init__(
        self, temperature: float = 0.1, hidden_dim: int = 2048, out_dim: int = 128, **kwargs: Any
    ) -> None:
        kwargs.setdefault("warmup_epochs", 10.0)
        super().__init__(**kwargs)
        self.projection_head = SimCLRProjectionHead(self.feature_dim, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def trainable_modules(self) -> List[nn.Module]:
        """Backbone and projection head."""
        return [self.backbone, self.projection_head]

    def ssl_loss(self, views: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """NT-Xent between the projections of the two views."""
        features0 = self.forward(views[0])
        z0 = self.projection_head(features0)
        z1 = self.projection_head(self.forward(views[1]))
        return self.criterion(z0, z1), features0
