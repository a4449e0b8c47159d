"""Min-max normalisation and weighted pooling against explicit loops, in float64."""

import pytest
import torch

from lcr_lightly import CommonRationaleHead, minmax_normalize, weighted_average_pool

EPS = 1e-7  # minmax_normalize's documented default


def test_per_image_minmax_is_x_minus_min_over_range_plus_eps():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[-2.0, 0.0], [0.0, 6.0]]], dtype=torch.float64)
    expected = torch.empty_like(maps)
    for b in range(2):
        low, high = float(maps[b].min()), float(maps[b].max())
        expected[b] = (maps[b] - low) / (high - low + EPS)
    torch.testing.assert_close(minmax_normalize(maps), expected, rtol=1e-12, atol=0)


def test_batch_minmax_uses_one_range_and_constant_batches_are_all_ones():
    maps = torch.tensor([[[1.0, 3.0]], [[2.0, 9.0]]], dtype=torch.float64)
    expected = (maps - 1.0) / (8.0 + EPS)
    torch.testing.assert_close(minmax_normalize(maps, over="batch"), expected, rtol=1e-12, atol=0)
    constant = torch.full((2, 2, 2), 0.3, dtype=torch.float64)
    assert torch.equal(minmax_normalize(constant, over="batch"), torch.ones_like(constant))
    assert torch.equal(minmax_normalize(constant), torch.ones_like(constant))


def test_weighted_pool_is_the_mean_of_weighted_features_even_with_other_dtypes():
    torch.manual_seed(0)
    features = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    weights = torch.rand(2, 2, 2)  # float32 weights, float64 features
    expected = torch.empty(2, 3, dtype=torch.float64)
    for b in range(2):
        w = weights[b].double()
        for c in range(3):
            expected[b, c] = (features[b, c] * w).sum() / 4  # the mean over the 2x2 positions
    torch.testing.assert_close(weighted_average_pool(features, weights), expected)


def test_head_attention_follows_its_normalisation_mode():
    torch.manual_seed(0)
    head = CommonRationaleHead(4, k=3, normalize="batch").eval()
    features = torch.randn(2, 4, 3, 3)
    raw = head(features).detach()
    with torch.no_grad():
        torch.testing.assert_close(
            head.attention(features), (raw - raw.min()) / (raw.max() - raw.min() + EPS)
        )
    assert repr(head).splitlines()[1] == "  in_channels=4, k=3, normalize='batch'"


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match=r"^Unknown normalisation 'softmax'"):
        minmax_normalize(torch.zeros(1, 2, 2), over="softmax")


def test_batch_minmax_keeps_a_non_finite_map_non_finite():
    # a NaN/inf head map must reach the KL's finiteness check, not become all ones
    for bad in (float("nan"), float("inf")):
        maps = torch.tensor([[[0.0, bad]], [[1.0, 2.0]]])
        assert not torch.isfinite(minmax_normalize(maps, over="batch")).all()
