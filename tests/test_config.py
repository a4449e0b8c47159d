"""Configuration values are typed and validated the same way from YAML, flags and Python."""

import dataclasses
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import yaml

from lcr_lightly.experiments.cli import main, parse
from lcr_lightly.experiments.config import DATASETS, ConfigError, ExperimentConfig
from lcr_lightly.gradcam import GRADCAM_MODES
from lcr_lightly.losses import DIRECTIONS, HEADS, REDUCTIONS, SOFTMAX_AXES, TARGETS, GradCAMFitLoss
from lcr_lightly.models import METHODS
from lcr_lightly.pooling import NORMALIZE_MODES
from lcr_lightly.rationale import VIEWS
from tests.test_cli import TINY_FLAGS

ROOT = Path(__file__).parent.parent


def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_yaml_scalars_that_pyyaml_reads_as_strings_are_converted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('lr: 3e-2\nlcr: "false"\nweight: 1e-3\n')
    assert yaml.safe_load(path.read_text())["lr"] == "3e-2"  # what PyYAML gives
    _, cfg = parse(["pretrain", "--config", str(path)])
    assert (cfg.lr, cfg.lcr, cfg.weight) == (0.03, False, 0.001)
    assert type(cfg.lr) is float and cfg.lcr is False
    # the same from Python (the benchmarks build configs from yaml.safe_load)
    cfg = ExperimentConfig.from_dict(yaml.safe_load(path.read_text()))
    assert (cfg.lr, cfg.lcr, cfg.weight) == (0.03, False, 0.001)
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()  # plain types


BAD_YAML = [
    ("epochs: two", "epochs: invalid value 'two'; expected an integer >= 0."),
    ("epochs: -3", "epochs: invalid value '-3'; expected an integer >= 0."),
    ("batch_size: 0", "batch_size: invalid value '0'; expected an integer > 0."),
    ("k: 0", "k: invalid value '0'; expected an integer > 0."),
    ("weight: -0.5", "weight: invalid value '-0.5'; expected a finite number >= 0."),
    ("weight: .inf", "weight: invalid value 'inf'; expected a finite number >= 0."),
    ("tau: .nan", "tau: invalid value 'nan'; expected a finite number > 0."),
    ("tau: 0", "tau: invalid value '0'; expected a finite number > 0."),
    ("lcr: maybe", "lcr: invalid value 'maybe'; expected true or false."),
    ("lcr: 1", "lcr: invalid value '1'; expected true or false."),
    (
        "method: dino",
        "method: invalid value 'dino'; expected one of mocov2, byol, simsiam, simclr.",
    ),
    ("widths: [8, -1, 16, 16]", "widths[1]: invalid value '-1'; expected an integer > 0."),
    ("head_hidden: 0", "head_hidden: invalid value '0'; expected an integer > 0 or null."),
    ("epoch: 3", "unknown config key 'epoch'; did you mean 'epochs'?"),
]


@pytest.mark.parametrize("line,message", BAD_YAML)
def test_bad_yaml_value_is_one_line_naming_key_value_and_type(tmp_path, capsys, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    assert cli_error(capsys, ["pretrain", "--config", str(path)]) == f"error: {message}"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--epochs", "-3"], "epochs: invalid value '-3'; expected an integer >= 0."),
        (["--precision", "16"], "precision: invalid value '16'; expected one of 64-true"),
        (["--lr", "fast"], "lr: invalid value 'fast'; expected a finite number > 0 or null."),
        (["--epoch", "3"], "unknown option --epoch; did you mean --epochs?"),
        (["--widths", "8", "8"], "widths: small_resnet needs 4 stage widths, got [8, 8]"),
        (["--backbone", "resnet5"], "backbone: unknown backbone 'resnet5'"),
    ],
)
def test_bad_flag_is_one_line(capsys, flags, message):
    assert cli_error(capsys, ["pretrain", *flags]).startswith(f"error: {message}")


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(epochs=-3), "epochs: invalid value -3; expected an integer >= 0."),
        (dict(lcr="yes please"), "lcr: invalid value 'yes please'; expected true or false."),
        (dict(weights=3), "weights: invalid value 3; expected a string or null."),
        (dict(dataset="imagenet"), "dataset: invalid value 'imagenet'; expected one of"),
        (dict(dataset="imagefolder"), "data_root: dataset 'imagefolder' needs data_root"),
        (dict(min_scale=0.0), "min_scale: invalid value 0.0; expected a number in (0, 1]."),
    ],
)
def test_python_construction_validates_too(values, message):
    with pytest.raises(ConfigError) as exc:
        ExperimentConfig(**values)
    assert str(exc.value).startswith(message)
    with pytest.raises(ConfigError):  # dataclasses.replace goes through the same checks
        dataclasses.replace(ExperimentConfig(), **values)


def test_batch_larger_than_the_training_set_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--batch-size", "13", "--epochs", "1", "--out-dir", str(out)]
    err = cli_error(capsys, ["pretrain", *flags])
    assert err.startswith("error: batch_size: 13 is larger than the training set (12 images)")
    assert not (out / "model.pt").exists() and not (out / "checkpoints").exists()


