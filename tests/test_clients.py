"""LCR on real backbone families and SSL method shapes, with no layer=/pool= argument.

For every backbone and every client module the same four properties are checked:

(a) the map the capture hooks *is* the tensor the pool consumes (recorded here with our
    own forward pre-hook on the pool, in a training-mode forward);
(b) the KL term is positive and every head parameter gets a non-zero gradient;
(c) in eval mode the pool returns ``head.pool(pool input)``, which differs from GAP;
(d) after ``release`` the model returns exactly what an unwrapped copy with the same
    weights returns.

The clients are written here in the shape of lightly's benchmark modules (SwAV with
multi-crop and a loss of shape (1,), DINO whose ``backbone`` is the teacher) and of a
solo-learn method (``backbone`` + ``momentum_backbone``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest
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

from lcr_lightly import attach, release, set_pooling, with_common_rationale
from lcr_lightly.rationale import CommonRationale
from tests.conftest import quiet_trainer, tiny_resnet, two_view_batch
from tests.test_vit import tiny_timm_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny inputs: one intra-op thread is as fast and does not spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- backbones


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _torchvision(name: str, head: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = getattr(torchvision.models, name)()
        setattr(model, head, nn.Identity())  # features instead of logits
        return model

    return build


def _torchvision_vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    vit.heads = nn.Identity()
    return vit


class Backbone(NamedTuple):
    """A tested backbone: factory, input side, expected layer and pool in the backbone."""

    build: Callable[[], nn.Module]
    size: int
    layer: str
    pool: Optional[str]


BACKBONES: Dict[str, Backbone] = {
    "timm/resnet18": Backbone(_timm("resnet18"), 64, "layer4", "global_pool.pool"),
    "timm/efficientnet_lite0": Backbone(_timm("efficientnet_lite0"), 64, "bn2", "global_pool.pool"),
    "timm/efficientnet_b0": Backbone(_timm("efficientnet_b0"), 64, "bn2", "global_pool.pool"),
    "timm/mobilenetv3_small_100": Backbone(
        _timm("mobilenetv3_small_100"), 64, "blocks", "global_pool.pool"
    ),
    "timm/mobilenetv2_100": Backbone(_timm("mobilenetv2_100"), 64, "bn2", "global_pool.pool"),
    "timm/convnext_atto": Backbone(_timm("convnext_atto"), 64, "stages", "head.global_pool.pool"),
    "timm/regnetx_002": Backbone(_timm("regnetx_002"), 64, "s4", "head.global_pool.pool"),
    "timm/densenet121": Backbone(_timm("densenet121"), 64, "features", "global_pool.pool"),
    "timm/ghostnet_100": Backbone(_timm("ghostnet_100"), 64, "blocks", "global_pool.pool"),
    "torchvision/resnet18": Backbone(_torchvision("resnet18", "fc"), 64, "layer4", "avgpool"),
    "torchvision/mobilenet_v3_small": Backbone(
        _torchvision("mobilenet_v3_small", "classifier"), 64, "features", "avgpool"
    ),
    "torchvision/efficientnet_b0": Backbone(
        _torchvision("efficientnet_b0", "classifier"), 64, "features", "avgpool"
    ),
    "torchvision/convnext_tiny": Backbone(
        _torchvision("convnext_tiny", "classifier"), 64, "features", "avgpool"
    ),
    # ViTs pool tokens functionally: the map is the patch tokens of the last block that
    # reaches the loss (the block before the last one with class-token pooling).
    "timm/vit_tiny_patch16_224": Backbone(
        _timm("vit_tiny_patch16_224", img_size=64), 64, "blocks.10", None
    ),
    "torchvision/vit": Backbone(_torchvision_vit, 32, "encoder.layers.encoder_layer_0", None),
}

# ------------------------------------------------------------------------------ clients


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


def _features_dim(backbone: nn.Module, size: int) -> int:
    backbone.eval()
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, size, size)).flatten(1).shape[1]
    backbone.train()
    return dim


def _tiny_resnet_backbone() -> nn.Module:
    resnet = tiny_resnet()
    resnet.fc = nn.Identity()  # as lightly's benchmarks do with torchvision's resnet50
    return resnet


class SwAVClient(LightningModule):
    """The shape of lightly's SwAV benchmark module: multi-crop, SwaVLoss of shape (1,)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _tiny_resnet_backbone()
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
        self.backbone = _tiny_resnet_backbone()
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


