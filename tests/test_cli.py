import subprocess
import sys

import pytest

from lcr_lightly.experiments.cli import main, parse

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


def test_config_file_and_overrides(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nweight: 0.1\nlcr: false\n")
    _, cfg = parse(["pretrain", "--config", str(cfg_file), "--epochs", "2", "--lcr"])
    assert (cfg.epochs, cfg.weight, cfg.lcr) == (2, 0.1, True)
    _, cfg = parse(["pretrain", "--lcr", "false", "--config", str(cfg_file), "--no-lcr"])
    assert (cfg.epochs, cfg.lcr) == (7, False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--config", str(bad)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: unknown config key 'epoch'; did you mean 'epochs'?\n"
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--config", str(tmp_path / "no.yaml")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


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
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *TINY_FLAGS, "--no-lcr", "--checkpoint", str(out / "model.pt")])
    assert exc.value.code == 2 and "has LCR head" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *TINY_FLAGS, "--checkpoint", str(tmp_path / "none.pt")])
    assert exc.value.code == 2 and "(no such file)" in capsys.readouterr().err


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
            [sys.executable, "-m", "lcr_lightly.experiments.cli", *cmd, "--help"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0 and "usage" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "lcr_lightly.experiments.cli", "pretrain", "--epochs", "x"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr == "error: epochs: invalid value 'x'; expected an integer >= 0.\n"
