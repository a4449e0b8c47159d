"""The one resolver: what it describes for a backbone and for a model with copies."""

import copy

import pytest
from torch import nn

from lcr_lightly import FeatureSite, attach, resolve, with_common_rationale
from tests.conftest import ToySiamese, tiny_resnet


def _with_momentum_copy() -> nn.Module:
    model = ToySiamese()
    model.momentum_backbone = copy.deepcopy(model.backbone).requires_grad_(False)
    return model


def test_a_backbone_resolves_to_one_online_site_and_its_map():
    backbone = tiny_resnet()
    found = resolve(backbone)
    assert found.sites == (
        FeatureSite("layer4", backbone.layer4, "avgpool", backbone.avgpool, True, ""),
    )
    # SmallResNet's stem keeps 64 px / 8: an 8x8 layer4 map at the 64 px dry forward
    assert (found.in_channels, found.map_shape, found.layout, found.reshape) == (
        16,
        (2, 16, 8, 8),
        "NCHW",
        None,
    )


def test_a_model_resolves_to_its_online_encoder_and_the_copies_it_pools():
    model = _with_momentum_copy()
    sites = resolve(model, model=True).sites
    assert [(s.encoder, s.layer_name, s.pool_name, s.online) for s in sites] == [
        ("backbone", "backbone.layer4", "backbone.avgpool", True),
        ("momentum_backbone", "momentum_backbone.layer4", "momentum_backbone.avgpool", False),
    ]
    assert sites[1].layer is model.momentum_backbone.layer4
    # the wrapped model keeps the same description, online first
    lcr = with_common_rationale(model, k=4).common_rationale
    assert lcr.sites == sites
    assert lcr.pool_names == ["backbone.avgpool", "momentum_backbone.avgpool"]


def test_explicit_names_must_be_inside_one_encoder_of_the_model():
    model = _with_momentum_copy()
    with pytest.raises(ValueError) as err:
        resolve(model, layer="backbone.layer4", pool="momentum_backbone.avgpool", model=True)
    assert str(err.value) == "layer= and pool= must be in the same encoder ('backbone')."
    with pytest.raises(ValueError) as err:
        resolve(model, layer=model, model=True)
    assert str(err.value) == "layer=/pool= must name a module inside ToySiamese."
    # an explicit layer of the copy makes the copy the online encoder
    sites = resolve(model, layer="momentum_backbone.layer3", model=True).sites
    assert [(s.encoder, s.layer_name, s.pool_name, s.online) for s in sites] == [
        ("momentum_backbone", "momentum_backbone.layer3", None, True),
        ("backbone", "backbone.layer3", None, False),
    ]


def test_attach_and_the_wrapper_describe_the_same_layer():
    model = ToySiamese()
    wrapped = with_common_rationale(copy.deepcopy(model), k=4).common_rationale
    attached = attach(model.backbone, k=4)
    assert wrapped.layer_name == "backbone." + attached.layer_name
    assert wrapped.pool_name == "backbone." + attached.pool_name


class _TwoArchitectures(ToySiamese):
    """A backbone and a student of another architecture with the same layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.student = tiny_resnet()
        self.student.layer4 = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.ReLU())
        self.student.fc = nn.Identity()


def test_an_explicit_layer_resolves_in_its_own_encoders_group():
    model = _TwoArchitectures()
    sites = resolve(model, layer="student.layer4", model=True).sites
    # the backbone has a `layer4` too, but another architecture: not a copy of the student
    assert [(s.encoder, s.layer_name, s.online) for s in sites] == [
        ("student", "student.layer4", True)
    ]
    model.twin = copy.deepcopy(model.backbone)  # a same-architecture child ...
    found = resolve(model, model=True, exclude=("twin",)).sites  # ... that is excluded
    assert [s.encoder for s in found] == ["backbone"]
    assert [s.encoder for s in resolve(model, model=True).sites] == ["backbone", "twin"]


def test_explicit_pool_and_reshape_reach_the_encoders_dry_forward():
    model = _with_momentum_copy()
    with pytest.raises(ValueError, match=r"^The pool 'avgpool' consumes \(2, 16, 8, 8\), not"):
        resolve(model, layer="backbone.layer3", pool="backbone.avgpool", model=True)
    sites = resolve(model, pool="momentum_backbone.avgpool", model=True).sites
    assert (sites[0].encoder, sites[0].layer_name) == (
        "momentum_backbone",
        "momentum_backbone.layer4",
    )

    def four_by_sixty_four(out):  # layer3's 16x16x16 map as 4x64
        return out.reshape(out.shape[0], 16, 4, 64)

    found = resolve(model, layer="backbone.layer3", reshape=four_by_sixty_four, model=True)
    assert (found.map_shape, found.reshape) == ((2, 16, 4, 64), four_by_sixty_four)


class _DictInput(nn.Module):
    """A backbone whose forward takes a dict: no dry forward can run it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, batch):
        return self.conv(batch["image"]).mean(dim=(2, 3))


def test_without_a_dry_forward_an_explicit_layer_and_channels_are_enough():
    backbone = _DictInput()
    found = resolve(backbone, layer="conv", in_channels=4)
    assert found.sites == (FeatureSite("conv", backbone.conv, None, None, True, ""),)
    assert (found.in_channels, found.map_shape, found.layout) == (4, (), "NCHW")
