import copy
import math
import os
import warnings

import pytest
import torch
import torchvision
from pytorch_lightning import LightningModule
from torch import nn

from lcr_lightly import (
    CommonRationale,
    FeatureCapture,
    GradCAMFitLoss,
    attach,
    count_hooks,
    gradcam,
    release,
    set_pooling,
    with_common_rationale,
)
from lcr_lightly.models import BYOL, MoCoV2
from tests import reference as by_hand
from tests.conftest import ToySiamese, loader, quiet_trainer, tiny_resnet, two_view_batch


def _all_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _expected_total(unwrapped, head, batch, weight):
    """SSL loss + weight * mean KL over both views, computed without the wrapper."""
    with FeatureCapture(unwrapped.backbone.layer4) as capture:
        ssl = ToySiamese.training_step(unwrapped, batch, 0)
        maps = list(capture.maps)
    cams = [
        torch.relu((f * g).sum(1))
        for f, g in zip(maps, torch.autograd.grad(ssl, maps, retain_graph=True))
    ]
    kls = [GradCAMFitLoss()(head(f), c) for f, c in zip(maps, cams)]
    return ssl + weight * (kls[0] + kls[1]) / 2


def test_total_loss_is_ssl_plus_weighted_kl_exactly(toy):
    batch = two_view_batch()
    weight = 0.37
    # Independent computation on a copy of the unwrapped model and a copy of the head.
    reference = copy.deepcopy(toy)
    model = with_common_rationale(toy, k=4, weight=weight)
    head = copy.deepcopy(model.common_rationale.head)
    expected = _expected_total(reference, head, batch, weight)
    total = model.training_step(batch, 0)
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-6)
    assert isinstance(model, ToySiamese) and isinstance(model.common_rationale, CommonRationale)


