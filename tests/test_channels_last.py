"""Channels-last maps (timm's Swin): capture, GradCAM, head and pooling as for NCHW maps.

timm's Swin returns (B, H, W, C) from ``forward_features`` and averages it over (H, W)
with ``input_fmt="NHWC"``. Every expected value here is computed by hand from the NHWC
tensor, permuted in the test.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcr_lightly import (
    GradCAMFitLoss,
    attach,
    export_embedder,
    find_feature_path,
    set_pooling,
    with_common_rationale,
)
from lcr_lightly.pooling import minmax_normalize


def tiny_swin(pool: str = "avg") -> nn.Module:
    torch.manual_seed(0)
    return timm.models.swin_transformer.SwinTransformer(
        img_size=64,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=0,
        global_pool=pool,
        drop_path_rate=0.0,  # deterministic training forwards
    )


def test_the_map_the_swin_pool_averages_is_found_with_its_layout():
    swin = tiny_swin()
    path = find_feature_path(swin)
    assert (path.layer_name, path.pool_name, path.layout) == (
        "norm",
        "head.global_pool.pool",
        "NHWC",
    )
    with torch.no_grad():
        nhwc = swin.forward_features(torch.randn(2, 3, 64, 64))
    assert nhwc.shape == (2, 8, 8, 32)  # 64 px / patch 4 / one merge
    assert (path.in_channels, path.map_shape) == (32, (2, 32, 8, 8))


@pytest.mark.parametrize(
    "names", [dict(pool="head.global_pool.pool"), dict(layer="norm", pool="head.global_pool.pool")]
)
def test_an_explicit_pool_of_a_channels_last_map_keeps_its_layout(names):
    path = find_feature_path(tiny_swin(), **names)
    assert (path.layer_name, path.layout, path.map_shape) == ("norm", "NHWC", (2, 32, 8, 8))


@pytest.mark.parametrize("names", [dict(pool="pool"), dict(layer="stage", pool="pool")])
def test_an_explicit_pool_that_does_not_average_is_read_channels_first(names):
    # Only an averaging pool tells the layout; the user's max pool is taken as NCHW.
    model = nn.Sequential()
    model.add_module("stage", nn.Conv2d(3, 4, 3, stride=8))
    model.add_module("pool", nn.AdaptiveMaxPool2d(1))
    path = find_feature_path(model, **names)
    assert (path.layer_name, path.layout, path.map_shape) == ("stage", "NCHW", (2, 4, 8, 8))


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_max_pooling_of_a_channels_last_map_is_still_refused(pool):
    with pytest.raises(ValueError, match=r"'head\.global_pool\.pool'.*is not average pooling"):
        find_feature_path(tiny_swin(pool))


def test_kl_term_on_a_channels_last_map_matches_a_hand_computation():
    swin = tiny_swin().train()
    paper_like = GradCAMFitLoss(
        tau=0.5, target="raw", head="raw", detach_target=True, reduction="batchmean", softmax="map"
    )
    lcr = attach(swin, k=4, loss=paper_like)
    lcr.record = True
    x = torch.randn(2, 3, 64, 64)
    loss = swin(x).pow(2).sum()
    kl = lcr.kl_term(loss)
    nhwc = lcr.last_step.maps[0].permute(0, 2, 3, 1)  # back to what the layer returned
    # independent: a second forward tapped at the layer, its gradient by autograd
    taken = []
    handle = swin.norm.register_forward_hook(lambda m, a, out: taken.append(out))
    again = swin(x).pow(2).sum()
    handle.remove()
    (grad,) = torch.autograd.grad(again, taken[0])
    torch.testing.assert_close(taken[0].detach(), nhwc)
    cam = torch.relu((taken[0] * grad).sum(dim=-1))  # channels are last: sum over C
    torch.testing.assert_close(lcr.last_step.gradcams[0], cam.detach())
    head_map = lcr.head(taken[0].permute(0, 3, 1, 2))
    log_a = F.log_softmax(head_map.flatten(1) / 0.5, dim=1)
    log_g = F.log_softmax(cam.detach().flatten(1) / 0.5, dim=1)
    # KL(softmax(G) || softmax(A)), the mean over the batch
    torch.testing.assert_close(kl, F.kl_div(log_a, log_g, log_target=True, reduction="batchmean"))


def test_rationale_pooling_of_a_channels_last_map_weights_the_right_positions():
    swin = tiny_swin()
    lcr = attach(swin, k=4)
    x = torch.randn(2, 3, 64, 64)
    swin.eval()
    lcr.eval()
    with torch.no_grad():
        pooled = swin(x)
        nchw = swin.forward_features(x).permute(0, 3, 1, 2)
        weights = minmax_normalize(lcr.head(nchw))
        expected = (nchw * weights[:, None]).mean(dim=(2, 3))  # hand formula
        lcr.set_pooling("gap")
        gap = swin(x)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(gap, nchw.mean(dim=(2, 3)))


class SwinClient(nn.Module):
    """A SimSiam-like method around a Swin backbone (what a lightly user writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_swin()
        self.projection = nn.Linear(32, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x0, x1 = batch
        z0, z1 = self.projection(self(x0)), self.projection(self(x1))
        return -F.cosine_similarity(z0, z1.detach()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_wrapped_swin_trains_pools_and_exports_like_a_cnn():
    model = with_common_rationale(SwinClient(), k=4)
    lcr = model.common_rationale
    assert (lcr.layer_name, lcr.pool_names) == ("backbone.norm", ["backbone.head.global_pool.pool"])
    head_before = lcr.head.conv.weight.detach().clone()
    (optimizer,) = [model.configure_optimizers()]
    model.train()
    batch = (torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    loss = model.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    assert not torch.equal(lcr.head.conv.weight, head_before)  # the KL reached the head
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedder = export_embedder(model, normalize=False)
        torch.testing.assert_close(embedder(x), model(x))
        set_pooling(model, "gap")
        torch.testing.assert_close(model(x), model.backbone.forward_features(x).mean(dim=(1, 2)))
