import pytest
import torch
from torch import nn

from lcr_lightly import FeatureCapture, gradcam, tokens_to_map
from tests.conftest import tiny_resnet


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) ** 2).mean() + model(x.flip(-1)).sum() * 1e-2


def test_gradcam_matches_manual_autograd():
    torch.manual_seed(0)
    model = tiny_resnet()
    x = torch.randn(4, 3, 32, 32)
    with FeatureCapture(model.layer4) as capture:
        loss = _loss(model, x)
        maps = list(capture.maps)
        cams = gradcam(loss, maps)
    assert len(maps) == 2 and len(cams) == 2
    for feature, cam in zip(maps, cams):
        (grad,) = torch.autograd.grad(loss, feature, retain_graph=True)
        expected = torch.clamp((feature * grad).sum(dim=1), min=0)
        assert cam.shape == (4, 4, 4)
        torch.testing.assert_close(cam, expected)


def _position_dependent_loss(feature: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient varies over positions (GAP would make it constant)."""
    h, w = feature.shape[-2:]
    weights = torch.linspace(-1.0, 2.0, h * w).reshape(1, 1, h, w)
    return (feature.tanh() * weights).sum() + (feature**2).mean()


def test_channel_mode_matches_classic_gradcam():
    torch.manual_seed(0)
    model = tiny_resnet()
    with FeatureCapture(model.layer4) as capture:
        model(torch.randn(2, 3, 32, 32))
        feature = capture.maps[0]
        loss = _position_dependent_loss(feature)
        (cam,) = gradcam(loss, feature, mode="channel")
        (elementwise,) = gradcam(loss, feature)
    (grad,) = torch.autograd.grad(loss, feature, retain_graph=True)
    weights = grad.mean(dim=(2, 3))
    expected = torch.zeros(2, 4, 4)
    for b in range(2):
        for c in range(feature.shape[1]):
            expected[b] += weights[b, c] * feature[b, c]
    torch.testing.assert_close(cam, expected.clamp(min=0))
    torch.testing.assert_close(elementwise, (feature * grad).sum(1).clamp(min=0))
    # Where dL/dF varies over positions the two modes are different maps ...
    assert (cam - elementwise).abs().max() > 0.1 * elementwise.abs().max()


def test_modes_coincide_under_global_average_pooling():
    """... and under GAP (every shipped backbone) dL/dF is constant over positions."""
    torch.manual_seed(0)
    model = tiny_resnet()
    with FeatureCapture(model.layer4) as capture:
        loss = _loss(model, torch.randn(2, 3, 32, 32))
        channel = gradcam(loss, capture.maps, mode="channel")
        elementwise = gradcam(loss, capture.maps)
    for a, b in zip(channel, elementwise):
        torch.testing.assert_close(a, b)


def test_gradcam_is_float32_for_bf16_maps():
    feature = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    loss = (feature.float() ** 2).sum()
    (cam,) = gradcam(loss, [feature])
    assert cam.dtype == torch.float32


def test_gradcam_rejects_bad_inputs():
    f = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        gradcam(f.sum(dim=1), [f])
    with pytest.raises(ValueError, match="Unknown GradCAM mode"):
        gradcam(f.sum(), [f], mode="pixel")
    other = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.raises(ValueError) as err:
        gradcam((f**2).sum(), [other])
    assert str(err.value) == (
        "The SSL loss does not depend on a captured feature map: the hooked layer is not on "
        "the path from the online view to the loss."
    )


def test_capture_ignores_no_grad_eval_and_frozen_outputs():
    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    capture = FeatureCapture(model.layer4)
    with torch.no_grad():
        model(x)
    assert capture.maps == []
    model.eval()
    model(x)
    assert capture.maps == []
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model(x)  # input does not require grad either: frozen copy
    assert capture.maps == []
    for p in model.parameters():
        p.requires_grad_(True)
    model(x)
    model(x)
    assert len(capture.maps) == 2
    capture.clear()
    assert capture.maps == []
    capture.release()
    assert not capture.attached and len(model.layer4._forward_hooks) == 0
    model(x)
    assert capture.maps == []


def test_capture_rejects_non_map_output():
    lin = nn.Linear(4, 3)
    capture = FeatureCapture(lin)
    with pytest.raises(ValueError, match="4-D map"):
        lin(torch.randn(2, 4))
    capture.release()


def test_tokens_to_map():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    fmap = tokens_to_map(tokens, num_prefix_tokens=1)
    assert fmap.shape == (2, 3, 4, 4)
    # position (i, j) is patch token 1 + 4 i + j
    assert torch.equal(fmap[1, :, 2, 3], tokens[1, 1 + 4 * 2 + 3])
    with pytest.raises(ValueError, match="square"):
        tokens_to_map(torch.randn(2, 16, 3), num_prefix_tokens=1)


def test_capture_with_reshape_records_token_maps():
    layer = nn.Linear(3, 3)
    capture = FeatureCapture(layer, reshape=lambda t: tokens_to_map(t, 1))
    layer(torch.randn(2, 10, 3))
    assert capture.maps[0].shape == (2, 3, 3, 3)


@pytest.mark.parametrize("factor", [1e-8, 10.0])
def test_float16_maps_neither_underflow_nor_overflow(factor):
    """fp16 gradients of 1e-8 underflow to 0 and of 10 * 2**16 overflow, unless scaled."""
    torch.manual_seed(0)
    leaf = torch.rand(2, 4, 3, 3, dtype=torch.float16, requires_grad=True)
    feature = leaf * 1.0  # an fp16 map inside the graph, as under autocast
    loss = (feature.float() * factor).sum()
    expected = torch.relu((feature.detach().float() * factor).sum(dim=1))
    if factor < 1:  # the plain fp16 gradient underflows: the GradCAM would be all zeros
        assert (torch.autograd.grad(loss, feature, retain_graph=True)[0] == 0).all()
        assert (gradcam(loss, [feature], loss_scale=1.0)[0] == 0).all()
    else:  # the default first scale overflows: gradcam must retry with a smaller one
        scaled = torch.autograd.grad(loss * 2**16, feature, retain_graph=True)[0]
        assert not torch.isfinite(scaled).all()
    (cam,) = gradcam(loss, [feature])
    torch.testing.assert_close(cam, expected, rtol=2e-3, atol=0)
    # the retry after an overflow needs the graph again, even when the caller frees it
    (cam,) = gradcam(loss, [feature], retain_graph=False)
    torch.testing.assert_close(cam, expected, rtol=2e-3, atol=0)


def test_fp16_gradient_that_overflows_unscaled_ends_the_retries_non_finite():
    leaf = torch.rand(2, 4, 3, 3, dtype=torch.float16, requires_grad=True)
    feature = leaf * 1.0
    loss = (feature.float() * 1e6).sum()  # 1e6 > 65504: inf even at scale 1
    (cam,) = gradcam(loss, [feature])
    assert not torch.isfinite(cam).all()


def test_float16_autocast_scales_the_gradient_of_float32_maps():
    torch.manual_seed(0)
    feature = torch.rand(2, 4, 3, 3, requires_grad=True) * 1.0  # a float32 map
    weight = torch.ones(4, 1)
    with torch.autocast("cpu", dtype=torch.float16):
        out = feature.mean(dim=(2, 3)) @ weight  # a float16 matmul under autocast
        loss = out.float().sum() * 1e-8  # dL/d(out) = 1e-8 underflows in float16
        assert (torch.autograd.grad(loss, feature, retain_graph=True)[0] == 0).all()
        (cam,) = gradcam(loss, [feature])
    expected = torch.relu((feature.detach() * 1e-8 / 9).sum(dim=1))
    torch.testing.assert_close(cam, expected, rtol=2e-3, atol=0)


def test_float16_autocast_query_of_torch_before_2_4(monkeypatch):
    """torch 2.1-2.3: no get_autocast_dtype, is_autocast_enabled() is CUDA's, no argument."""
    from lcr_lightly.gradcam import _fp16_autocast

    state = {"enabled": True, "dtype": torch.float16}
    monkeypatch.delattr(torch, "get_autocast_dtype")
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda: state["enabled"])
    monkeypatch.setattr(torch, "get_autocast_gpu_dtype", lambda: state["dtype"])
    assert _fp16_autocast("cuda") and not _fp16_autocast("cpu")
    state["dtype"] = torch.bfloat16
    assert not _fp16_autocast("cuda")
    state.update(enabled=False, dtype=torch.float16)
    assert not _fp16_autocast("cuda")
