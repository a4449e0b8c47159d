"""The synthetic stand-in for ImageNet initialisation, used before real weights were found.

A small ResNet pretrained, supervised, on the generic variant of the synthetic set (8
object templates, disjoint from the fine-grained classes). The shipped file
``lcr_lightly/assets/init_small_resnet_w16_64px.pth`` starts the synthetic-init studies
of ``benchmarks/RESULTS.md`` (``weights: generic_init``, the shipped config
``synthetic_init``); ``lcr-lightly init`` retrains it with :data:`INIT_SETTINGS`. The
demo and the ImageNet studies start from real ImageNet weights instead (``weights:
imagenet``).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lcr_lightly.atomic import atomic_path
from lcr_lightly.data import SyntheticFineGrained, eval_transform
from lcr_lightly.models import SmallResNet

# The settings the shipped file was trained with (and the defaults of `lcr-lightly init`).
INIT_SETTINGS: Dict[str, Any] = dict(
    widths=(16, 32, 64, 128),
    image_size=64,
    num_classes=8,
    images_per_class=500,
    epochs=10,
    batch_size=32,
    lr=2e-3,
    seed=0,
)


class SupervisedClassifier(pl.LightningModule):
    """A backbone + linear classifier trained with cross-entropy (init stage).

    Args:
        backbone: Backbone returning (B, D) features.
        feature_dim: D.
        num_classes: Number of classes.
        lr: AdamW learning rate (cosine schedule).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, lr: float = 2e-3):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.classifier(self.backbone(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy and accuracy."""
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        """AdamW with a cosine schedule (fast convergence from scratch on small data)."""
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def pretrain_generic_init(
    out_path: str,
    widths: Tuple[int, ...],
    image_size: int,
    num_classes: int,
    images_per_class: int,
    epochs: int,
    batch_size: int,
    seed: int,
    lr: float,
    progress: bool = True,
) -> Dict[str, float]:
    """Pretrains a small backbone, supervised, on the generic synthetic variant.

    The saved ``state_dict`` stands in for ImageNet weights: it is loaded through the
    same ``weights=`` path. The generic set's classes (object templates) are disjoint
    from the fine-grained set's.

    Args:
        out_path: Where to write the backbone weights (``.pth``).
        widths: SmallResNet stage widths.
        image_size: Image size.
        num_classes: Generic classes (templates), at most 8.
        images_per_class: Training images per class.
        epochs: Training epochs.
        batch_size: Batch size.
        seed: Seed (data and model).
        progress: Show progress bars.
        lr: AdamW learning rate.

    Returns:
        ``{"train_acc": ..., "test_acc": ...}`` on the generic set.
    """
    from torchvision import transforms as T

    pl.seed_everything(seed, verbose=False)
    norm = eval_transform(image_size, crop=False)
    augment = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.4, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            *norm.transforms[1:],
        ]
    )
    kw = dict(num_classes=num_classes, image_size=image_size, seed=seed, variant="generic")
    train = SyntheticFineGrained(images_per_class=images_per_class, transform=augment, **kw)  # type: ignore[arg-type]
    test = SyntheticFineGrained(images_per_class=50, split="test", transform=norm, **kw)  # type: ignore[arg-type]
    backbone = SmallResNet(widths=widths, small_input=True)
    backbone.fc = nn.Identity()  # type: ignore[assignment]
    model = SupervisedClassifier(backbone, widths[-1], num_classes, lr=lr)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=128):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    with atomic_path(out_path) as tmp:
        torch.save(backbone.state_dict(), tmp)
    return {
        "train_acc": float(trainer.callback_metrics.get("train_acc", torch.tensor(0.0))),
        "test_acc": correct / max(total, 1),
    }
