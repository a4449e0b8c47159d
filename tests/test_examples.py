import math
import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_trains_the_head_on_tiny_data(path):
    result = runpy.run_path(str(path), run_name="example")["main"](tiny=True)
    assert math.isfinite(result["kl"]) and result["kl"] > 0  # a real, non-degenerate KL
    if "rationale" in result:  # eval-mode pooling is the head's, not global average pooling
        assert result["rationale"].shape == result["gap"].shape
        assert not torch.allclose(result["rationale"], result["gap"])


def test_all_examples_are_collected():
    assert {p.stem for p in EXAMPLES} == {
        "lightly_lightning",
        "plain_pytorch",
        "solo_learn_style",
        "watch_training",
    }
