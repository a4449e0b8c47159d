"""The pooling hooks against the head's pooling, and the check that some pool ran."""

import warnings

import pytest
import torch
from torch import nn

from lcr_lightly import CommonRationaleHead
from lcr_lightly.inference import PoolingCheck, RationaleInference, RationalePooling


def _owner(head, pooling="rationale", pool_in_training=False):
    """Inference state with two named pools of its own (the tests hook other pools)."""
    pools = [(f"{n}.avgpool", nn.AdaptiveAvgPool2d(1)) for n in ("backbone", "teacher")]
    owner = RationaleInference(head, pools, None, "layer4", pool_in_training)
    owner.mode = pooling
    return owner


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


def test_by_default_a_pool_in_training_mode_keeps_average_pooling():
    # The paper trains with GAP: the head's weighting is an inference-time pooling.
    torch.manual_seed(0)
    head = CommonRationaleHead(4, k=3).eval()
    pool = nn.AdaptiveAvgPool2d(1).train()
    owner = RationaleInference(head, [("avgpool", pool)], None, "layer4")
    owner.mode = "rationale"
    features = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(pool(features), features.mean(dim=(2, 3), keepdim=True))
    owner.release()


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
    assert owner.calls == 0


def test_pooling_check_warns_with_the_hooked_pools_only_when_none_ran():
    owner = _owner(CommonRationaleHead(4, k=3))
    model = nn.Identity().eval()
    check = PoolingCheck(owner)
    owner.calls += 1  # a hooked pool ran: no warning
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


class _HalfMeanPool(nn.Module):
    """A global average pool that returns float16 (as a pool under fp16 autocast does)."""

    def forward(self, x):
        return x.mean(dim=(2, 3)).half()


def test_each_rationale_pooling_is_counted_once_and_keeps_the_pools_dtype():
    torch.manual_seed(0)
    head = CommonRationaleHead(4, k=3).eval()
    owner = _owner(head)
    pool = _HalfMeanPool().eval()
    hook = RationalePooling(pool, owner, eval_only=False)
    features = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        first = pool(features)
        assert owner.calls == 1
        pool(features)
        assert owner.calls == 2
        expected = head.pool(features)
    hook.release()
    assert first.dtype == torch.float16  # the pool's own output dtype
    torch.testing.assert_close(first, expected.half())
