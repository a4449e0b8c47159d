import pytest
import timm
import torch
import torchvision
from torch import nn

from lcr_lightly import find_feature_layer, find_feature_path, resolve_layer


def test_torchvision_resnet():
    resnet = torchvision.models.resnet18()
    name, layer = find_feature_layer(resnet)
    assert name == "layer4" and layer is resnet.layer4
    assert find_feature_path(resnet).in_channels == 512
    path = find_feature_path(resnet, layer=layer)
    assert (path.pool_name, path.pool) == ("avgpool", resnet.avgpool)


def test_lightly_style_sequential_backbone():
    resnet = torchvision.models.resnet18()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    name, layer = find_feature_layer(backbone)
    assert name == "7" and layer is resnet.layer4
    path = find_feature_path(backbone, layer=layer)
    assert (path.pool_name, path.pool) == ("8", resnet.avgpool)


def test_timm_resnet():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    name, layer = find_feature_layer(model)
    assert name == "layer4"
    # The innermost module that averages: a classifier added later is never replaced.
    path = find_feature_path(model, layer=layer)
    assert (path.pool_name, path.pool) == ("global_pool.pool", model.global_pool.pool)
    assert find_feature_path(model).in_channels == 512


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


def _convs(n: int) -> list:
    return [nn.Conv2d(1, 1, 1) for _ in range(n)]


def test_resolve_layer_messages_list_shallow_candidates_first_up_to_twelve():
    # '0' holds a nested conv '0.0'; shallow names are listed first, then the nested one.
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1)), nn.ReLU(), nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError) as info:
        resolve_layer(nested, "head")
    assert str(info.value) == "No layer named 'head' in Sequential. Candidates: '0', '2', '0.0'."
    with pytest.raises(ValueError) as info:
        resolve_layer(nested, nn.Linear(1, 1))
    assert str(info.value) == (
        "The given layer module (Linear) is not part of Sequential. Candidates: '0', '2', '0.0'."
    )
    twelve = ", ".join(repr(str(i)) for i in range(12))
    with pytest.raises(ValueError, match=rf"Candidates: {twelve}\.$"):
        resolve_layer(nn.Sequential(*_convs(12)), "x")
    with pytest.raises(ValueError, match=rf"Candidates: {twelve} \(\+3 more\)\.$"):
        resolve_layer(nn.Sequential(*_convs(15)), "x")
    with pytest.raises(ValueError, match=r"Candidates: none\.$"):
        resolve_layer(nn.Sequential(nn.Linear(1, 1)), "x")


def test_resolve_layer_refuses_other_types():
    resnet = torchvision.models.resnet18()
    for wrong in (None, 4):
        with pytest.raises(TypeError) as info:
            resolve_layer(resnet, wrong)  # type: ignore[arg-type]
        assert str(info.value) == (
            f"layer must be a dotted name or an nn.Module, not {type(wrong)}."
        )


def test_non_conv_backbone_raises():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no global average pooling module"):
        find_feature_layer(mlp)


class FunctionalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 4, 3, stride=16)

    def forward(self, x):
        return self.stage(x).mean(dim=(2, 3))


def test_functional_pooling_is_refused_with_candidates():
    model = FunctionalPool()
    with pytest.raises(ValueError, match=r"pools functionally.*'stage' \(2, 4, 4, 4\)"):
        find_feature_layer(model)
    # An explicit layer still works; there is just no pool to replace.
    path = find_feature_path(model, layer="stage")
    assert (path.layer, path.pool, path.in_channels) == (model.stage, None, 4)


def test_feature_layer_is_the_module_whose_output_the_pool_consumes():
    class Net(nn.Module):  # registration order differs from call order
        def __init__(self):
            super().__init__()
            self.stage = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Conv2d(8, 8, 1)  # registered after the pool, runs before it

        def forward(self, x):
            return self.pool(self.head(self.stage(x))).flatten(1)

    net = Net()
    path = find_feature_path(net)
    assert (path.layer_name, path.layer, path.pool_name) == ("head", net.head, "pool")
    assert path.map_shape == (2, 8, 8, 8)


def test_in_place_change_after_a_module_excludes_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=8)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU(inplace=True)  # bn's output tensor, changed in place
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.act(self.bn(self.conv(x))))

    net = Net()
    assert find_feature_layer(net) == ("act", net.act)


