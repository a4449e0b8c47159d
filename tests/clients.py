"""Test fixtures: real backbone families and SSL method shapes to wrap, with their batches.

``BACKBONES`` lists timm and torchvision backbones with the layer and pool LCR is
expected to hook; ``CLIENTS`` lists method modules in the shape of lightly's benchmark
modules (SwAV with multi-crop and a loss of shape (1,), DINO whose ``backbone`` is the
teacher, ResNet and ViT) and of a solo-learn method (``backbone`` +
``momentum_backbone``). ``tests/test_clients.py`` checks LCR on every row,
``tests/test_export.py`` exports them, and ``python -m benchmarks.resolved_layers``
prints the README table from them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import timm
import torch
import torchvision
from lightly.loss import DINOLoss, SwaVLoss
from lightly.models.modules import (
    DINOProjectionHead,
    MaskedVisionTransformerTIMM,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import activate_requires_grad, deactivate_requires_grad, update_momentum
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lcr_lightly.rationale import CommonRationale
from tests.conftest import tiny_resnet, two_view_batch

# --------------------------------------------------------------------------- backbones


def tiny_timm_vit(global_pool: str = "avg", drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """A 2-block, 32-wide timm ViT on 32 px images; ``kwargs`` go to ``create_model``."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=0,
        global_pool=global_pool,
        drop_path_rate=drop_path_rate,
        dynamic_img_size=True,
        **kwargs,
    )


def timm_factory(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A factory of the timm model ``name``, random weights, without its classifier."""
    return lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def torchvision_factory(name: str, head: str) -> Callable[[], nn.Module]:
    """A factory of torchvision's ``name`` with its classifier ``head`` replaced by Identity."""

    def build() -> nn.Module:
        model = getattr(torchvision.models, name)()
        setattr(model, head, nn.Identity())  # features instead of logits
        return model

    return build


def torchvision_vit() -> nn.Module:
    """A 2-layer, 32-wide torchvision ViT on 32 px images, returning its class token."""
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    vit.heads = nn.Identity()
    return vit


class Backbone(NamedTuple):
    """A tested backbone: factory, input side, expected layer and pool in the backbone.

    ``channels_last``: the map is (B, H, W, C) and the pool averages over (H, W).
    """

    build: Callable[[], nn.Module]
    size: int
    layer: str
    pool: Optional[str]
    channels_last: bool = False


BACKBONES: Dict[str, Backbone] = {
    "timm/resnet18": Backbone(timm_factory("resnet18"), 64, "layer4", "global_pool.pool"),
    "timm/efficientnet_lite0": Backbone(
        timm_factory("efficientnet_lite0"), 64, "bn2", "global_pool.pool"
    ),
    "timm/efficientnet_b0": Backbone(
        timm_factory("efficientnet_b0"), 64, "bn2", "global_pool.pool"
    ),
    "timm/mobilenetv3_small_100": Backbone(
        timm_factory("mobilenetv3_small_100"), 64, "blocks", "global_pool.pool"
    ),
    "timm/mobilenetv2_100": Backbone(
        timm_factory("mobilenetv2_100"), 64, "bn2", "global_pool.pool"
    ),
    "timm/convnext_atto": Backbone(
        timm_factory("convnext_atto"), 64, "stages", "head.global_pool.pool"
    ),
    "timm/regnetx_002": Backbone(timm_factory("regnetx_002"), 64, "s4", "head.global_pool.pool"),
    "timm/densenet121": Backbone(timm_factory("densenet121"), 64, "features", "global_pool.pool"),
    "timm/ghostnet_100": Backbone(timm_factory("ghostnet_100"), 64, "blocks", "global_pool.pool"),
    "torchvision/resnet18": Backbone(
        torchvision_factory("resnet18", "fc"), 64, "layer4", "avgpool"
    ),
    "torchvision/mobilenet_v3_small": Backbone(
        torchvision_factory("mobilenet_v3_small", "classifier"), 64, "features", "avgpool"
    ),
    "torchvision/efficientnet_b0": Backbone(
        torchvision_factory("efficientnet_b0", "classifier"), 64, "features", "avgpool"
    ),
    "torchvision/convnext_tiny": Backbone(
        torchvision_factory("convnext_tiny", "classifier"), 64, "features", "avgpool"
    ),
    # Swin returns a channels-last map (B, H, W, C) that its head averages over (H, W)
    "timm/swin (NHWC)": Backbone(
        timm_factory(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            window_size=4,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(1, 2),
        ),
        64,
        "norm",
        "head.global_pool.pool",
        channels_last=True,
    ),
    # ViTs pool tokens functionally: the map is the patch tokens of the last block that
    # reaches the loss (the block before the last one with class-token pooling).
    "timm/vit_tiny_patch16_224": Backbone(
        timm_factory("vit_tiny_patch16_224", img_size=64), 64, "blocks.10", None
    ),
    "torchvision/vit": Backbone(torchvision_vit, 32, "encoder.layers.encoder_layer_0", None),
}

# ------------------------------------------------------------------------------ clients


class ViTSiamese(LightningModule):
    """A SimSiam-style method around a ViT whose own pooling gives (B, D)."""

    def __init__(self, backbone: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(dim, 16)
        self.prediction = nn.Linear(16, 16)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x0, x1), _ = batch
        z0, z1 = self.projection(self.backbone(x0)), self.projection(self.backbone(x1))
        cos = nn.functional.cosine_similarity
        return -0.5 * (
            cos(self.prediction(z0), z1.detach()).mean()
            + cos(self.prediction(z1), z0.detach()).mean()
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SimSiamClient(LightningModule):
    """A minimal SimSiam-style method around any backbone returning (B, D) or (B, D, 1, 1)."""

    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(dim, 16)
        self.prediction = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x0, x1), _ = batch
        z0, z1 = self.projection(self(x0)), self.projection(self(x1))
        cos = nn.functional.cosine_similarity
        return -0.5 * (
            cos(self.prediction(z0), z1.detach()).mean()
            + cos(self.prediction(z1), z0.detach()).mean()
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [*self.backbone.parameters(), *self.projection.parameters()]
            + [*self.prediction.parameters()],
            lr=0.01,
        )


def features_dim(backbone: nn.Module, size: int) -> int:
    """Width D of the (flattened) output of ``backbone`` on a ``size`` px image (eval mode)."""
    backbone.eval()
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, size, size)).flatten(1).shape[1]
    backbone.train()
    return dim


