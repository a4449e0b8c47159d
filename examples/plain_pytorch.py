"""LCR in a plain PyTorch SimSiam loop through the functional API.

python examples/plain_pytorch.py [--tiny]
"""

import argparse

import torch
import torchvision
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from lightly.transforms import SimSiamTransform
from torch import nn

from lcr_lightly import attach
from lcr_lightly.data import SyntheticFineGrained


def main(tiny: bool = False) -> dict:
    size = 64 if tiny else 128  # ResNet stride 32: a 2x2 (4x4) last map; 1x1 makes the KL 0
    resnet = torchvision.models.resnet18()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    projection = SimSiamProjectionHead(512, 512, 128)
    prediction = SimSiamPredictionHead(128, 64, 128)
    criterion = NegativeCosineSimilarity()
    lcr = attach(backbone, k=32)  # hooks the last conv stage and the global pooling
    params = [*backbone.parameters(), *projection.parameters(), *prediction.parameters()]
    optimizer = torch.optim.SGD([*params, *lcr.parameters()], lr=0.06, momentum=0.9)
    dataset = SyntheticFineGrained(
        num_classes=4,
        images_per_class=4 if tiny else 50,
        image_size=size,
        transform=SimSiamTransform(input_size=size, gaussian_blur=0.0),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8 if tiny else 32, shuffle=True, drop_last=True
    )
    for epoch in range(1 if tiny else 5):
        for (x0, x1), _ in loader:
            z0, z1 = projection(backbone(x0).flatten(1)), projection(backbone(x1).flatten(1))
            p0, p1 = prediction(z0), prediction(z1)
            loss = 0.5 * (criterion(z0.detach(), p1) + criterion(z1.detach(), p0))
            kl = lcr.kl_term(loss)  # GradCAM of the SSL loss -> head -> KL
            total = loss + 0.01 * kl
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        print(f"epoch {epoch}: ssl {loss.item():.4f} kl {kl.item():.4f}")
    backbone.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        rationale = backbone(images).flatten(1)
        lcr.set_pooling("gap")
        gap = backbone(images).flatten(1)
    print("rationale-pooled features", tuple(rationale.shape))
    return {"kl": kl.item(), "rationale": rationale, "gap": gap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    main(parser.parse_args().tiny)