def test_max_and_catavgmax_pooling_are_refused():
    for pool in ("max", "catavgmax", "avgmax"):
        model = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool=pool)
        with pytest.raises(ValueError, match="'global_pool.pool'.*not average pooling"):
            find_feature_path(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_average_pooling_is_recognised_at_the_precision_of_the_backbone(dtype):
    # bfloat16 rounds the pooled mean by up to 0.4 %: still average pooling
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).to(dtype)
    path = find_feature_path(model)
    assert (path.layer_name, path.pool_name) == ("layer4", "global_pool.pool")


class GeM(nn.Module):
    """Generalised-mean pooling: close to, but not, the average (above it for p > 1)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x.clamp(min=0).pow(self.p).mean(dim=(2, 3), keepdim=True).pow(1 / self.p)


class Scale(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class ScaledStem(nn.Module):
    """A conv + sigmoid stage whose features are scaled by ``scale``, then a pool."""

    def __init__(self, pool: nn.Module, scale: float):
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 8, 3, stride=16), nn.Sigmoid(), Scale(scale))
        self.pool = pool

    def forward(self, x):
        return self.pool(self.stage(x)).flatten(1)


@pytest.mark.parametrize("p", [0.5, 2.0])
@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e3])
def test_the_average_test_does_not_depend_on_the_feature_scale(scale, p):
    torch.manual_seed(0)
    assert find_feature_path(ScaledStem(nn.AdaptiveAvgPool2d(1), scale)).pool_name == "pool"
    net = ScaledStem(GeM(p), scale)
    seen = []
    net.pool.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with pytest.raises(ValueError, match="'pool' .*but is not average pooling"):
        find_feature_path(net)
    x, gem = seen[0]
    mean, gem = x.mean(dim=(2, 3)), gem.flatten(1)
    # On the dry forward's map GeM lies within 2x of the mean, 1 % of the largest mean off
    assert bool((gem <= 2 * mean).all() and (gem >= mean / 2).all())
    assert float((gem - mean).abs().max()) > 0.01 * float(mean.max())


def test_a_dead_map_still_finds_its_average_pool():
    net = ScaledStem(nn.AdaptiveAvgPool2d(1), 0.0)  # every feature 0 in the dry forward
    assert find_feature_path(net).pool_name == "pool"


def test_one_by_one_map_is_refused():
    # 1x1 at every dry-forward size: the images are averaged before the first conv
    net = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    with pytest.raises(ValueError) as err:
        find_feature_layer(net)
    assert str(err.value) == (
        "Sequential has no global average pooling module (dry forward at 64x64 px): it pools "
        "functionally (x.mean((2, 3)), F.adaptive_avg_pool2d) or its last map is already 1x1, "
        "so the head could not be trained on the map that is pooled at inference. Pass "
        "layer=<dotted name> to train on one of these maps (set_pooling('rationale') is then "
        "unavailable; pool with common_rationale.head.pool(map) yourself): no module returns "
        "a map of 2+ positions."
    )


def test_a_stride_64_backbone_is_read_at_a_size_where_its_map_is_spatial():
    # six stride-2 convs: 1x1 at 64 px, where the dry forward starts
    convs = [nn.Conv2d(3 if i == 0 else 4, 4, 3, stride=2, padding=1) for i in range(6)]
    net = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        assert net[:6](torch.zeros(1, 3, 64, 64)).shape[-2:] == (1, 1)
        side = net[:6](torch.zeros(1, 3, 224, 224)).shape[-1]  # ceil(224 / 64) = 4
    path = find_feature_path(net)
    assert (path.layer_name, path.pool_name, path.map_shape) == ("5", "6", (2, 4, side, side))
    assert side == 4


def test_explicit_pool_gives_its_producer_and_mismatch_is_refused():
    resnet = torchvision.models.resnet18()
    path = find_feature_path(resnet, pool="avgpool")
    assert (path.layer_name, path.layer) == ("layer4", resnet.layer4)
    with pytest.raises(ValueError, match="consumes .* not the output of layer 'layer3'"):
        find_feature_path(resnet, layer="layer3", pool="avgpool")


def test_dry_forward_restores_modes_buffers_and_rng():
    resnet = torchvision.models.resnet18()
    resnet.train()
    resnet.layer2.eval()
    modes = [m.training for m in resnet.modules()]
    buffers = [b.clone() for b in resnet.buffers()]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    find_feature_path(resnet)
    assert torch.equal(torch.rand(3), expected)
    assert [m.training for m in resnet.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(buffers, resnet.buffers()))
    assert int(resnet.bn1.num_batches_tracked) == 0


def test_dry_forward_follows_device_dtype_and_channels():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=16), nn.AdaptiveAvgPool2d(1)).double()
    path = find_feature_path(net)
    assert path.layer_name == "0" and path.map_shape == (2, 4, 4, 4)


class ReluAfterTheStage(nn.Module):
    """The pool consumes F.relu(stage(x)): no module returns that tensor."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 4, 3, stride=16)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(nn.functional.relu(self.stage(x))).flatten(1)