def _tiny_vit(drop_path_rate: float = 0.0) -> nn.Module:
    vit = tiny_timm_vit(global_pool="token", drop_path_rate=drop_path_rate)
    return MaskedVisionTransformerTIMM(vit=vit)


class DINOViTClient(DINOClient):
    """The shape of lightly's ViT DINO benchmark: teacher and student built separately
    (the student with drop path), the teacher under ``torch.no_grad`` and never frozen."""

    def __init__(self) -> None:
        LightningModule.__init__(self)
        self.backbone = _tiny_vit()
        self.projection_head = DINOProjectionHead(32, 32, 8, 16)
        self.student_backbone = _tiny_vit(drop_path_rate=0.1)
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
        self.backbone = _tiny_resnet_backbone()
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

# ------------------------------------------------------------------------------ checks


def _lcr(model: nn.Module) -> CommonRationale:
    lcr = model.common_rationale
    assert isinstance(lcr, CommonRationale)
    return lcr


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def check_hooked_map_is_pool_input(model: nn.Module, encoder: nn.Module, x: Tensor) -> None:
    """(a): in training mode, the captured map is the object the pool receives."""
    lcr = _lcr(model)
    assert lcr.pooler is not None
    seen: List[Tensor] = []
    handle = lcr.pooler.module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.train()
    lcr.clear()
    try:
        encoder(x)
        assert len(seen) == 1 and len(lcr.capture.outputs) == 1
        assert lcr.capture.outputs[0] is seen[0]
    finally:
        handle.remove()
        lcr.clear()


def train_steps(model: nn.Module, batch: Any, steps: int = 2) -> List[float]:
    """Wrapped training steps by hand; (b) on each: KL > 0, every head parameter learns."""
    lcr = _lcr(model)
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