def test_head_and_backbone_get_gradients_and_detach_features(toy):
    batch = two_view_batch()
    model = with_common_rationale(toy, k=4, weight=1.0)
    model.training_step(batch, 0).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.common_rationale.parameters()
    )

    # detach_features=True: the KL gradient must not reach the backbone.
    torch.manual_seed(0)
    a = with_common_rationale(ToySiamese(), k=4, weight=1.0, detach_features=True)
    torch.manual_seed(0)
    b = ToySiamese()
    a.training_step(batch, 0).backward()
    ToySiamese.training_step(b, batch, 0).backward()
    for pa, pb in zip(a.backbone.parameters(), b.backbone.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    assert a.common_rationale.head.conv.weight.grad.abs().sum() > 0


def test_hooks_see_online_views_only():
    torch.manual_seed(0)
    model = with_common_rationale(
        BYOL(backbone=tiny_resnet(), batch_size=8, hidden_dim=16, out_dim=8), k=4
    )
    model.common_rationale.record = True
    model.training_step(two_view_batch(), 0)
    # two online views; the momentum encoder's two forward passes are not captured
    seen = [tuple(m.shape) for m in model.common_rationale.last_step.maps]
    assert seen == [(8, 16, 4, 4), (8, 16, 4, 4)]
    # The momentum copy's pool is hooked for inference (eval only); its layer is not.
    assert model.common_rationale.online_decided
    assert count_hooks(model.momentum_backbone) == count_hooks(model.momentum_backbone.avgpool) == 1


def test_deepcopy_after_wrapping_does_not_double_capture(toy):
    model = with_common_rationale(toy, k=4)
    capture = model.common_rationale.capture
    model.momentum_backbone = copy.deepcopy(model.backbone)  # copies a dead hook
    model.train()
    x = torch.randn(2, 3, 32, 32)
    model.momentum_backbone(x)  # with gradient, in training mode
    assert capture.maps == []
    model.backbone(x)
    assert len(capture.maps) == 1
    capture.clear()
    # A whole-model copy gets its own working capture and pooling.
    clone = copy.deepcopy(model)
    clone.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
        clone.common_rationale.head.conv.weight.mul_(-1)
        assert not torch.allclose(clone(x), model(x))  # the clone pools with its own head
    clone.train()
    clone.backbone(x)
    assert len(clone.common_rationale.capture.maps) == 1 and capture.maps == []


def test_wrap_before_momentum_copy_does_not_double_capture():
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    model.momentum = copy.deepcopy(model.backbone)
    for p in model.momentum.parameters():
        p.requires_grad_(False)
    batch = two_view_batch()
    model.common_rationale.record = True
    with torch.enable_grad():
        model.momentum(batch[0][0])
    model.training_step(batch, 0)
    assert len(model.common_rationale.last_step.maps) == 2  # the two online views only


def test_release_removes_everything(toy):
    before = _all_forward_hooks(toy)
    x = torch.randn(2, 3, 32, 32)
    toy.eval()
    gap = toy(x)
    model = with_common_rationale(toy, k=4)
    # capture on layer4, pooling on avgpool, the pooling check on the model
    assert "training_step" in model.__dict__ and count_hooks(model) == 3
    model.momentum = copy.deepcopy(model.backbone)  # leaves a dead copy of the hook
    lcr = release(model)
    assert isinstance(lcr, CommonRationale)
    assert _all_forward_hooks(model) == before == 0
    assert "training_step" not in model.__dict__ and "configure_optimizers" not in model.__dict__
    assert not hasattr(model, "common_rationale")
    model.eval()
    torch.testing.assert_close(model(x), gap)
    with_common_rationale(model, k=4)  # can be wrapped again after release


def test_pooling_modes(toy):
    x = torch.randn(3, 3, 32, 32)
    model = with_common_rationale(toy, k=4)
    model.eval()
    with torch.no_grad():
        fmap = nn.Sequential(*list(model.backbone.children())[:8])(x)
        expected = model.common_rationale.head.pool(fmap)
        assert model.common_rationale.pooling == "rationale"
        torch.testing.assert_close(model(x), expected)
        set_pooling(model, "gap")
        torch.testing.assert_close(model(x), fmap.mean(dim=(2, 3)))
        set_pooling(model, "rationale")
        torch.testing.assert_close(model(x), expected)
    model.train()  # training keeps global average pooling
    out = model(x)
    model.common_rationale.capture.clear()
    torch.testing.assert_close(
        out, nn.Sequential(*list(model.backbone.children())[:8])(x).mean((2, 3))
    )
    with pytest.raises(ValueError, match="Unknown pooling='max'"):
        set_pooling(model, "max")


def test_state_dict_roundtrip_gives_identical_features(tmp_path):
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    quiet_trainer(max_steps=2).fit(model, loader())
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    assert any(k.startswith("common_rationale.head.") for k in model.state_dict())
    torch.manual_seed(1)
    fresh = with_common_rationale(ToySiamese(), k=4)
    fresh.load_state_dict(torch.load(path))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_head_is_added_to_explicit_param_groups_and_scheduler_still_works(toy):
    model = with_common_rationale(toy, k=4)
    trainer = quiet_trainer(max_steps=3)
    head_before = model.common_rationale.head.conv.weight.detach().clone()
    trainer.fit(model, loader())
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.common_rationale.parameters())
    assert not torch.equal(head_before, model.common_rationale.head.conv.weight)


def test_dict_output_gets_the_kl_term_and_keeps_other_keys():
    class DictOut(ToySiamese):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": 1}

    torch.manual_seed(0)
    model = DictOut()
    reference = copy.deepcopy(model)
    with_common_rationale(model, k=4, weight=0.37)
    head = copy.deepcopy(model.common_rationale.head)
    batch = two_view_batch()
    out = model.training_step(batch, 0)
    assert set(out) == {"loss", "extra"} and out["extra"] == 1
    expected = _expected_total(reference, head, batch, 0.37)
    torch.testing.assert_close(out["loss"], expected, rtol=0, atol=1e-6)


