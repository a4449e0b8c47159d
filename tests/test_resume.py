"""A pretraining run survives kills and evaluation failures; bad checkpoint files are refused."""

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lcr_lightly.atomic import atomic_path, atomic_write
from lcr_lightly.data import SyntheticFineGrained, export_cub_layout
from lcr_lightly.experiments.build import load_model, make_data
from lcr_lightly.experiments.checkpointing import read_checkpoint
from lcr_lightly.experiments.cli import main
from lcr_lightly.experiments.config import ExperimentConfig
from lcr_lightly.experiments.evaluate import evaluate
from tests.conftest import user_error
from tests.test_cli import TINY_FLAGS

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    main(["pretrain", *TINY_FLAGS, "--epochs", "1", "--out-dir", str(out)])
    return out


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    flags = [*TINY_FLAGS, "--epochs", "2"]  # 12 images, batch 4: 3 steps per epoch
    main(["pretrain", *flags, "--out-dir", str(tmp_path / "full")])
    # the same command in a subprocess that SIGKILLs itself in the middle of epoch 1
    script = textwrap.dedent(
        """
        import os, signal, sys
        from lcr_lightly.models.base import SSLModule
        from lcr_lightly.experiments.cli import main
        step = SSLModule.training_step
        def killing_step(self, batch, batch_idx):
            if self.trainer.global_step == 4:  # epoch 1, second batch
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batch, batch_idx)
        SSLModule.training_step = killing_step
        main(sys.argv[1:])
        """
    )
    killed = tmp_path / "killed"
    res = subprocess.run(
        [sys.executable, "-c", script, "pretrain", *flags, "--out-dir", str(killed)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (killed / "model.pt").exists()
    assert read_checkpoint(killed / "checkpoints/last.ckpt", training=True).epoch == 0
    # resume needs no flags: the config comes from last.ckpt
    main(["pretrain", "--out-dir", str(killed), "--resume"])
    runs = (tmp_path / "full", killed)
    full, resumed = (read_checkpoint(d / "model.pt").state_dict for d in runs)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    queues = [
        torch.load(d / "checkpoints/last.ckpt", weights_only=True)["moco_queue"]["bank"]
        for d in runs
    ]
    assert torch.equal(*queues)
    results = [json.loads((d / "results.json").read_text()) for d in runs]
    assert results[0]["results"] == results[1]["results"]


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path, capsys, finished_run):
    err = user_error(capsys, ["pretrain", "--out-dir", str(finished_run), "--resume", "--k", "4"])
    assert "cannot resume" in err and "k=32 there but 4 now" in err
    err = user_error(capsys, ["pretrain", "--out-dir", str(tmp_path / "new"), "--resume"])
    assert "nothing to resume" in err and "last.ckpt does not exist" in err


def test_model_is_saved_before_a_failing_evaluation(tmp_path, capsys):
    kw = dict(num_classes=3, image_size=32, seed=0)
    root = export_cub_layout(
        [
            SyntheticFineGrained(images_per_class=4, **kw),
            SyntheticFineGrained(images_per_class=3, split="test", **kw),
        ],
        tmp_path / "CUB_200_2011",
        progress=False,
    )
    lines = (root / "images.txt").read_text().split()
    split = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    test_image = next(
        root / "images" / name for i, name in zip(lines[::2], lines[1::2]) if split[i] == "0"
    )
    good = test_image.read_bytes()
    test_image.write_bytes(b"not an image")  # a bad test image: training never reads it
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--dataset", "cub", "--data-root", str(root), "--epochs", "1"]
    err = user_error(capsys, ["pretrain", *flags, "--out-dir", str(out)])
    assert f"evaluation failed (UnreadableImageError: unreadable image {test_image}" in err
    assert not (out / "results.json").exists()
    saved = read_checkpoint(out / "model.pt")
    assert saved.config["dataset"] == "cub" and saved.config["epochs"] == 1
    # the printed command evaluates the saved model once the image is fixed
    test_image.write_bytes(good)
    command = shlex.split(err.split("re-run the evaluation with: ")[1])
    assert command[:2] == ["lcr-lightly", "evaluate"]
    main(command[1:])
    printed = json.loads(capsys.readouterr().out)
    cfg = ExperimentConfig(**saved.config)
    model = load_model(cfg, out / "model.pt")
    assert printed == json.loads(json.dumps(evaluate(model, make_data(cfg), cfg)))


def test_model_pt_holds_its_config(tmp_path, capsys, finished_run):
    saved = read_checkpoint(finished_run / "model.pt")
    assert saved.config["widths"] == [8, 8, 16, 16] and saved.config["image_size"] == 32
    # no --config and no flags: evaluate rebuilds the model from the config in model.pt,
    # even if config.yaml (a convenience copy) is stale
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.pt").write_bytes((finished_run / "model.pt").read_bytes())
    (copy / "config.yaml").write_text("widths: [16, 32, 64, 128]\n")
    main(["evaluate", "--checkpoint", str(copy / "model.pt")])
    expected = json.loads((finished_run / "results.json").read_text())["results"]
    assert json.loads(capsys.readouterr().out) == expected


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]
    atomic_write(target, b"new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_non_empty_out_dir_is_refused_without_resume_or_overwrite(capsys, finished_run):
    before = (finished_run / "model.pt").read_bytes()
    err = user_error(capsys, ["pretrain", *TINY_FLAGS, "--out-dir", str(finished_run)])
    assert "is not empty" in err and "--resume" in err and "--overwrite" in err
    assert (finished_run / "model.pt").read_bytes() == before  # nothing lost
    for out in (finished_run, finished_run.parent / "new"):
        err = user_error(capsys, ["pretrain", "--out-dir", str(out), "--resume", "--overwrite"])
        assert err == "error: --resume and --overwrite exclude each other"


def test_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_text("an old model")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_text("an old run's checkpoint")
    (out / "notes.txt").write_text("mine")
    flags = [*TINY_FLAGS, "--epochs", "2", "--checkpoint-every", "2", "--out-dir", str(out)]
    main(["pretrain", *flags, "--overwrite"])
    assert read_checkpoint(out / "model.pt").config["epochs"] == 2
    # last.ckpt after every epoch, epochNNN.ckpt every --checkpoint-every epochs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch001.ckpt", "last.ckpt"]
    assert read_checkpoint(out / "checkpoints" / "last.ckpt", training=True).epoch == 1
    assert (out / "notes.txt").read_text() == "mine"


def _bad_files(folder: Path, real: Path):
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    truncated = folder / "truncated.pt"
    data = real.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    a_list = folder / "list.pt"
    torch.save([1, 2, 3], a_list)
    text = folder / "text.pt"
    text.write_text("epochs: 3\n")
    return {"empty": empty, "truncated": truncated, "list": a_list, "text": text}


REASONS = {
    "empty": "the file is empty",
    "truncated": "truncated or corrupt",
    "list": "it holds a list, not a dict",
    "text": "not a torch file",
}


def test_unreadable_checkpoints_for_evaluate(tmp_path, capsys, finished_run):
    for name, path in _bad_files(tmp_path, finished_run / "model.pt").items():
        err = user_error(capsys, ["evaluate", *TINY_FLAGS, "--checkpoint", str(path)])
        assert err.startswith(f"error: not a readable lcr-lightly checkpoint: {path} (")
        assert REASONS[name] in err, err


def test_unreadable_checkpoints_for_resume(tmp_path, capsys, finished_run):
    real = finished_run / "checkpoints" / "last.ckpt"
    for name, path in _bad_files(tmp_path / "bad", real).items():
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
        err = user_error(capsys, ["pretrain", "--out-dir", str(out), "--resume"])
        last = out / "checkpoints" / "last.ckpt"
        assert err.startswith(f"error: not a readable lcr-lightly checkpoint: {last} (")
        assert REASONS[name] in err, err
    # weights without training state cannot be resumed
    (tmp_path / "weights" / "checkpoints").mkdir(parents=True)
    weights_only = tmp_path / "weights" / "checkpoints" / "last.ckpt"
    weights_only.write_bytes((finished_run / "model.pt").read_bytes())
    err = user_error(capsys, ["pretrain", "--out-dir", str(tmp_path / "weights"), "--resume"])
    assert "not the training state needed to resume" in err


def test_foreign_state_dict_is_refused(tmp_path, capsys):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    err = user_error(capsys, ["evaluate", *TINY_FLAGS, "--no-lcr", "--checkpoint", str(path)])
    assert "its weights do not fit the configured model" in err
