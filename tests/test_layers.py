import pytest
import timm
import torch
import torchvision
from torch import nn

from lcr_lightly import find_feature_layer, find_global_pool, resolve_layer
from lcr_lightly.layers import infer_channels


def test_torchvision_resnet():
    resnet = torchvision.models.resnet18()
    name, layer = find_feature_layer(resnet)
    assert name == "layer4" and layer is resnet.layer4
    assert infer_channels(layer) == 512
    assert find_global_pool(resnet, layer) == ("avgpool", resnet.avgpool)


def test_lightly_style_sequential_backbone():
    resnet = torchvision.models.resnet18()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    name, layer = find_feature_layer(backbone)
    assert name == "7" and layer is resnet.layer4
    assert find_global_pool(backbone, layer) == ("8", resnet.avgpool)


def test_timm_resnet():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    name, layer = find_feature_layer(model)
    assert name == "layer4"
    pool = find_global_pool(model, layer)
    assert pool is not None and pool[0] == "global_pool"
    assert infer_channels(layer) == 512


def test_explicit_override_by_name_and_module():
    resnet = torchvision.models.resnet18()
    assert resolve_layer(resnet, "layer3") == ("layer3", resnet.layer3)
    assert resolve_layer(resnet, resnet.layer2) == ("layer2", resnet.layer2)
    assert resolve_layer(resnet, "layer4.1.conv2")[1] is resnet.layer4[1].conv2


def test_bad_name_lists_candidates():
    resnet = torchvision.models.resnet18()
    with pytest.raises(ValueError, match=r"No layer named 'layer5'.*'layer4'"):
        resolve_layer(resnet, "layer5")
    with pytest.raises(ValueError, match="not part of"):
        resolve_layer(resnet, nn.Conv2d(1, 1, 1))


def test_non_conv_backbone_raises():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        find_feature_layer(mlp)


def test_functional_pooling_has_no_pool_module():
    class FunctionalPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.stage(x).mean(dim=(2, 3))

    model = FunctionalPool()
    _, layer = find_feature_layer(model)
    assert find_global_pool(model, layer) is None
    assert model(torch.randn(1, 3, 5, 5)).shape == (1, 4)