def test_errors_are_clear(toy):
    model = with_common_rationale(toy, k=4)
    with pytest.raises(ValueError, match="wrapped already"):
        with_common_rationale(model)

    class ReturnsNone(ToySiamese):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            return None

    with pytest.raises(TypeError, match="returned NoneType.*scalar loss"):
        with_common_rationale(ReturnsNone(), k=4).training_step(two_view_batch(), 0)

    class VectorLoss(ToySiamese):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * torch.ones(3)

    with pytest.raises(TypeError, match="shape"):
        with_common_rationale(VectorLoss(), k=4).training_step(two_view_batch(), 0)

    class NoBackbone(LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = tiny_resnet()

        def training_step(self, batch, batch_idx):
            return self.encoder(batch).sum()

    # The only image encoder is found whatever its attribute name.
    auto = with_common_rationale(NoBackbone(), k=4).common_rationale
    assert (auto.layer_name, auto.pool_name) == ("encoder.layer4", "encoder.avgpool")

    class TwoEncoders(NoBackbone):
        def __init__(self):
            super().__init__()
            self.other = torchvision.models.resnet18()

    with pytest.raises(ValueError, match="no 'backbone'.*'encoder'.*'other'"):
        with_common_rationale(TwoEncoders())
    wrapped = with_common_rationale(NoBackbone(), layer="encoder.layer4", k=4)
    assert wrapped.common_rationale.capture.layer is wrapped.encoder.layer4
    with pytest.raises(ValueError, match="No layer named 'encoder.layer9'"):
        with_common_rationale(NoBackbone(), layer="encoder.layer9")

    with pytest.raises(TypeError, match="no training_step"):
        with_common_rationale(tiny_resnet())

    class Manual(ToySiamese):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="manual optimisation"):
        with_common_rationale(Manual())

    with pytest.raises(ValueError) as err:  # checked at wrap time, named from the model
        with_common_rationale(ToySiamese(), in_channels=7)
    assert str(err.value) == (
        "in_channels=7, but layer 'backbone.layer4' gives maps of shape (2, 16, 8, 8): 16 "
        "channels. Leave in_channels out (it is read off the dry forward) or pass the right "
        "layer=."
    )


def test_no_captured_map_is_an_error():
    class MomentumOnly(ToySiamese):
        def training_step(self, batch, batch_idx):
            with torch.no_grad():
                self.backbone(batch[0][0])
            return self.projection.weight.sum()

    model = with_common_rationale(MomentumOnly(), k=4)
    with pytest.raises(RuntimeError, match="captured no feature map"):
        model.training_step(two_view_batch(), 0)

    class OffPath(ToySiamese):
        def training_step(self, batch, batch_idx):
            self.backbone(batch[0][0])  # a monitoring forward, not part of the loss
            return self.projection.weight.sum()

    with pytest.raises(RuntimeError, match="does not depend on any feature map"):
        with_common_rationale(OffPath(), k=4).training_step(two_view_batch(), 0)


def test_views_the_loss_ignores_are_skipped():
    class ExtraForward(ToySiamese):
        def training_step(self, batch, batch_idx):
            self.backbone(batch[0][0])  # captured, but off the loss path
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = with_common_rationale(ExtraForward(), k=4)
    assert model.training_step(two_view_batch(), 0).dim() == 0


def test_nonfinite_handling(toy):
    class NanLoss(ToySiamese):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    with pytest.raises(FloatingPointError, match="SSL loss"):
        with_common_rationale(NanLoss(), k=4).training_step(two_view_batch(), 0)
    skipping = with_common_rationale(NanLoss(), k=4, nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert skipping.training_step(two_view_batch(), 0) is None

    model = with_common_rationale(toy, k=4)
    with torch.no_grad():
        model.common_rationale.head.conv.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="KL"):
        model.training_step(two_view_batch(), 0)
    model.common_rationale.nonfinite = "skip"
    with pytest.warns(RuntimeWarning):
        out = model.training_step(two_view_batch(), 0)
    assert math.isfinite(out.item())


def test_readme_plain_loop_line_with_skip_gives_zero_for_a_skipped_term():
    """``loss + 0.01 * lcr.kl_term(loss)`` (README) must work when a term is skipped."""
    torch.manual_seed(0)
    backbone = tiny_resnet()
    backbone.fc = nn.Identity()
    lcr = attach(backbone, k=4, nonfinite="skip")
    with torch.no_grad():
        lcr.head.conv.weight.fill_(float("inf"))  # a non-finite head map, hence KL
    loss = backbone(torch.randn(4, 3, 32, 32)).pow(2).mean()
    with pytest.warns(RuntimeWarning) as caught:
        kl = lcr.kl_term(loss)
    total = loss + 0.01 * kl
    assert kl.dim() == 0 and kl.item() == 0.0 and torch.equal(total, loss)
    assert str(caught[0].message) == (
        "LCR: the LCR KL term is not finite (NaN or inf). Lower the learning rate, check the "
        "inputs, or pass nonfinite='skip' to drop such terms with a warning. Skipped."
    )
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add stack frames
        assert caught[0].filename == __file__  # attributed to the caller's line
    lcr.nonfinite = "error"
    with pytest.raises(FloatingPointError) as err:
        lcr.kl_term(backbone(torch.randn(4, 3, 32, 32)).pow(2).mean())
    assert str(err.value) == str(caught[0].message).removesuffix(" Skipped.")


