"""LCR on a lightly-style LightningModule (the shape of lightly's own examples).

python examples/lightly_lightning.py            # small synthetic run on CPU
python examples/lightly_lightning.py --tiny     # seconds (used by the tests)
"""

import argparse
import copy

import pytorch_lightning as pl
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import MoCoV2Transform
from torch import nn

from lcr_lightly import set_pooling, with_common_rationale
from lcr_lightly.data import SyntheticFineGrained


class MoCo(pl.LightningModule):
    """lightly's MoCo example, unchanged except for the ResNet-18 backbone size."""

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = MoCoProjectionHead(512, 512, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(memory_bank_size=(256, 128))

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x):
        return self.projection_head_momentum(
            self.backbone_momentum(x).flatten(start_dim=1)
        ).detach()

    def training_step(self, batch, batch_idx):
        update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
        x_query, x_key = batch[0]
        loss = self.criterion(self.forward(x_query), self.forward_momentum(x_key))
        self.log("train_loss_ssl", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


def main(tiny: bool = False) -> dict:
    size = 64 if tiny else 128  # ResNet stride 32: a 2x2 (4x4) last map; 1x1 makes the KL 0
    transform = MoCoV2Transform(input_size=size, gaussian_blur=0.0)
    dataset = SyntheticFineGrained(
        num_classes=4, images_per_class=4 if tiny else 50, image_size=size, transform=transform
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8 if tiny else 32, shuffle=True, drop_last=True
    )
    model = with_common_rationale(MoCo(), k=32)  # the one added line
    trainer = pl.Trainer(
        max_epochs=1 if tiny else 5,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    model.eval()
    images = torch.randn(4, 3, size, size)
    with torch.no_grad():
        lcr_features = model.backbone(images).flatten(1)
        set_pooling(model, "gap")
        gap_features = model.backbone(images).flatten(1)
    kl = float(trainer.callback_metrics["train_lcr_kl"])
    print("rationale-pooled", tuple(lcr_features.shape), "GAP", tuple(gap_features.shape))
    print(f"LCR KL at the end: {kl:.4f}")
    return {"kl": kl, "rationale": lcr_features, "gap": gap_features}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    main(parser.parse_args().tiny)