def tiny_resnet_backbone() -> nn.Module:
    """The tiny ResNet of ``conftest`` without its classifier: (B, 16) features."""
    resnet = tiny_resnet()
    resnet.fc = nn.Identity()  # as lightly's benchmarks do with torchvision's resnet50
    return resnet


class SwAVClient(LightningModule):
    """The shape of lightly's SwAV benchmark module: multi-crop, SwaVLoss of shape (1,)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_resnet_backbone()
        self.projection_head = SwaVProjectionHead(16, 32, 16)
        self.prototypes = SwaVPrototypes(16, n_prototypes=8)
        self.criterion = SwaVLoss(sinkhorn_gather_distributed=False)
        self.online_classifier = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.prototypes.normalize()
        crops, targets = batch
        features = [self.forward(c).flatten(start_dim=1) for c in crops]
        projections = [nn.functional.normalize(self.projection_head(f), dim=1) for f in features]
        logits = [self.prototypes(p, step=self.current_epoch) for p in projections]
        loss = self.criterion(high_resolution_outputs=logits[:2], low_resolution_outputs=logits[2:])
        cls = nn.functional.cross_entropy(self.online_classifier(features[0].detach()), targets)
        return loss + cls  # shape (1,)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [
                {"params": [*self.backbone.parameters(), *self.projection_head.parameters()]},
                {"params": self.prototypes.parameters()},
                {"params": self.online_classifier.parameters(), "weight_decay": 0.0},
            ],
            lr=0.01,
        )


class DINOClient(LightningModule):
    """The shape of lightly's ResNet DINO benchmark module.

    ``backbone`` is the teacher: frozen in ``on_train_start`` (so it still requires
    gradient when the model is wrapped) and run under ``torch.no_grad``; the student is
    ``student_backbone``; ``forward`` runs the teacher.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_resnet_backbone()
        self.projection_head = DINOProjectionHead(16, 32, 8, 16)
        self.student_backbone = copy.deepcopy(self.backbone)
        # DINOProjectionHead uses weight_norm, which deepcopy refuses: build and copy.
        self.student_projection_head = DINOProjectionHead(16, 32, 8, 16)
        self.student_projection_head.load_state_dict(self.projection_head.state_dict())
        self.criterion = DINOLoss(output_dim=16, warmup_teacher_temp_epochs=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_student(self, x: Tensor) -> Tensor:
        return self.student_projection_head(self.student_backbone(x).flatten(start_dim=1))

    def on_train_start(self) -> None:
        deactivate_requires_grad(self.backbone)
        deactivate_requires_grad(self.projection_head)

    def on_train_end(self) -> None:
        activate_requires_grad(self.backbone)
        activate_requires_grad(self.projection_head)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        views = batch[0]
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        with torch.no_grad():
            teacher = self.projection_head(self.forward(global_views).flatten(start_dim=1))
        student = torch.cat([self.forward_student(global_views), self.forward_student(local_views)])
        loss = self.criterion(teacher.chunk(2), student.chunk(len(views)), epoch=0)
        update_momentum(self.student_backbone, self.backbone, m=0.99)
        update_momentum(self.student_projection_head, self.projection_head, m=0.99)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [*self.student_backbone.parameters(), *self.student_projection_head.parameters()],
            lr=0.01,
        )


