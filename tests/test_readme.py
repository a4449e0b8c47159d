"""The README's quick-start snippet, as written, on a tiny loader."""

import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tests.conftest import TwoViews


def test_quick_start_snippet_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Quick start \(Lightning\)\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {
        "train_dataloader": DataLoader(TwoViews(n=8, size=64), batch_size=4),
        "images": torch.randn(2, 3, 64, 64),
    }
    code = block.replace("max_epochs=1,", "max_epochs=1, logger=False, enable_checkpointing=False,")
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["features"].shape == (2, 512)
    assert namespace["model"].common_rationale.pooling == "gap"  # set_pooling ran last
