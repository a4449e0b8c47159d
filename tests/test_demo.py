"""The demo (the README's main command) end to end on a tiny budget."""

import json

from lcr_lightly.experiments.demo import run_demo


def test_run_demo_writes_tables_figure_and_checkpoints(tmp_path, capsys, tiny_init):
    out = tmp_path / "demo"
    summary = run_demo(
        out_dir=str(out),
        init=tiny_init[0],
        progress=False,
        widths=[8, 8, 16, 16],
        image_size=32,
        num_classes=3,
        images_per_class=4,
        test_images_per_class=3,
        epochs=1,
        batch_size=4,
        memory_bank_size=8,
    )
    printed = capsys.readouterr().out
    assert "| MoCo v2 + LCR (rationale pooling) |" in printed and "Pointing game" in printed
    assert set(summary["rows"]) == {
        "init only (GAP)",
        "MoCo v2 (GAP)",
        "MoCo v2 + LCR (GAP)",
        "MoCo v2 + LCR (rationale pooling)",
    }
    assert (out / "figure.png").stat().st_size > 1000
    assert (out / "table.md").read_text().startswith("Synthetic fine-grained set")
    assert json.loads((out / "results.json").read_text())["config"]["epochs"] == 1
    for run in ("mocov2", "mocov2_lcr"):
        assert (out / run / "model.pt").exists() and (out / run / "config.yaml").exists()
