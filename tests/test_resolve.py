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
    assert [s.layer_name for s in lcr.sites] == [s.layer_name for s in sites]
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
