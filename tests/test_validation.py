import math

import numpy as np
import pytest
import torch
from torch import nn

from lcr_lightly import count_hooks, with_common_rationale
from lcr_lightly._validation import check_finite_rows, check_positive_int, check_real
from lcr_lightly.models import SimSiam
from lcr_lightly.rationale import CommonRationale
from tests.conftest import tiny_resnet


def test_positive_int_accepts_integers_only():
    assert check_positive_int("k", 3) == 3 and check_positive_int("k", np.int64(2)) == 2
    for bad in (0, -1, 2.5, 2.0, True, "4", None):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            check_positive_int("k", bad)


def test_real_is_finite_and_positive():
    assert check_real("tau", 0.4) == 0.4 and check_real("tau", np.float32(2)) == 2.0
    assert check_real("weight", 0, allow_zero=True) == 0.0
    for bad in (0, -0.1, math.nan, math.inf, True, "0.4", None):
        with pytest.raises(ValueError, match="tau must be a finite positive number"):
            check_real("tau", bad)
    with pytest.raises(ValueError, match="weight must be a finite non-negative number"):
        check_real("weight", -1, allow_zero=True)


def test_finite_rows_names_the_argument_and_counts_rows():
    check_finite_rows("x", np.zeros((0, 3)))
    x = torch.zeros(8, 2, dtype=torch.bfloat16)
    x[1:7, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"^x has 6 of 8 rows with NaN .* \(rows 1, 2, 3, 4, 5, \.\.\.\)"
    ):
        check_finite_rows("x", x)


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf, True])
def test_bad_lcr_weight_is_refused_and_leaves_no_hooks(weight):
    with pytest.raises(ValueError, match="weight must be a finite non-negative number"):
        CommonRationale(nn.Conv2d(3, 4, 1), in_channels=4, weight=weight)
    model = SimSiam(backbone=tiny_resnet(), batch_size=4, proj_dim=8, pred_hidden_dim=4)
    with pytest.raises(ValueError, match="weight must be"):
        with_common_rationale(model, k=4, weight=weight)
    assert count_hooks(model) == 0
    assert with_common_rationale(model, k=4, weight=0).common_rationale.weight == 0.0
