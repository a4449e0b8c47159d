"""Shared parts of the SSL LightningModules (in the shape of lightly's benchmarks)."""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters
from lightly.utils.benchmarking import OnlineLinearClassifier
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning import LightningModule
from torch import Tensor, nn

from lcr_lightly.models.backbones import BackboneSpec, build_backbone


def split_views(batch: Any) -> Tuple[List[Tensor], Optional[Tensor]]:
    """Splits a batch of lightly's multi-view transforms into views and targets.

    Args:
        batch: ``(views, targets[, filenames])`` with ``views`` a list of (B, 3, H, W).

    Returns:
        The list of views and the targets (or None).

    Raises:
        ValueError: If the batch does not hold at least two views.
    """
    views = batch[0] if isinstance(batch, (list, tuple)) else batch
    targets = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise ValueError(
            "SSL models expect batches (views, targets) with at least two augmented views "
            "per image, as produced by lightly's MoCoV2Transform/BYOLTransform/"
            "SimCLRTransform; got a batch whose first element is "
            f"{type(views).__name__}."
        )
    return list(views), targets


class SSLModule(LightningModule):
    """Base class: backbone, optional online linear classifier, optimiser schedule.

    Subclasses define the heads, ``ssl_loss(views)`` and ``optimizer_name``.

    Args:
        backbone: torchvision ResNet name, ``"small_resnet"``, or a module.
        batch_size: Batch size per device (the learning rate scales with the global one).
        weights: Local file with pretrained backbone weights (ImageNet initialisation).
        num_classes: If set, an online linear classifier on detached features is
            trained and validated alongside (lightly's benchmarking convention).
        lr: Base learning rate for a global batch of 256; the method's default if None.
        weight_decay: Weight decay; the method's default if None.
        warmup_epochs: Linear warm-up epochs of the cosine schedule.
        stem_pool: False drops a ResNet backbone's stem max-pool (the official BYOL
            backbone, see :func:`~lcr_lightly.models.backbones.drop_stem_pool`).
    """

    default_lr: float = 0.03
    default_weight_decay: float = 1e-4
    optimizer_name: str = "sgd"

    def __init__(
        self,
        backbone: BackboneSpec = "resnet50",
        batch_size: int = 256,
        weights: Optional[Union[str, os.PathLike]] = None,
        num_classes: Optional[int] = None,
        lr: Optional[float] = None,
        weight_decay: Optional[float] = None,
        warmup_epochs: float = 0.0,
        stem_pool: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else [])
        self.batch_size = batch_size
        self.lr = self.default_lr if lr is None else lr
        self.weight_decay = self.default_weight_decay if weight_decay is None else weight_decay
        self.warmup_epochs = warmup_epochs
        self.backbone, self.feature_dim = build_backbone(backbone, weights, stem_pool=stem_pool)
        self.online_classifier: Optional[OnlineLinearClassifier] = None
        if num_classes is not None:
            self.online_classifier = OnlineLinearClassifier(
                feature_dim=self.feature_dim,
                num_classes=num_classes,
                topk=(1, 5) if num_classes >= 5 else (1,),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features (B, D): the representation used for evaluation."""
        return self.backbone(x).flatten(start_dim=1)

    @staticmethod
    def momentum_copy(module: nn.Module) -> nn.Module:
        """A frozen deep copy of a module (momentum/teacher encoder)."""
        copied = copy.deepcopy(module)
        deactivate_requires_grad(copied)
        return copied

    def ssl_loss(self, views: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """Computes the SSL loss.

        Args:
            views: Augmented views, each (B, 3, H, W).

        Returns:
            The scalar loss and the online backbone features of the first view (B, D).
        """
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """SSL loss (plus the online classifier's loss on detached features)."""
        views, targets = split_views(batch)
        loss, features = self.ssl_loss(views)
        batch_size = len(views[0])
        attached = self._trainer is not None
        if attached:
            self.log("train_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        if self.online_classifier is None or targets is None:
            return loss
        cls_loss, cls_log = self.online_classifier.training_step(
            (features.detach(), targets), batch_idx
        )
        if attached:
            self.log_dict(cls_log, sync_dist=True, batch_size=batch_size)
        return loss + cls_loss

    def validation_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """Online linear classifier accuracy on (images, targets) batches."""
        if self.online_classifier is None:
            return None
        images, targets = batch[0], batch[1]
        features = self.forward(images)
        cls_loss, cls_log = self.online_classifier.validation_step(
            (features.detach(), targets), batch_idx
        )
        self.log_dict(cls_log, prog_bar=True, sync_dist=True, batch_size=len(targets))
        return cls_loss

    def trainable_modules(self) -> List[nn.Module]:
        """Modules optimised with the method's optimiser (backbone and heads)."""
        raise NotImplementedError

    def _scaled_lr(self) -> float:
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.lr * self.batch_size * world / 256

    def _make_optimizer(self, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
        lr = self._scaled_lr()
        if self.optimizer_name == "lars":
            from lightly.utils.lars import LARS

            return LARS(groups, lr=lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=self.weight_decay)

    def configure_optimizers(self) -> Any:
        """Method optimiser with per-group weight decay and a cosine warm-up schedule."""
        params, params_no_wd = get_weight_decay_parameters(self.trainable_modules())
        groups: List[Dict[str, Any]] = [
            {"name": "ssl", "params": params},
            {"name": "ssl_no_weight_decay", "params": params_no_wd, "weight_decay": 0.0},
        ]
        if self.online_classifier is not None:
            groups.append(
                {
                    "name": "online_classifier",
                    "params": self.online_classifier.parameters(),
                    "weight_decay": 0.0,
                }
            )
        optimizer = self._make_optimizer(groups)
        if self._trainer is None:
            return optimizer
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = min(int(steps / epochs * self.warmup_epochs), steps)
        scheduler = {
            "scheduler": CosineWarmupScheduler(
                optimizer=optimizer, warmup_epochs=warmup, max_epochs=steps
            ),
            "interval": "step",
        }
        return [optimizer], [scheduler]