def test_a_pool_input_no_module_returns_is_refused_with_the_maps():
    with pytest.raises(ValueError) as err:
        find_feature_path(ReluAfterTheStage())
    assert str(err.value) == (
        "The input of the global pool 'pool' of ReluAfterTheStage (2, 4, 4, 4) is not the "
        "output of a module (it is computed functionally, e.g. F.relu(self.features(x)), or by "
        "a module that runs several times), so no hook can capture it. Pass layer=<dotted name> "
        "of the module that returns it; maps: 'stage' (2, 4, 4, 4)."
    )


class SharedReLU(nn.Module):
    """The pooled map comes from a ReLU module that also runs after the first stage."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Conv2d(3, 4, 3, stride=4)
        self.stage2 = nn.Conv2d(4, 4, 3, stride=4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.relu(self.stage2(self.relu(self.stage1(x))))).flatten(1)


def test_a_module_that_runs_twice_is_not_taken_as_the_feature_layer():
    # a hook on it would capture both of its outputs every step
    with pytest.raises(ValueError, match=r"^The input of the global pool 'pool' of SharedReLU"):
        find_feature_path(SharedReLU())


_RESNET18_MAPS = (
    "'layer4' (2, 512, 2, 2), 'layer4.1.conv2' (2, 512, 2, 2), 'layer4.1.bn1' (2, 512, 2, 2), "
    "'layer4.1.conv1' (2, 512, 2, 2), 'layer4.0.downsample' (2, 512, 2, 2), "
    "'layer4.0.downsample.0' (2, 512, 2, 2), 'layer4.0' (2, 512, 2, 2), 'layer4.0.conv2' "
    "(2, 512, 2, 2)"
)  # the last eight spatial maps, latest first; layer4.1.relu runs twice, so it is left out


@pytest.mark.parametrize(
    "names", [dict(layer="unused"), dict(pool="unused"), dict(layer="layer4", pool="unused")]
)
def test_an_explicit_module_that_does_not_run_is_named_with_the_maps_that_do(names):
    resnet = torchvision.models.resnet18()
    resnet.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError) as err:
        find_feature_path(resnet, **names)
    assert str(err.value) == (
        "'unused' does not run in a forward of ResNet (dry forward at 64x64 px). Maps that "
        f"do: {_RESNET18_MAPS}."
    )


def test_an_explicit_layer_that_runs_twice_is_refused_with_the_maps():
    with pytest.raises(ValueError) as err:
        find_feature_path(torchvision.models.resnet18(), layer="layer4.1.relu")
    assert str(err.value) == (
        "'layer4.1.relu' runs 2 times in one forward of ResNet; its hook would see several "
        f"different tensors. Choose a module that runs once: {_RESNET18_MAPS}."
    )


def test_an_explicit_pool_and_layer_that_do_not_match_are_refused():
    with pytest.raises(ValueError) as err:
        find_feature_path(torchvision.models.resnet18(), layer="layer3", pool="avgpool")
    assert str(err.value) == (
        "The pool 'avgpool' consumes (2, 512, 2, 2), not the output of layer 'layer3': the "
        "head would be trained on one map and weight another at inference. Pass only one of "
        "layer= and pool=, or a matching pair."
    )


def test_a_shared_block_of_a_vit_is_refused_as_the_token_layer():
    from tests.clients import tiny_timm_vit

    vit = tiny_timm_vit("token")
    vit.blocks[1] = vit.blocks[0]  # weight sharing: the last block runs twice
    with pytest.raises(ValueError, match=r"^'blocks.0' runs 2 times in one forward of Vision"):
        find_feature_path(vit)
    vit = tiny_timm_vit("avg")  # average pooling: the last block, by its own name
    vit.blocks[1] = vit.blocks[0]
    with pytest.raises(ValueError, match=r"^'blocks.1' runs 2 times in one forward of Vision"):
        find_feature_path(vit)


class TwoStreams(nn.Module):
    """One pool module shared by two streams (a hook on it would see both maps)."""

    def __init__(self):
        super().__init__()
        self.rgb, self.depth = nn.Conv2d(3, 4, 3, stride=8), nn.Conv2d(3, 4, 3, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.cat([self.pool(self.rgb(x)), self.pool(self.depth(x))], 1).flatten(1)


def test_a_global_pool_that_runs_twice_is_refused():
    with pytest.raises(ValueError) as err:
        find_feature_path(TwoStreams())
    assert str(err.value) == (
        "'pool' runs 2 times in one forward of TwoStreams; its hook would see several "
        "different tensors. Choose a module that runs once: 'depth' (2, 4, 8, 8), 'rgb' "
        "(2, 4, 8, 8)."
    )


def test_an_explicit_pool_on_a_functional_map_names_the_backbone():
    with pytest.raises(ValueError, match=r"^The input of the global pool 'pool' of ReluAfterThe"):
        find_feature_path(ReluAfterTheStage(), pool="pool")


class PoolsToTwoByTwo(nn.Module):
    """A stage, a 2x2 average pool, then the global pool."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.shrink, self.pool = nn.AdaptiveAvgPool2d(2), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.shrink(self.stage(x))).flatten(1)


