import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_on_tiny_data(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(path), "--tiny"])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip()


def test_all_examples_are_collected():
    assert {p.stem for p in EXAMPLES} == {"lightly_lightning", "plain_pytorch", "solo_learn_style"}