def tiny_masked_vit(drop_path_rate: float = 0.0) -> nn.Module:
    """The tiny timm ViT (class-token pooling) inside lightly's MaskedVisionTransformerTIMM."""
    vit = tiny_timm_vit(global_pool="token", drop_path_rate=drop_path_rate)
    return MaskedVisionTransformerTIMM(vit=vit)


class DINOViTClient(DINOClient):
    """The shape of lightly's ViT DINO benchmark: teacher and student built separately
    (the student with drop path), the teacher under ``torch.no_grad`` and never frozen."""

    def __init__(self) -> None:
        LightningModule.__init__(self)
        self.backbone = tiny_masked_vit()
        self.projection_head = DINOProjectionHead(32, 32, 8, 16)
        self.student_backbone = tiny_masked_vit(drop_path_rate=0.1)
        self.student_projection_head = DINOProjectionHead(32, 32, 8, 16)
        self.criterion = DINOLoss(output_dim=16, warmup_teacher_temp_epochs=0)

    def on_train_start(self) -> None:
        pass

    def on_train_end(self) -> None:
        pass


class SoloLearnClient(LightningModule):
    """The shape of a solo-learn momentum method (BYOL): ``backbone`` online,
    ``momentum_backbone`` a frozen copy, optimiser groups from ``learnable_params``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_resnet_backbone()
        self.projector = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.predictor = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @property
    def learnable_params(self) -> List[Dict[str, Any]]:
        return [
            {"name": "backbone", "params": self.backbone.parameters()},
            {"name": "projector", "params": self.projector.parameters()},
            {"name": "predictor", "params": self.predictor.parameters()},
        ]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x0, x1), _ = batch
        p0, p1 = (self.predictor(self.projector(self.backbone(x))) for x in (x0, x1))
        with torch.no_grad():
            t0, t1 = (self.momentum_projector(self.momentum_backbone(x)) for x in (x0, x1))
        cos = nn.functional.cosine_similarity
        return 2 - cos(p0, t1).mean() - cos(p1, t0).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.learnable_params, lr=0.01)


class MultiCrop(Dataset):
    """Random multi-crop samples: 2 global 32 px crops and 4 local 16 px crops."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tuple[List[Tensor], int]:
        g = torch.Generator().manual_seed(i)
        crops = [torch.randn(3, 32, 32, generator=g) for _ in range(2)]
        return crops + [torch.randn(3, 16, 16, generator=g) for _ in range(4)], i % 4


def multi_crop_batch(b: int = 4) -> Tuple[List[Tensor], Tensor]:
    """One batch of ``b`` :class:`MultiCrop` samples: (6 crops of (b, 3, s, s), labels)."""
    return next(iter(DataLoader(MultiCrop(b), batch_size=b)))


class Client(NamedTuple):
    """A tested SSL method shape: its factory and a batch for one training step."""

    build: Callable[[], LightningModule]
    batch: Callable[[], Any]


CLIENTS: Dict[str, Client] = {
    "lightly SwAV (multi-crop, loss of shape (1,))": Client(SwAVClient, multi_crop_batch),
    "lightly DINO, ResNet (teacher in `backbone`)": Client(DINOClient, multi_crop_batch),
    "lightly DINO, ViT (teacher in `backbone`)": Client(DINOViTClient, multi_crop_batch),
    "solo-learn BYOL (`momentum_backbone`)": Client(
        SoloLearnClient, lambda: two_view_batch(b=4, size=32)
    ),
}


# ---------------------------------------------------------------------- training by hand


def common_rationale(model: nn.Module) -> CommonRationale:
    """The model's ``common_rationale`` submodule, checked to be one."""
    lcr = model.common_rationale
    assert isinstance(lcr, CommonRationale)
    return lcr


def train_steps(model: nn.Module, batch: Any, steps: int = 2) -> List[float]:
    """Wrapped training steps by hand; (b) on each: KL > 0, every head parameter learns."""
    lcr = common_rationale(model)
    optimizer = model.configure_optimizers()
    kls: List[float] = []
    lcr.record = True
    model.train()
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            total = model.training_step(batch, 0)
            assert total.dim() == 0
            kls.append(float(lcr.last_step.kl))
            total.backward()
            for name, p in lcr.head.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            optimizer.step()
    finally:
        lcr.record = False
    assert len(kls) == steps and all(kl > 0 for kl in kls), kls
    return kls
