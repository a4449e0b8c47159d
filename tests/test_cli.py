import subprocess
import sys

import pytest

from lcr_lightly.cli import build_parser, load_config, main

TINY_FLAGS = [
    "--widths",
    "8",
    "8",
    "16",
    "16",
    "--image-size",
    "32",
    "--num-classes",
    "3",
    "--images-per-class",
    "4",
    "--test-images-per-class",
    "3",
    "--batch-size",
    "4",
    "--memory-bank-size",
    "8",
    "--no-progress",
]


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nweight: 0.1\nlcr: false\n")
    args = build_parser().parse_args(
        ["pretrain", "--config", str(cfg_file), "--epochs", "2", "--lcr"]
    )
    cfg = load_config(args)
    assert (cfg.epochs, cfg.weight, cfg.lcr) == (2, 0.1, True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(SystemExit, match="Unknown config keys"):
        load_config(build_parser().parse_args(["pretrain", "--config", str(bad)]))
    with pytest.raises(SystemExit, match="does not exist"):
        load_config(build_parser().parse_args(["pretrain", "--config", str(tmp_path / "no.yaml")]))


def test_pretrain_evaluate_visualize_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    main(["pretrain", *TINY_FLAGS, "--epochs", "1", "--out-dir", str(out)])
    assert (out / "model.pt").exists()
    main(["evaluate", *TINY_FLAGS, "--checkpoint", str(out / "model.pt")])
    assert '"rank1"' in capsys.readouterr().out
    fig = tmp_path / "fig.png"
    main(
        [
            "visualize",
            *TINY_FLAGS,
            "--checkpoint",
            str(out / "model.pt"),
            "--out",
            str(fig),
            "--n",
            "2",
        ]
    )
    assert fig.stat().st_size > 1000 and (tmp_path / "fig_projections.png").exists()
    with pytest.raises(SystemExit, match="has LCR head"):
        main(["evaluate", *TINY_FLAGS, "--no-lcr", "--checkpoint", str(out / "model.pt")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["evaluate", *TINY_FLAGS, "--checkpoint", str(tmp_path / "none.pt")])


def test_export_synthetic(tmp_path):
    main(
        [
            "export-synthetic",
            "--root",
            str(tmp_path / "cub"),
            "--num-classes",
            "2",
            "--images-per-class",
            "2",
            "--test-images-per-class",
            "1",
            "--image-size",
            "32",
        ]
    )
    assert len((tmp_path / "cub" / "images.txt").read_text().splitlines()) == 6


def test_console_script_help():
    for cmd in (
        [],
        ["demo"],
        ["pretrain"],
        ["evaluate"],
        ["visualize"],
        ["init"],
        ["export-synthetic"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "lcr_lightly.cli", *cmd, "--help"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0 and "usage" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "lcr_lightly.cli", "pretrain", "--epochs", "x"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "invalid int value" in res.stderr
