"""The demo (the README's main command) end to end on a tiny budget."""

import json

from lcr_lightly.experiments.demo import run_demo


def test_run_demo_writes_tables_figure_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(  # the demo's ImageNet EfficientNet-Lite0, on a tiny budget
        out_dir=str(out),
        progress=False,
        image_size=64,
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
        "init only (feature-norm pooling)",
        "MoCo v2 (GAP)",
        "MoCo v2 (feature-norm pooling)",
        "MoCo v2 + LCR (GAP)",
        "MoCo v2 + LCR (rationale pooling)",
    }
    assert (out / "figure.png").stat().st_size > 1000
    assert (
        (out / "table.md")
        .read_text()
        .startswith("efficientnet_lite0 from ImageNet-trained weights")
    )
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["backbone"], config["weights"]) == ("efficientnet_lite0", "imagenet")
    assert json.loads((out / "results.json").read_text())["config"]["epochs"] == 1
    for run in ("mocov2", "mocov2_lcr"):
        assert (out / run / "model.pt").exists() and (out / run / "config.yaml").exists()