def test_print_config_shows_the_effective_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 3e-2\nwidths: [8, 8, 16, 16]\n")
    out = str(tmp_path / "run")
    flags = ["--epochs", "2", "--no-lcr", "--out-dir", out, "--print-config"]
    main(["pretrain", "--config", str(path), *flags])
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = ExperimentConfig(epochs=2, lr=0.03, widths=[8, 8, 16, 16], lcr=False, out_dir=out)
    assert printed == expected.to_dict()
    assert not (tmp_path / "run").exists()  # printed, nothing trained


def test_literal_choices_match_the_library():
    hints = get_type_hints(ExperimentConfig)
    assert set(get_args(hints["method"])) == set(METHODS)
    assert get_args(hints["dataset"]) == DATASETS
    for name, choices in [
        ("target", TARGETS),
        ("head", HEADS),
        ("direction", DIRECTIONS),
        ("reduction", REDUCTIONS),
        ("gradcam_mode", GRADCAM_MODES),
        ("views", VIEWS),
        ("normalize", NORMALIZE_MODES),
        ("softmax", SOFTMAX_AXES),
    ]:
        assert get_args(hints[name]) == tuple(choices), name


@pytest.mark.parametrize("path", sorted((ROOT / "lcr_lightly/experiments/configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    values = yaml.safe_load(path.read_text())
    _, cfg = parse(["pretrain", "--config", str(path)])
    assert {k: cfg.to_dict()[k] for k in values} == values
    assert ExperimentConfig.from_dict(values) == cfg


def test_ema_momentum_reaches_the_momentum_encoder():
    from lcr_lightly.experiments.build import make_model

    small = dict(widths=[8, 8, 16, 16], lcr=False)
    assert make_model(ExperimentConfig(ema_momentum=0.99, **small)).momentum == 0.99
    byol = make_model(ExperimentConfig(method="byol", ema_momentum=0.98, **small))
    assert byol.momentum_start == 0.98
    assert make_model(ExperimentConfig(**small)).momentum == 0.999  # MoCo v2's default
    with pytest.raises(ConfigError, match="^ema_momentum: simclr has no momentum encoder"):
        ExperimentConfig(method="simclr", ema_momentum=0.9)


def test_every_lcr_field_reaches_the_built_model():
    from lcr_lightly.experiments.build import make_model

    cfg = ExperimentConfig(
        widths=[8, 8, 16, 16], k=8, weight=0.2, tau=0.5, target="raw", head="minmax",
        direction="reverse", detach_target=False, reduction="sum", softmax="rows",
        detach_features=True,
        gradcam_mode="channel", views="first", pool_in_training=True, normalize="batch",
        head_hidden=16,
    )  # fmt: skip
    lcr = make_model(cfg).common_rationale
    loss = lcr.loss_fn
    assert (loss.tau, loss.target, loss.head) == (0.5, "raw", "minmax")
    assert (loss.direction, loss.detach_target, loss.reduction) == ("reverse", False, "sum")
    assert loss.softmax == "rows"
    assert (lcr.head.k, lcr.weight, lcr.detach_features) == (8, 0.2, True)
    assert (lcr.gradcam_mode, lcr.views, lcr.pool_in_training) == ("channel", "first", True)
    assert lcr.head.normalize == "batch" and lcr.head.hidden_channels == 16
    official = make_model(ExperimentConfig(widths=[8, 8, 16, 16], official_loss=True))
    assert official.common_rationale.loss_fn.extra_repr() == GradCAMFitLoss.official().extra_repr()


@pytest.mark.parametrize(
    "value,expected",
    [
        (True, dict(tau=0.4, softmax="map")),
        ("byol", dict(tau=0.4, softmax="map")),
        ("moco", dict(tau=1.0, softmax="rows")),
    ],
)
def test_official_loss_names_the_script(value, expected):
    """official_loss: true (configs written before the MoCo preset) is the BYOL script."""
    from lcr_lightly.experiments.build import make_model

    cfg = ExperimentConfig.from_dict({"widths": [8, 8, 16, 16], "official_loss": value})
    loss = make_model(cfg).common_rationale.loss_fn
    assert (loss.tau, loss.softmax) == (expected["tau"], expected["softmax"])
    assert (loss.target, loss.head, loss.direction) == ("raw", "minmax", "forward")
    assert (loss.detach_target, loss.reduction) == (False, "sum")
    with pytest.raises(ConfigError, match="^official_loss: invalid value 'simclr'"):
        ExperimentConfig(official_loss="simclr")


def test_stem_pool_false_needs_a_resnet():
    from lcr_lightly.experiments.build import make_model

    cfg = ExperimentConfig(backbone="efficientnet_lite0", stem_pool=False, lcr=False)
    with pytest.raises(ConfigError, match="^stem_pool: EfficientNet has no stem max-pool to drop"):
        make_model(cfg)
