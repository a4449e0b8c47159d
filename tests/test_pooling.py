"""Min-max normalisation and weighted pooling against explicit loops, in float64."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lcr_lightly import CommonRationaleHead, minmax_normalize, weighted_average_pool
from lcr_lightly.pooling import PoolingCheck, RationalePooling

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


def _owner(head, **settings):
    """A stand-in for CommonRationale with the attributes the pooling hooks read."""
    state = dict(pooling="rationale", pool_in_training=False, pool_calls=0, pool_calls_seen=0)
    state.update(settings)
    return SimpleNamespace(head=head, pool_names=["backbone.avgpool", "teacher.avgpool"], **state)


def test_rationale_pooling_replaces_average_pooling_when_its_settings_say_so():
    torch.manual_seed(0)
    head = CommonRationaleHead(4, k=3).eval()
    features = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        weighted, mean = head.pool(features), features.mean(dim=(2, 3))
    cases = [  # (pooling, pool_in_training, eval_only, training) -> rationale-pooled?
        (("rationale", False, False, False), True),
        (("rationale", False, False, True), False),
        (("rationale", True, False, True), True),  # the pool-in-training ablation
        (("rationale", True, True, True), False),  # ... never for a momentum/teacher copy
        (("rationale", True, True, False), True),  # which pools at inference like the online one
        (("gap", True, False, False), False),
    ]
    for (pooling, in_training, eval_only, training), rationale in cases:
        pool = nn.AdaptiveAvgPool2d(1).train(training)
        hook = RationalePooling(
            pool, _owner(head, pooling=pooling, pool_in_training=in_training), eval_only=eval_only
        )
        with torch.no_grad():
            out = pool(features)
        hook.release()
        expected = weighted if rationale else mean
        torch.testing.assert_close(out, expected.reshape(2, 4, 1, 1), msg=str((pooling, training)))


def test_rationale_pooling_leaves_calls_it_cannot_read_alone():
    torch.manual_seed(0)
    head = CommonRationaleHead(4, k=3).eval()
    owner = _owner(head)
    pool2d, pool1d = nn.AdaptiveAvgPool2d(1).eval(), nn.AdaptiveAvgPool1d(1).eval()
    hooks = [RationalePooling(pool2d, owner, eval_only=False)]
    hooks.append(RationalePooling(pool1d, owner, eval_only=False))
    features, tokens = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 9)
    with torch.no_grad():
        by_keyword = pool2d(input=features)  # no positional argument to read
        sequence = pool1d(tokens)  # (B, C, L) is not a map
    torch.testing.assert_close(by_keyword, features.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(sequence, tokens.mean(dim=2, keepdim=True))
    assert owner.pool_calls == 0


def test_pooling_check_warns_with_the_hooked_pools_only_when_none_ran():
    owner = _owner(CommonRationaleHead(4, k=3))
    model = nn.Identity().eval()
    check = PoolingCheck(owner)
    owner.pool_calls += 1  # a hooked pool ran: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check.on_forward(model, (), None)
    with pytest.warns(RuntimeWarning) as record:  # none ran since the previous call
        check.on_forward(model, (), None)
    assert len(record) == 1 and str(record[0].message) == (
        "Identity(x) ran in eval mode with rationale pooling, but none of the pools LCR hooks "
        "('backbone.avgpool', 'teacher.avgpool') ran: its output is not rationale-pooled. Its "
        "forward evaluates another encoder or pools functionally; pool the feature map with "
        "common_rationale.head.pool(map), or pass pool=."
    )
