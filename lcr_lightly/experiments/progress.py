"""Plain progress lines for logs: what a run shows when its output is not a terminal.

Lightning's progress bars redraw one line; written to a file (CI, ``nohup``, a cluster
job's log) they show nothing until the end. :class:`LogProgress` is a Lightning progress
bar that prints a full line every ``every_s`` seconds and at the end of every epoch::

    epoch 2/8  step 37/100  loss 5.1234  kl 0.0123  41.2 images/s  ETA 3m12s

:func:`quiet_lightning` hides Lightning's messages that no user can act on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from typing import Any, Iterator, Optional, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress import ProgressBar

# Logged metrics shown in the line, under a short name.
SHOWN = (("train_loss", "loss"), ("train_lcr_kl", "kl"))


def format_duration(seconds: float) -> str:
    """``3723`` -> ``"1h02m"``, ``192`` -> ``"3m12s"``, ``7.4`` -> ``"7s"``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class LogProgress(ProgressBar):
    """A progress bar of whole lines: epoch, step, loss, KL, images/s and ETA.

    Args:
        batch_size: Images per training step (all devices), for images/s.
        every_s: Seconds between two lines within an epoch (every epoch's end prints
            one too).
        stream: Where to print (standard output when None).
    """

    def __init__(
        self, batch_size: int, every_s: float = 30.0, stream: Optional[TextIO] = None
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.every_s = every_s
        self.stream = stream
        self.enabled = True
        self.start = self.last = 0.0
        self.first_step = 0
        self.printed_step = -1  # the global step of the last line

    def disable(self) -> None:
        """Stops printing (Lightning calls this on non-zero ranks)."""
        self.enabled = False

    def enable(self) -> None:
        """Prints again."""
        self.enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Starts the clock (a resumed run counts from its first new step)."""
        self.start = self.last = time.monotonic()
        self.first_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Prints a line when ``every_s`` seconds have passed since the last one."""
        if time.monotonic() - self.last >= self.every_s:
            self.report(trainer, batch_idx + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prints the epoch's last line (unless its last step printed one already)."""
        if trainer.global_step != self.printed_step:
            self.report(trainer, int(self.total_train_batches))

    def line(self, trainer: pl.Trainer, step_in_epoch: int) -> str:
        """The progress line after ``step_in_epoch`` steps of the current epoch."""
        per_epoch = self.total_train_batches
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        parts.append(f"step {step_in_epoch}/{per_epoch}")
        metrics = trainer.progress_bar_metrics
        for key, short in SHOWN:
            if key in metrics:
                parts.append(f"{short} {float(metrics[key]):.4f}")
        elapsed = time.monotonic() - self.start
        done = trainer.global_step - self.first_step
        if done > 0 and elapsed > 0:
            parts.append(f"{done * self.batch_size / elapsed:.1f} images/s")
            epochs = trainer.max_epochs or 0
            if isinstance(per_epoch, int) and epochs > 0 and not math.isinf(per_epoch):
                left = max(epochs * per_epoch - trainer.global_step, 0)
                parts.append(f"ETA {format_duration(left * elapsed / done)}")
        return "  ".join(parts)

    def report(self, trainer: pl.Trainer, step_in_epoch: int) -> None:
        """Prints :meth:`line` (rank zero only)."""
        self.last = time.monotonic()
        self.printed_step = trainer.global_step
        if self.enabled and trainer.is_global_zero:
            print(self.line(trainer, step_in_epoch), file=self.stream or sys.stdout, flush=True)


# The logger of Lightning's rank_zero_info messages (the tips among them).
RANK_ZERO_LOGGER = "pytorch_lightning.utilities.rank_zero"
# Printed when the methods' schedules ask for the number of steps: nothing to act on.
STEPS_ESTIMATE = "Loading `train_dataloader` to estimate number of stepping batches"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Tip:" not in message and not message.startswith(STEPS_ESTIMATE)


# Messages no user can act on: a Lightning/torch deprecation between the two libraries,
# the unused validation_step of the SSL models (their online classifier validates only
# when a user passes a validation loader), and the run's own checkpoint folder on resume.
UNACTIONABLE = (
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"Checkpoint directory .* exists and is not empty",  # resuming, or stale files removed
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hides Lightning's tips, its step-count notice and :data:`UNACTIONABLE` warnings.

    Only within the block: a user's own code keeps every message.
    """
    tips = _DropTips()
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    logger.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for message in UNACTIONABLE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeFilter(tips)
