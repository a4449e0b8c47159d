import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcr_lightly import CommonRationaleHead, minmax_normalize, weighted_average_pool


def _explicit_head(head: CommonRationaleHead, feats: torch.Tensor, training: bool) -> torch.Tensor:
    w = head.conv.weight[:, :, 0, 0]  # (K, C)
    proj = torch.einsum("kc,bchw->bkhw", w, feats)
    if training:
        mean = proj.mean(dim=(0, 2, 3), keepdim=True)
        var = proj.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean = head.bn.running_mean[None, :, None, None]
        var = head.bn.running_var[None, :, None, None]
    normed = (proj - mean) / torch.sqrt(var + head.bn.eps)
    normed = normed * head.bn.weight[None, :, None, None] + head.bn.bias[None, :, None, None]
    return F.relu(normed).max(dim=1).values


def test_head_matches_explicit_conv_bn_relu_max():
    torch.manual_seed(0)
    head = CommonRationaleHead(6, k=5)
    with torch.no_grad():
        head.bn.weight.uniform_(0.5, 1.5)
        head.bn.bias.uniform_(-0.2, 0.2)
    feats = torch.randn(3, 6, 4, 5)
    torch.testing.assert_close(head(feats), _explicit_head(head, feats, training=True))
    head.eval()
    with torch.no_grad():
        head.bn.running_mean.uniform_(-1, 1)
        head.bn.running_var.uniform_(0.5, 2)
    torch.testing.assert_close(head(feats), _explicit_head(head, feats, training=False))
    assert head.projections(feats).shape == (3, 5, 4, 5)
    assert head.conv.bias is None


def test_attention_is_per_image_minmax():
    torch.manual_seed(0)
    head = CommonRationaleHead(4, k=3).eval()
    feats = torch.randn(5, 4, 3, 3) * torch.arange(1, 6).float()[:, None, None, None]
    att = head.attention(feats)
    flat = att.flatten(1)
    torch.testing.assert_close(flat.min(dim=1).values, torch.zeros(5))
    torch.testing.assert_close(flat.max(dim=1).values, torch.ones(5), atol=1e-5, rtol=0)


def test_minmax_batch_mode_uses_global_range():
    maps = torch.tensor([[[0.0, 1.0]], [[2.0, 4.0]]])
    out = minmax_normalize(maps, over="batch", eps=0.0)
    torch.testing.assert_close(out, maps / 4.0)
    per_image = minmax_normalize(maps, over="image", eps=0.0)
    torch.testing.assert_close(per_image, torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]]))
    with pytest.raises(ValueError, match="normalisation"):
        minmax_normalize(maps, over="channel")


def test_pool_matches_explicit_loop():
    torch.manual_seed(0)
    head = CommonRationaleHead(3, k=2).eval()
    feats = torch.randn(2, 3, 2, 3)
    att = head.attention(feats).detach()
    expected = torch.zeros(2, 3)
    for b in range(2):
        for c in range(3):
            total = 0.0
            for i in range(2):
                for j in range(3):
                    total += float(att[b, i, j] * feats[b, c, i, j])
            expected[b, c] = total / 6
    torch.testing.assert_close(head.pool(feats), expected)
    torch.testing.assert_close(
        weighted_average_pool(feats, torch.ones(2, 2, 3)), feats.mean((2, 3))
    )


def test_head_channel_mismatch_and_bad_args():
    head = CommonRationaleHead(8, k=4)
    with pytest.raises(ValueError) as err:
        head(torch.randn(2, 6, 3, 5))
    assert str(err.value) == (
        "CommonRationaleHead was built for in_channels=8 but the feature map has 6 channels; "
        "pass in_channels=6 (or the right layer=)."
    )
    with pytest.raises(ValueError, match="B, C, H, W"):
        head(torch.randn(2, 8))
    with pytest.raises(ValueError, match="normalize"):
        CommonRationaleHead(8, normalize="global")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(in_channels=8, k=2.5), "k"),
        (dict(in_channels=8, k=True), "k"),
        (dict(in_channels=8, k=0), "k"),
        (dict(in_channels=-1), "in_channels"),
        (dict(in_channels=8.0), "in_channels"),
        (dict(in_channels=8, hidden_channels=0), "hidden_channels"),
        (dict(in_channels=8, hidden_channels=4.5), "hidden_channels"),
    ],
)
def test_head_sizes_must_be_positive_integers(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be a positive integer"):
        CommonRationaleHead(**kwargs)


def test_head_defaults_and_mlp_layout_follow_the_paper():
    head = CommonRationaleHead(8)
    assert head.k == 32 and head.conv.bias is None  # K = 32 projections, 1x1 conv without bias
    mlp = CommonRationaleHead(6, k=3, hidden_channels=4).mlp
    assert [type(m) for m in mlp] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert mlp[0].bias is None and mlp[0].kernel_size == (1, 1)
    with pytest.raises(ValueError) as err:
        CommonRationaleHead(8, normalize="softmax")
    assert str(err.value) == "Unknown normalize='softmax'; expected one of ('image', 'batch')."


def test_mlp_head_variant():
    torch.manual_seed(0)
    head = CommonRationaleHead(6, k=3, hidden_channels=4).eval()
    feats = torch.randn(2, 6, 3, 3)
    hidden = head.mlp(feats)
    expected = F.relu(head.bn(head.conv(hidden))).max(dim=1).values
    torch.testing.assert_close(head(feats), expected)
    assert hidden.shape == (2, 4, 3, 3)
    assert head.extra_repr() == "in_channels=6, k=3, normalize='image', hidden_channels=4"


def test_constant_and_one_by_one_maps_pool_like_gap():
    maps = torch.tensor([[[2.0, 2.0]], [[0.0, 3.0]]])
    out = minmax_normalize(maps)
    torch.testing.assert_close(out[0], torch.ones(1, 2))
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 1.0]]), atol=1e-6, rtol=0)
    head = CommonRationaleHead(4, k=2).eval()
    feats = torch.randn(3, 4, 1, 1)
    torch.testing.assert_close(head.pool(feats), feats.flatten(1))