def test_single_position_maps_warn_once_that_the_kl_is_zero():
    torch.manual_seed(0)
    backbone = tiny_resnet()
    backbone.fc = nn.Identity()
    lcr = attach(backbone, k=4)
    for _ in range(2):  # 8 px through a stride-8 stem and three stride-2 stages: 1x1
        loss = backbone(torch.randn(2, 3, 8, 8)).pow(2).mean()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kl = lcr.kl_term(loss)
        assert kl.item() == 0.0
        messages = [str(w.message) for w in caught if "1x1" in str(w.message)]
        assert len(messages) == (1 if _ == 0 else 0), messages


def test_step_record_holds_what_the_step_computed(toy):
    batch = two_view_batch()
    reference = copy.deepcopy(toy)
    model = with_common_rationale(toy, k=4, weight=0.37)
    head = copy.deepcopy(model.common_rationale.head)
    lcr = model.common_rationale
    model.training_step(batch, 0)
    assert lcr.last_step is None  # nothing is kept unless asked for
    lcr.record = True
    total = model.training_step(batch, 0)
    step = lcr.last_step
    with FeatureCapture(reference.backbone.layer4) as capture:
        ssl = ToySiamese.training_step(reference, batch, 0)
        maps = list(capture.maps)
    grads = torch.autograd.grad(ssl, maps, retain_graph=True)
    for i, (f, g) in enumerate(zip(maps, grads)):
        torch.testing.assert_close(step.maps[i], f.detach())
        torch.testing.assert_close(step.gradcams[i], torch.relu((f * g).sum(1)))
        torch.testing.assert_close(step.head_maps[i], by_hand.head_map(head, f).detach())
    torch.testing.assert_close(step.ssl_loss, ssl.detach())
    torch.testing.assert_close(total.detach(), ssl.detach() + 0.37 * step.kl)
    kls = [by_hand.kl_term(lcr, f, c) for f, c in zip(step.maps, step.gradcams)]
    torch.testing.assert_close(step.kls, [k.detach() for k in kls])
    torch.testing.assert_close(step.kl, (sum(kls) / len(kls)).detach())
    assert step.layer_name == "backbone.layer4" and step.seconds > 0


def test_functional_api_plain_loop():
    torch.manual_seed(0)
    backbone = tiny_resnet()
    backbone.fc = nn.Identity()
    projector = nn.Linear(16, 8)
    lcr = attach(backbone, k=4)
    opt = torch.optim.SGD(
        [*backbone.parameters(), *projector.parameters(), *lcr.parameters()], lr=0.1
    )
    (x0, x1), _ = two_view_batch()
    loss = -nn.functional.cosine_similarity(
        projector(backbone(x0)), projector(backbone(x1)).detach()
    ).mean()
    kl = lcr.kl_term(loss)
    # matches the parts used one by one
    assert lcr.capture.maps == []
    (loss + 0.01 * kl).backward()
    opt.step()
    assert lcr.head.conv.weight.grad is not None


def test_parts_compose_by_hand():
    torch.manual_seed(0)
    backbone = tiny_resnet()
    with FeatureCapture(backbone.layer4) as capture:
        loss = backbone(torch.randn(2, 3, 32, 32)).pow(2).mean()
        (cam,) = gradcam(loss, capture.maps)
        head_map = attach(backbone, k=4).head(capture.maps[0])
    kl = GradCAMFitLoss()(head_map, cam)
    # By hand (the default, official MoCo loss): A min-max normalised over the batch, each
    # row of W positions its own softmax, KL(p||q) summed over rows and images.
    a = (head_map - head_map.min()) / (head_map.max() - head_map.min() + 1e-7)
    p, q = torch.softmax(cam, dim=-1), torch.softmax(a, dim=-1)
    expected = (p * (p.log() - q.log())).sum()
    assert kl.dim() == 0 and kl.item() > 1e-4
    torch.testing.assert_close(kl, expected)


def test_mocov2_backbone_is_the_query_encoder():
    model = with_common_rationale(
        MoCoV2(backbone=tiny_resnet(), batch_size=8, memory_bank_size=16, hidden_dim=16, out_dim=8),
        k=4,
    )
    assert model.common_rationale.capture.layer is model.backbone.layer4
    assert model.training_step(two_view_batch(), 0).dim() == 0
