"""LCR on a solo-learn-style method (``BaseMethod`` shape, written out here).

solo-learn's released package does not import with Lightning 2, so this example mirrors
its method contract: a LightningModule with ``self.backbone`` (a torchvision ResNet with
``fc = Identity``), ``training_step`` returning the loss tensor (solo-learn adds its online
classifier loss), and ``configure_optimizers`` building parameter groups from
``learnable_params`` — which do not include LCR's head; the wrapper adds it.

    python examples/solo_learn_style.py [--tiny]
"""

import argparse

import pytorch_lightning as pl
import torch
import torchvision
from lightly.transforms import BYOLTransform
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from torch import nn

from lcr_lightly import with_common_rationale
from lcr_lightly.data import SyntheticFineGrained


class BaseMethod(pl.LightningModule):
    def __init__(self, num_classes: int):
        super().__init__()
        self.backbone = torchvision.models.resnet18()
        self.features_dim = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.classifier = nn.Linear(self.features_dim, num_classes)

    @property
    def learnable_params(self):
        return [
            {"name": "backbone", "params": self.backbone.parameters()},
            {"name": "classifier", "params": self.classifier.parameters(), "weight_decay": 0},
        ]

    def configure_optimizers(self):
        return torch.optim.SGD(self.learnable_params, lr=0.05, momentum=0.9, weight_decay=1e-4)

    def base_training_step(self, x, targets):
        feats = self.backbone(x)
        loss = nn.functional.cross_entropy(self.classifier(feats.detach()), targets)
        return {"loss": loss, "feats": feats}


class SimSiamLike(BaseMethod):
    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.projector = nn.Sequential(
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128)
        )
        self.predictor = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128))

    @property
    def learnable_params(self):
        return super().learnable_params + [
            {"name": "projector", "params": self.projector.parameters()},
            {"name": "predictor", "params": self.predictor.parameters()},
        ]

    def training_step(self, batch, batch_idx):
        (x0, x1), targets = batch
        out0, out1 = self.base_training_step(x0, targets), self.base_training_step(x1, targets)
        z0, z1 = self.projector(out0["feats"]), self.projector(out1["feats"])
        p0, p1 = self.predictor(z0), self.predictor(z1)
        cos = nn.functional.cosine_similarity
        ssl = -0.5 * (cos(p0, z1.detach()).mean() + cos(p1, z0.detach()).mean())
        self.log("train_ssl", ssl)
        return ssl + 0.5 * (out0["loss"] + out1["loss"])


def main(tiny: bool = False) -> dict:
    size = 64 if tiny else 128  # ResNet stride 32: a 2x2 (4x4) last map; 1x1 makes the KL 0
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0),
    )
    dataset = SyntheticFineGrained(
        num_classes=4, images_per_class=4 if tiny else 50, image_size=size, transform=transform
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8 if tiny else 32, shuffle=True, drop_last=True
    )
    model = with_common_rationale(SimSiamLike(num_classes=4), k=32)
    trainer = pl.Trainer(
        max_epochs=1 if tiny else 5,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.common_rationale.parameters())
    kl = float(trainer.callback_metrics["train_lcr_kl"])
    print("LCR KL at the end:", kl)
    return {"kl": kl}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    main(parser.parse_args().tiny)
