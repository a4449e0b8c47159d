"""LCR on real backbone families and SSL method shapes, with no layer=/pool= argument.

For every backbone and every client module the same four properties are checked:

(a) the map the capture hooks *is* the tensor the pool consumes (recorded here with our
    own forward pre-hook on the pool, in a training-mode forward);
(b) the KL term is positive and every head parameter gets a non-zero gradient;
(c) in eval mode the pool returns ``head.pool(pool input)``, which differs from GAP;
(d) after ``release`` the model returns exactly what an unwrapped copy with the same
    weights returns.

The backbones and clients are the fixtures of ``tests/clients.py``: the shapes of
lightly's benchmark modules (SwAV with multi-crop and a loss of shape (1,), DINO whose
``backbone`` is the teacher) and of a solo-learn method (``backbone`` +
``momentum_backbone``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, List

import pytest
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lcr_lightly import attach, release, set_pooling, with_common_rationale
from tests.clients import (
    BACKBONES,
    DINOClient,
    DINOViTClient,
    MultiCrop,
    SimSiamClient,
    SoloLearnClient,
    SwAVClient,
    common_rationale,
    features_dim,
    multi_crop_batch,
    train_steps,
)
from tests.conftest import quiet_trainer, two_view_batch

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ checks


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def check_hooked_map_is_pool_input(model: nn.Module, encoder: nn.Module, x: Tensor) -> None:
    """(a): in training mode, the captured map is the object the pool receives."""
    lcr = common_rationale(model)
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


def check_eval_pooling(
    model: nn.Module, pool: nn.Module, x: Tensor, channels_last: bool = False
) -> None:
    """(c): in eval mode the pool returns head.pool(its input), which differs from GAP."""
    lcr = common_rationale(model)
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
            if channels_last:  # (B, H, W, C) as the head reads it
                fmap = fmap.permute(0, 3, 1, 2)
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
    model = SimSiamClient(backbone, features_dim(backbone, spec.size))
    reference = copy.deepcopy(model)
    buffers = [b.clone() for b in model.buffers()]
    with_common_rationale(model, k=4)
    lcr = common_rationale(model)
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
        check_eval_pooling(model, _module(model, lcr.pool_name), x, spec.channels_last)
    check_release_restores_gap(model, reference, x)


# ------------------------------------------------------------------------------ methods


def test_swav_multi_crop_with_a_loss_of_shape_one() -> None:
    torch.manual_seed(0)
    model = SwAVClient()
    reference = copy.deepcopy(model)
    batch = multi_crop_batch()
    assert SwAVClient.training_step(model, batch, 0).shape == (1,)
    with_common_rationale(model, k=4)
    lcr = common_rationale(model)
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
    lcr = common_rationale(model)
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
    lcr = common_rationale(model)
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
    lcr = common_rationale(model)
    assert not lcr.online_decided and lcr.pool_names == []
    batch = multi_crop_batch()
    train_steps(model, batch)
    assert lcr.online_decided and lcr.layer_name == "student_backbone.vit.blocks.0"
    assert lcr.capture.layer is model.student_backbone.vit.blocks[0]
    check_release_restores_gap(model, reference, batch[0][0])

    explicit = with_common_rationale(DINOViTClient(), k=4, layer="student_backbone.vit.blocks.1")
    lcr = common_rationale(explicit)
    assert lcr.head.in_channels == 32 and lcr.capture.reshape is not None
    train_steps(explicit, batch)


def test_solo_learn_method_uses_the_online_backbone() -> None:
    torch.manual_seed(0)
    model = SoloLearnClient()
    reference = copy.deepcopy(model)
    with_common_rationale(model, k=4)
    lcr = common_rationale(model)
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
    lcr = common_rationale(model)
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
    lcr = common_rationale(model)
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
