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


def test_python_snippets_import_torch_when_they_use_it():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        if re.search(r"\btorch\.", block):
            assert re.search(r"^import torch$", block, re.M), block[:200]


def test_evaluation_snippet_runs():
    from lcr_lightly import with_common_rationale
    from tests.conftest import ToySiamese

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Evaluation and data\n\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    namespace = {"model": with_common_rationale(ToySiamese(), k=4).eval()}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["feats"]["rationale"].shape == (200, 16)