def check_eval_pooling(model: nn.Module, pool: nn.Module, x: Tensor) -> None:
    """(c): in eval mode the pool returns head.pool(its input), which differs from GAP."""
    lcr = _lcr(model)
    inputs: List[Tensor] = []
    outputs: List[Tensor] = []
    handles = [
        pool.register_forward_pre_hook(lambda m, args: inputs.append(args[0])),
        pool.register_forward_hook(lambda m, args, out: outputs.append(out)),
    ]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the pooling check stays quiet
            model(x)
            assert len(inputs) == len(outputs) == 1
            fmap, pooled = inputs[0], outputs[0].flatten(1)
            torch.testing.assert_close(pooled, lcr.head.pool(fmap), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(pooled, fmap.mean(dim=(2, 3)), rtol=1e-3, atol=1e-4)
    finally:
        for handle in handles:
            handle.remove()


def check_release_restores_gap(model: nn.Module, reference: nn.Module, x: Tensor) -> None:
    """(d): after release the output equals an unwrapped copy's with the same weights."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("common_rationale.")}
    reference.load_state_dict(state)
    release(model)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


# ------------------------------------------------------------------------ backbone matrix


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_family(name: str) -> None:
    spec = BACKBONES[name]
    torch.manual_seed(0)
    backbone = spec.build()
    model = SimSiamClient(backbone, _features_dim(backbone, spec.size))
    reference = copy.deepcopy(model)
    buffers = [b.clone() for b in model.buffers()]
    with_common_rationale(model, k=4)
    lcr = _lcr(model)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # dry forward
    assert lcr.layer_name == f"backbone.{spec.layer}"
    assert lcr.capture.layer is _module(model, lcr.layer_name)
    batch = two_view_batch(b=2, size=spec.size)
    x = batch[0][0]
    if spec.pool is None:  # ViT
        assert lcr.pooler is None and lcr.pool_name is None
        with pytest.raises(ValueError, match=f"consumes the output of '{lcr.layer_name}'"):
            set_pooling(model, "rationale")
    else:
        assert lcr.pool_name == f"backbone.{spec.pool}"
        pool = _module(model, lcr.pool_name)
        assert lcr.pooler is not None and lcr.pooler.module is pool
        check_hooked_map_is_pool_input(model, model.backbone, x)
        if hasattr(backbone, "forward_features"):  # timm's contract: forward_head pools it
            backbone.eval()
            with torch.no_grad():
                seen: List[Tensor] = []
                handle = pool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
                features = backbone.forward_features(x)
                backbone.forward_head(features)
                handle.remove()
            assert seen[0] is features
    train_steps(model, batch)
    if spec.pool is not None:
        check_eval_pooling(model, _module(model, lcr.pool_name), x)
    check_release_restores_gap(model, reference, x)


# ------------------------------------------------------------------------------ methods


def test_swav_multi_crop_with_a_loss_of_shape_one() -> None:
    torch.manual_seed(0)
    model = SwAVClient()
    reference = copy.deepcopy(model)
    batch = multi_crop_batch()
    assert SwAVClient.training_step(model, batch, 0).shape == (1,)
    with_common_rationale(model, k=4)
    lcr = _lcr(model)
    assert (lcr.layer_name, lcr.pool_name) == ("backbone.layer4", "backbone.avgpool")
    lcr.record = True
    model.training_step(batch, 0)
    lcr.record = False
    assert len(lcr.last_step.maps) == 6  # every crop, global and local, is an online view
    check_hooked_map_is_pool_input(model, model.backbone, batch[0][0])
    train_steps(model, batch)
    check_eval_pooling(model, model.backbone.avgpool, batch[0][0])
    check_release_restores_gap(model, reference, batch[0][0])


def test_functional_kl_term_accepts_a_loss_of_shape_one() -> None:
    torch.manual_seed(0)
    client = SwAVClient()
    lcr = attach(client.backbone, k=4)
    crops, _ = multi_crop_batch()

    def swav_loss() -> Tensor:
        logits = [
            client.prototypes(nn.functional.normalize(client.projection_head(client(c)), dim=1))
            for c in crops
        ]
        return client.criterion(logits[:2], logits[2:])

    loss = swav_loss()
    assert loss.shape == (1,)
    kl_vector = lcr.kl_term(loss)
    kl_scalar = lcr.kl_term(swav_loss().reshape(()))  # same weights and crops
    assert kl_vector is not None and kl_scalar is not None and kl_vector.dim() == 0
    torch.testing.assert_close(kl_vector, kl_scalar, rtol=0, atol=0)


def test_dino_online_encoder_is_the_student_and_the_teacher_pools_at_inference() -> None:
    torch.manual_seed(0)
    model = DINOClient()
    reference = DINOClient()  # same architecture; weights are loaded before comparing
    with_common_rationale(model, k=4)
    lcr = _lcr(model)
    # Both encoders require gradient at wrap time (the teacher is frozen in
    # on_train_start): the first training step decides from the loss path.
    assert not lcr.online_decided
    assert lcr.pool_names == ["backbone.avgpool", "student_backbone.avgpool"]
    trainer = quiet_trainer(max_steps=2)
    head_before = lcr.head.conv.weight.detach().clone()
    trainer.fit(model, DataLoader(MultiCrop(8), batch_size=4))
    assert trainer.global_step == 2 and float(trainer.callback_metrics["train_lcr_kl"]) > 0
    assert not torch.equal(head_before, lcr.head.conv.weight)
    assert lcr.online_decided
    assert (lcr.layer_name, lcr.pool_name) == (
        "student_backbone.layer4",
        "student_backbone.avgpool",
    )
    assert lcr.capture.layer is model.student_backbone.layer4
    assert lcr.pool_names == ["student_backbone.avgpool", "backbone.avgpool"]
    model.trainer = None  # the steps below are by hand
    model.on_train_start()  # Lightning's on_train_end unfroze the teacher; freeze it again
    batch = multi_crop_batch()
    check_hooked_map_is_pool_input(model, model.student_backbone, batch[0][0])
    train_steps(model, batch)
    # forward runs the teacher: its pool applies the head trained on the student's maps
    check_eval_pooling(model, model.backbone.avgpool, batch[0][0])
    check_release_restores_gap(model, reference, batch[0][0])


def test_dino_explicit_student_layer_keeps_the_teacher_pool() -> None:
    torch.manual_seed(0)
    model = with_common_rationale(DINOClient(), k=4, layer="student_backbone.layer4")
    lcr = _lcr(model)
    assert lcr.online_decided and lcr.pool_names == [
        "student_backbone.avgpool",
        "backbone.avgpool",
    ]
    model.on_train_start()
    batch = multi_crop_batch()
    train_steps(model, batch)
    check_eval_pooling(model, model.backbone.avgpool, batch[0][0])


def test_dino_vit_student_is_found_and_an_explicit_block_keeps_token_inference() -> None:
    torch.manual_seed(0)
    model = DINOViTClient()
    reference = DINOViTClient()  # same architecture; weights are loaded before comparing
    with_common_rationale(model, k=4)
    lcr = _lcr(model)
    assert not lcr.online_decided and lcr.pool_names == []
    batch = multi_crop_batch()
    train_steps(model, batch)
    assert lcr.online_decided and lcr.layer_name == "student_backbone.vit.blocks.0"
    assert lcr.capture.layer is model.student_backbone.vit.blocks[0]
    check_release_restores_gap(model, reference, batch[0][0])

    explicit = with_common_rationale(DINOViTClient(), k=4, layer="student_backbone.vit.blocks.1")
    lcr = _lcr(explicit)
    assert lcr.head.in_channels == 32 and lcr.capture.reshape is not None
    train_steps(explicit, batch)


def test_solo_learn_method_uses_the_online_backbone() -> None:
    torch.manual_seed(0)
    model = SoloLearnClient()
    reference = copy.deepcopy(model)
    with_common_rationale(model, k=4)
    lcr = _lcr(model)
    assert lcr.online_decided
    assert (lcr.layer_name, lcr.pool_name) == ("backbone.layer4", "backbone.avgpool")
    assert lcr.pool_names == ["backbone.avgpool", "momentum_backbone.avgpool"]
    batch = two_view_batch(b=4, size=32)
    x = batch[0][0]
    check_hooked_map_is_pool_input(model, model.backbone, x)
    train_steps(model, batch)
    check_eval_pooling(model, model.backbone.avgpool, x)
    check_release_restores_gap(model, reference, x)


# ------------------------------------------------------------------------- refusals


def test_functional_pooling_is_refused_at_wrap_time_with_what_to_pass() -> None:
    class FunctionalPool(SimSiamClient):
        def forward(self, x: Tensor) -> Tensor:
            return self.backbone.forward_features(x).mean(dim=(2, 3))

    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    backbone.global_pool = nn.Identity()  # pooled functionally by the method instead
    with pytest.raises(ValueError) as err:
        with_common_rationale(FunctionalPool(backbone, 512))
    message = str(err.value)
    assert message.startswith(
        "ResNet has no global average pooling module (dry forward at 224x224 px): it pools "
        "functionally (x.mean((2, 3)), F.adaptive_avg_pool2d) or its last map is already 1x1, "
        "so the head could not be trained on the map that is pooled at inference. Pass "
        "layer=<dotted name> to train on one of these maps (set_pooling('rationale') is then "
        "unavailable; pool with common_rationale.head.pool(map) yourself): "
        "'layer4' (2, 512, 7, 7), "  # timm declares 224 px: pretrained_cfg
    )
    candidates = message.split("yourself): ")[1].rstrip(".").split(", '")
    assert len(candidates) == 8  # the last eight maps, the stage's output first
    assert all(c.endswith("(2, 512, 7, 7)") for c in candidates)  # 224 px / stride 32

    # With layer= it trains as before; rationale pooling is then unavailable, loudly.
    model = with_common_rationale(FunctionalPool(backbone, 512), k=4, layer="backbone.layer4")
    lcr = _lcr(model)
    assert lcr.pool_names == [] and lcr.pooling == "gap" and lcr.head.in_channels == 512
    train_steps(model, two_view_batch(b=2, size=64))
    with pytest.raises(ValueError, match="consumes the output of 'backbone.layer4'"):
        set_pooling(model, "rationale")


def test_max_pooling_is_refused_at_wrap_time() -> None:
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="max")
    with pytest.raises(ValueError) as err:
        with_common_rationale(SimSiamClient(backbone, 512))
    assert str(err.value) == (
        "The global pooling of ResNet, 'global_pool.pool' (AdaptiveMaxPool2d), maps "
        "(2, 512, 7, 7) to (2, 512, 1, 1) but is not average pooling (max, avg+max or "
        "concatenated avg/max pooling: its output is neither the channels-first nor the "
        "channels-last spatial mean). Rationale pooling replaces global average pooling "
        "only; build the backbone with average pooling (timm: global_pool='avg')."
    )


def test_forward_that_bypasses_the_pool_warns_in_eval() -> None:
    class Bypass(SoloLearnClient):
        def forward(self, x: Tensor) -> Tensor:  # pools layer4 functionally
            body = nn.Sequential(*list(self.backbone.children())[:-2])
            return body(x).mean(dim=(2, 3))

    model = with_common_rationale(Bypass(), k=4).eval()
    for _ in range(2):  # every such call warns, not only the first
        with pytest.warns(RuntimeWarning, match=r"none of the pools .*'backbone.avgpool'"):
            model(torch.randn(2, 3, 32, 32))
    set_pooling(model, "gap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model(torch.randn(2, 3, 32, 32))


def test_two_trainable_encoders_on_the_loss_path_are_refused() -> None:
    class TwoTowers(DINOClient):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            (x0, x1), _ = batch
            return (self.backbone(x0) - self.student_backbone(x1)).pow(2).mean()

    model = with_common_rationale(TwoTowers(), k=4)
    with pytest.raises(RuntimeError, match="several encoders.*'backbone.layer4'.*'student_"):
        model.training_step(two_view_batch(b=2), 0)


def test_no_captured_map_names_the_layer_by_its_dotted_path() -> None:
    model = with_common_rationale(SoloLearnClient(), k=4, layer="momentum_backbone.layer4")
    with pytest.raises(
        RuntimeError, match="no feature map with gradient at 'momentum_backbone.layer4'"
    ):
        model.training_step(two_view_batch(b=2), 0)


def test_a_backbone_without_a_map_is_named_in_the_refusal() -> None:
    class MLPBackbone(SimSiamClient):
        def __init__(self) -> None:
            super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 8)), 8)
            self.decoder = nn.Conv2d(8, 3, 1)  # an encoder-looking child that is not used

    with pytest.raises(ValueError) as err:
        with_common_rationale(MLPBackbone())
    message = str(err.value)
    assert message.startswith("Sequential has no global average pooling module (dry forward at")
    assert message.endswith(
        "pool with common_rationale.head.pool(map) yourself): no module returns a map of 2+ "
        "positions."
    )


def test_extracted_features_pool_the_map_that_forward_runs_dino_teacher() -> None:
    from torch.utils.data import TensorDataset

    from lcr_lightly.eval import extract_features

    torch.manual_seed(0)
    model = DINOClient()
    with_common_rationale(model, k=4)
    model.on_train_start()  # freeze the teacher as Lightning would
    batch = multi_crop_batch()
    train_steps(model, batch, steps=1)  # the step decides: the student is online
    x = batch[0][0]
    feats = extract_features(
        model,
        DataLoader(TensorDataset(x, torch.arange(len(x))), batch_size=len(x)),
        ("gap", "rationale", "norm"),
        return_maps=True,
        progress=False,
    )
    lcr = _lcr(model)
    seen: List[Tensor] = []  # the teacher's map, recorded by the test's own hook
    handle = model.backbone.avgpool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.eval()
    with torch.no_grad():
        set_pooling(model, "gap")
        gap = model(x)
        set_pooling(model, "rationale")
    handle.remove()
    teacher_map = seen[0]
    torch.testing.assert_close(feats["gap"], gap.flatten(1))
    torch.testing.assert_close(feats["rationale"], lcr.head.pool(teacher_map))
    torch.testing.assert_close(feats["norm_map"], teacher_map.norm(dim=1))
    assert not torch.allclose(feats["rationale"], feats["gap"])