@pytest.mark.parametrize("names", [dict(pool="shrink"), dict(layer="stage", pool="shrink")])
def test_an_explicit_pool_that_keeps_a_map_is_refused(names):
    # Rationale pooling returns (B, C) in the pool's place: after a 2x2 output the forward breaks.
    with pytest.raises(ValueError) as err:
        find_feature_path(PoolsToTwoByTwo(), **names)
    assert str(err.value) == (
        "The pool 'shrink' maps (2, 4, 16, 16) to (2, 4, 2, 2); pool= must be the global "
        "pooling that turns the feature map into one vector per image, (B, C) or (B, C, 1, 1)."
    )
    path = find_feature_path(PoolsToTwoByTwo(), pool="pool")  # the real one is found
    assert (path.layer_name, path.layout) == ("shrink", "NCHW")


class DictFeatures(nn.Module):
    """torchvision's IntermediateLayerGetter returns a dict of maps; a pool follows."""

    def __init__(self):
        super().__init__()
        body = torchvision.models.resnet18()
        self.body = torchvision.models._utils.IntermediateLayerGetter(body, {"layer4": "out"})
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.body(x)["out"]).flatten(1)


def test_a_module_returning_a_dict_is_passed_over_and_refused_as_the_layer():
    path = find_feature_path(DictFeatures())
    assert (path.layer_name, path.pool_name) == ("body.layer4", "pool")
    with pytest.raises(ValueError) as err:
        find_feature_path(DictFeatures(), layer="body")
    assert str(err.value) == "Layer 'body' returns no tensor."


class ColumnMap(nn.Module):
    """A last map one column wide (2x1 at 64 px), as text and audio nets give."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 4, (33, 64), stride=(31, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.stage(x)).flatten(1)


def test_a_map_of_two_positions_in_one_column_is_a_map():
    path = find_feature_path(ColumnMap())
    assert (path.layer_name, path.pool_name, path.map_shape) == ("stage", "pool", (2, 4, 2, 1))


class MaxPooledWithSqueezeExcitation(nn.Module):
    """torchvision's MobileNetV3 (average-pooling SE blocks) with a global max pool."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.mobilenet_v3_small()
        self.net.avgpool = nn.AdaptiveMaxPool2d(1)

    def forward(self, x):
        return self.net(x)


def test_an_average_pool_inside_a_block_is_not_the_global_pool():
    with pytest.raises(ValueError, match=r"'net.avgpool' \(AdaptiveMaxPool2d\).*not average"):
        find_feature_path(MaxPooledWithSqueezeExcitation())


class TokensPooledFunctionally(nn.Module):
    """A conv stage flattened to tokens (B, C, HW) by a module, then averaged by hand."""

    def __init__(self):
        super().__init__()
        self.stage, self.flatten = nn.Conv2d(3, 4, 3, stride=16), nn.Flatten(2)

    def forward(self, x):
        return self.flatten(self.stage(x)).mean(dim=2)


def test_flattening_a_map_to_tokens_is_not_pooling():
    with pytest.raises(ValueError, match=r"^TokensPooledFunctionally has no global average pool"):
        find_feature_path(TokensPooledFunctionally())
