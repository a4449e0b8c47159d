"""The loss-path rule that decides the online encoder at the first training step."""

import pytest
import torch

from lcr_lightly.encoders import encoder_group, encoders, is_encoder, online_by_loss_path

NAMES = ["backbone.layer4", "teacher.layer4"]


def test_the_encoder_whose_maps_the_loss_depends_on_is_online():
    cam = torch.zeros(2, 3, 3)
    # maps in capture order: two of the teacher's (no gradient path), one of the backbone's
    assert online_by_loss_path([None, None, cam], [1, 1, 0], NAMES) == 0
    assert online_by_loss_path([cam, None], [1, 0], NAMES) == 1


def test_no_encoder_on_the_loss_path_is_none_and_several_are_refused():
    assert online_by_loss_path([None, None], [0, 1], NAMES) is None
    assert online_by_loss_path([], [], NAMES) is None
    cam = torch.zeros(2, 3, 3)
    with pytest.raises(RuntimeError) as err:
        online_by_loss_path([cam, cam], [0, 1], NAMES)
    assert str(err.value) == (
        "The SSL loss depends on the feature maps of several encoders ('backbone.layer4', "
        "'teacher.layer4'); LCR trains one head on the online encoder. Freeze the momentum/"
        "teacher encoder (requires_grad=False or torch.no_grad) or pass layer=."
    )


class _LinearPatchViT(torch.nn.Module):
    """A ViT-shaped module without any Conv2d (patches embedded by a Linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = torch.nn.Linear(48, 8)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        self.embed_dim = 8


def test_encoders_are_the_children_with_a_conv_or_a_vit_layout_minus_the_excluded():
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    model.vit = _LinearPatchViT()
    model.head = torch.nn.Linear(4, 2)
    # an excluded child (LCR's own) never joins, even with the backbone's architecture
    model.common_rationale = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert is_encoder(model.vit) and not is_encoder(model.head)
    found = [name for name, _ in encoders(model, exclude=("common_rationale",))]
    assert found == ["backbone", "vit"]
    assert [name for name, _ in encoders(model)] == ["backbone", "vit", "common_rationale"]
    assert encoder_group(model, exclude=("common_rationale",)).members == ("backbone",)
    assert encoder_group(model).members == ("backbone", "common_rationale")


def _conv(channels: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3), torch.nn.ReLU())


def test_the_group_keeps_registration_order_and_is_all_online_when_all_are_frozen():
    model = torch.nn.Module()
    model.z_copy = _conv(4)  # registered before the backbone, after it alphabetically
    model.backbone = _conv(4)
    model.other = _conv(6)  # another architecture: not a copy
    group = encoder_group(model)
    assert group.members == ("z_copy", "backbone")
    assert group.online == ("z_copy", "backbone")  # both trainable: the first step decides
    model.z_copy.requires_grad_(False)
    assert encoder_group(model).online == ("backbone",)
    model.backbone.requires_grad_(False)  # nothing trainable: every member may be online
    assert encoder_group(model).online == ("z_copy", "backbone")


def test_several_architectures_without_a_backbone_are_refused_by_name():
    model = torch.nn.Module()
    model.student = _conv(4)
    model.teacher = _conv(6)
    with pytest.raises(ValueError) as err:
        encoder_group(model)
    assert str(err.value) == (
        "Module has no 'backbone' module and no single image encoder (children with a Conv2d "
        "or a ViT: 'student' (Sequential), 'teacher' (Sequential)). Pass layer=<dotted name of "
        "the feature map> (e.g. 'encoder.layer4')."
    )
    with pytest.raises(
        ValueError, match=r"single image encoder \(children with a Conv2d or a ViT: none\)"
    ):
        encoder_group(torch.nn.Module())
