"""The LCR module and ``attach``: explicit arguments, and which encoder pools in training."""

import pytest
import torch
from torch import nn

from lcr_lightly import GradCAMFitLoss, attach, with_common_rationale
from tests.conftest import ToySiamese, tiny_resnet, two_view_batch


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    backbone = tiny_resnet()  # widths (8, 8, 16, 16): layer3 and layer4 give 16 channels
    backbone.fc = nn.Identity()
    return backbone


def test_attach_defaults_to_k32_the_last_stage_and_its_pool():
    backbone = _backbone()
    lcr = attach(backbone)
    assert lcr.head.k == 32 and lcr.head.in_channels == 16
    assert (lcr.layer_name, lcr.pool_name) == ("layer4", "avgpool")
    assert lcr.capture.layer is backbone.layer4 and lcr.pooler.module is backbone.avgpool


def test_attach_uses_the_layer_pool_loss_and_channels_it_is_given():
    backbone = _backbone()
    loss = GradCAMFitLoss(tau=0.7)
    lcr = attach(backbone, k=5, layer="layer3", loss=loss, in_channels=16)
    assert lcr.head.k == 5 and lcr.loss_fn is loss
    assert (lcr.layer_name, lcr.pool_name) == ("layer3", None)  # avgpool consumes layer4
    assert lcr.capture.layer is backbone.layer3
    x = torch.randn(2, 3, 32, 32)
    backbone(x)
    assert lcr.capture.maps[0].shape == (2, 16, 8, 8)  # layer3's map, not layer4's 4x4
    with pytest.raises(ValueError, match=r"^in_channels=12, but layer 'layer4' gives maps"):
        attach(_backbone(), in_channels=12)
    explicit = _backbone()
    lcr = attach(explicit, layer="layer4", pool="avgpool")
    assert lcr.capture.layer is explicit.layer4 and lcr.pooler.module is explicit.avgpool
    # The dry forward runs 64 px; the small-input stem makes layer4 stride 8: 8x8 maps.
    with pytest.raises(ValueError, match=r"^The pool 'avgpool' consumes \(2, 16, 8, 8\), not"):
        attach(_backbone(), layer="layer3", pool="avgpool")


def test_rationale_pooling_message_names_the_layer_and_what_to_do():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    lcr = attach(backbone, layer="0", in_channels=4)  # an explicit layer, no pool module
    with pytest.raises(ValueError) as err:
        lcr.set_pooling("rationale")
    assert str(err.value) == (
        "Rationale pooling needs a global average pooling module that consumes the output of "
        "'0', and none does (the backbone pools functionally or tokens). Pass pool=<dotted "
        "name or module>, or pool features yourself with common_rationale.head.pool(feature_map)."
    )


class TwoTrainableCopies(ToySiamese):
    """A teacher copy that requires grad but never reaches the loss (frozen in practice)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = tiny_resnet()
        self.teacher.fc = nn.Identity()

    def training_step(self, batch, batch_idx):
        (x0, _), _ = batch
        with torch.no_grad():
            self.teacher(x0)  # the teacher runs, without gradient
        return super().training_step(batch, batch_idx)


def test_after_the_first_step_only_the_online_encoder_pools_in_training():
    torch.manual_seed(0)
    model = with_common_rationale(TwoTrainableCopies(), k=4, pool_in_training=True)
    lcr = model.common_rationale
    assert not lcr.online_decided  # both encoders could be online at wrap time
    model.training_step(two_view_batch(), 0)
    assert lcr.online_decided and lcr.layer_name == "backbone.layer4"
    x = torch.randn(4, 3, 32, 32)
    model.train()
    maps = {}
    for name in ("backbone", "teacher"):
        getattr(model, name).layer4.register_forward_hook(
            lambda m, a, out, n=name: maps.update({n: out})
        )
    with torch.no_grad():
        online, teacher = model.backbone(x), model.teacher(x)
    torch.testing.assert_close(online, lcr.head.pool(maps["backbone"]))  # pool_in_training
    torch.testing.assert_close(teacher, maps["teacher"].mean(dim=(2, 3)))  # copies: GAP
    model.eval()
    with torch.no_grad():  # in eval mode every copy pools with the head
        torch.testing.assert_close(model.teacher(x), lcr.head.pool(maps["teacher"]))
