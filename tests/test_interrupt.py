"""A pretraining run sent SIGTERM (a scheduler's preemption) fails, saves, and resumes."""

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lcr_lightly.experiments.checkpointing import read_checkpoint
from tests.test_cli import TINY_FLAGS

ROOT = Path(__file__).parent.parent
CLI = [sys.executable, "-m", "lcr_lightly.experiments.cli"]
EPOCHS = 6  # 12 images, batch 4: 3 steps per epoch


def test_sigterm_exits_nonzero_saves_a_checkpoint_and_prints_a_working_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", *TINY_FLAGS, "--epochs", str(EPOCHS), "--out-dir", str(out)]
    proc = subprocess.Popen(
        [*CLI, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # training is under way: an epoch has finished
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # not 0: a job script sees the failure
    assert not (out / "model.pt").exists()
    saved = read_checkpoint(out / "checkpoints" / "interrupted.ckpt", training=True)
    raw = torch.load(out / "checkpoints" / "interrupted.ckpt", weights_only=True)
    steps_done = raw["global_step"]
    assert 3 <= steps_done < 3 * EPOCHS and saved.config["epochs"] == EPOCHS
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: training stopped by SIGTERM"), line
    command = shlex.split(line.split("Continue with: ", 1)[1])
    assert command == ["lcr-lightly", "pretrain", "--out-dir", str(out), "--resume"]
    res = subprocess.run([*CLI, *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    final = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    # the resumed run did exactly the steps that were left, no step twice or lost
    assert (final["epoch"], final["global_step"]) == (EPOCHS - 1, 3 * EPOCHS)
    assert (out / "model.pt").exists() and (out / "results.json").exists()
    assert not (out / "checkpoints" / "interrupted.ckpt").exists()  # removed once finished
