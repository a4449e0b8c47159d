"""Checkpoints of a run: atomic saving, exact resume, the config inside, safe reading.

* :class:`AtomicCheckpointIO` makes Lightning write ``*.ckpt`` files atomically.
* :class:`EpochSeededLoader` seeds python, numpy and torch from ``(seed, epoch)`` when
  every epoch's iteration starts, so resuming from the checkpoint of a finished epoch replays the
  next epochs exactly (shuffling, augmentations, MoCo's key shuffle): Lightning does not
  checkpoint these generators.
* :class:`ConfigInCheckpoint` stores the run's config in every checkpoint, and
  :func:`save_model` stores it in ``model.pt``: the weights and their config are one file.
* :class:`SigtermCheckpoint` saves ``interrupted.ckpt`` when Lightning stops training on
  SIGTERM (a scheduler's preemption), so the run can go on from the step it reached.
* :func:`read_checkpoint` turns unreadable or foreign files into one-line
  :class:`CheckpointError` messages; :func:`resume_checkpoint` and :func:`resume_config`
  find the checkpoint a run continues from and its config (or an intact one beside it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.callbacks import Checkpoint as CheckpointCallback
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.utils.data import DataLoader

from lcr_lightly.atomic import atomic_path
from lcr_lightly.experiments.config import ExperimentConfig

CHECKPOINT_DIR = "checkpoints"
CONFIG_KEY = "lcr_lightly_config"
MODEL_FORMAT = "lcr-lightly-model"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (message: one line)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpointing through a temporary file and a rename.

    A kill while ``last.ckpt`` is rewritten then leaves the previous ``last.ckpt``.
    Lightning's own ``TorchCheckpointIO`` (``lightning_fabric.utilities.cloud_io._atomic_save``,
    2.6) writes through an fsspec transaction whose local file is a ``tempfile.mkstemp()``
    in the system temporary folder, moved with ``shutil.move`` on commit: when that folder
    is on another file system than the run (a tmpfs ``/tmp``, a cluster's scratch) the
    move copies into the final path, so a kill during the copy leaves a truncated
    checkpoint; nor is the data fsynced before the move. :func:`atomic_path` writes beside
    the target, fsyncs and renames.
    """

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Writes ``checkpoint`` to ``path`` atomically."""
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def epoch_seed(seed: int, epoch: int) -> int:
    """An independent 32-bit seed per (run seed, epoch) pair (no overlap across seeds)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochSeededLoader(DataLoader):
    """A DataLoader that seeds python, numpy and torch from ``(seed, epoch)`` per epoch.

    Its ``k``-th iteration is epoch ``first_epoch + k`` (Lightning iterates the training
    loader once per epoch). Seeding happens when the iteration starts, before the loader
    draws its shuffling seed and its workers' seeds and before the first batch is
    augmented, so an epoch's randomness (and that of the global generators during its
    training steps, e.g. MoCo's key shuffle) depends on the seed and the epoch only. A
    run resumed from the checkpoint of a finished epoch (``first_epoch`` = the next
    one) then replays the following epochs exactly, although Lightning checkpoints none
    of these generators.

    Args:
        dataset: The data set.
        seed: The run's seed.
        first_epoch: The epoch of the first iteration (0, or the epoch after the
            checkpoint's when resuming).
        **kwargs: DataLoader arguments (``persistent_workers`` must stay False: such
            workers would keep their generators across epochs).

    Raises:
        ValueError: If ``persistent_workers`` is requested.
    """

    def __init__(self, dataset: Any, seed: int, first_epoch: int = 0, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "EpochSeededLoader reseeds workers every epoch: no persistent_workers."
            )
        super().__init__(dataset, **kwargs)
        self.seed = seed
        self.first_epoch = first_epoch
        self.iterations = 0

    def __iter__(self) -> Any:
        """Seeds all global generators for the next epoch, then iterates."""
        epoch = self.first_epoch + self.iterations
        self.iterations += 1
        pl.seed_everything(epoch_seed(self.seed, epoch), verbose=False)
        return super().__iter__()


class ConfigInCheckpoint(Callback):
    """Stores the run's config (a plain dict) under ``"lcr_lightly_config"`` in checkpoints.

    Args:
        config: The config as a dict (``ExperimentConfig.to_dict()``).
    """

    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = dict(config)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        """Adds the config to the checkpoint dict."""
        checkpoint[CONFIG_KEY] = dict(self.config)


class SigtermCheckpoint(CheckpointCallback):
    """Saves ``interrupted.ckpt`` when Lightning stops training on SIGTERM.

    Lightning 2.x turns SIGTERM into a :class:`SIGTERMException` at the end of the
    current training step and calls every callback's ``on_exception``; this one then
    saves the full training state at that step (other exceptions write nothing). A run
    that finishes removes the file. Lightning's own ``OnExceptionCheckpoint`` would also
    make every ``fit`` without ``ckpt_path`` resume from the newest checkpoint it finds,
    which a fresh run must not.

    Args:
        dirpath: The run's checkpoint folder.
    """

    FILENAME = "interrupted.ckpt"

    def __init__(self, dirpath: Union[str, os.PathLike]) -> None:
        self.path = Path(dirpath) / self.FILENAME

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Saves the checkpoint when the exception is Lightning's SIGTERM exit."""
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Removes the checkpoint of an earlier interruption once training has finished."""
        trainer.strategy.remove_checkpoint(self.path)


def save_model(
    path: Union[str, os.PathLike], state_dict: Dict[str, Tensor], config: Dict[str, Any]
) -> Path:
    """Writes a trained model and its config as one file, atomically.

    Args:
        path: The file (``model.pt``).
        state_dict: The model's ``state_dict``.
        config: Its config (``ExperimentConfig.to_dict()``).

    Returns:
        ``path`` as a Path.
    """
    payload = {"format": MODEL_FORMAT, "config": dict(config), "state_dict": state_dict}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class Checkpoint(NamedTuple):
    """What :func:`read_checkpoint` found in a file."""

    state_dict: Dict[str, Tensor]
    config: Optional[Dict[str, Any]]  # None: no stored config (plain or older files)
    epoch: Optional[int]  # the epoch a training checkpoint was written at, else None
    # the epoch a run resumed from it starts in: epoch + 1 after a finished epoch, epoch
    # itself for a checkpoint written mid-epoch (on SIGTERM); None for weights-only files
    next_epoch: Optional[int] = None


def read_checkpoint(path: Union[str, os.PathLike], training: bool = False) -> Checkpoint:
    """Reads a ``model.pt``, a Lightning ``.ckpt`` or a plain ``state_dict`` file.

    Args:
        path: The file.
        training: Require a Lightning training checkpoint (optimizer and loop state), as
            needed to resume.

    Returns:
        The weights, the stored config and the epoch.

    Raises:
        CheckpointError: If the file is missing, empty, truncated, not a torch file or
            holds something else than a model's weights.
    """
    where = Path(path)
    prefix = f"not a readable lcr-lightly checkpoint: {where}"
    if not where.is_file():
        raise CheckpointError(f"{prefix} (no such file)")
    if where.stat().st_size == 0:
        raise CheckpointError(f"{prefix} (the file is empty)")
    with open(where, "rb") as handle:
        head = handle.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save's zip, or legacy pickle
        raise CheckpointError(f"{prefix} (not a torch file: it starts with {head!r})")
    try:
        loaded = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle, EOF and unpickling errors all mean "unreadable"
        raise CheckpointError(f"{prefix} (truncated or corrupt: {_first_line(err)})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{prefix} (it holds a {type(loaded).__name__}, not a dict)")
    state = loaded.get("state_dict", loaded)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise CheckpointError(f"{prefix} (it holds no state_dict of tensors)")
    epoch = loaded.get("epoch")
    if training and not (
        isinstance(epoch, int) and all(k in loaded for k in ("optimizer_states", "loops"))
    ):
        raise CheckpointError(
            f"{prefix} (it holds weights only, not the training state needed to resume)"
        )
    config = loaded.get("config") if loaded.get("format") == MODEL_FORMAT else None
    config = loaded.get(CONFIG_KEY, config)
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{prefix} (its stored config is a {type(config).__name__})")
    if not isinstance(epoch, int):
        return Checkpoint(state, config, None)
    return Checkpoint(state, config, epoch, _next_epoch(loaded, epoch))


def _next_epoch(loaded: Dict[str, Any], epoch: int) -> int:
    """The epoch Lightning continues in: the count of processed epochs of the fit loop."""
    try:
        fit_loop = loaded["loops"]["fit_loop"]
        processed = int(fit_loop["epoch_progress"]["current"]["processed"])
        last_batch_done = bool(fit_loop["epoch_loop.batch_progress"]["is_last_batch"])
    except (KeyError, TypeError, ValueError):  # older or foreign loop state
        return epoch + 1
    # stopped after the epoch's last step but before its end hooks: that epoch is done
    return max(processed, epoch + 1) if last_batch_done else processed


def last_checkpoint(cfg: ExperimentConfig) -> Path:
    """Where a run's latest training checkpoint is (``<out_dir>/checkpoints/last.ckpt``)."""
    return Path(cfg.out_dir) / CHECKPOINT_DIR / "last.ckpt"


def resume_checkpoint(cfg: ExperimentConfig) -> Path:
    """The checkpoint ``--resume`` continues from.

    The newer of ``last.ckpt`` and ``interrupted.ckpt`` (written on SIGTERM);
    ``last.ckpt``'s path when neither exists.
    """
    last = last_checkpoint(cfg)
    found = [p for p in (last, last.with_name(SigtermCheckpoint.FILENAME)) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else last


def resume_config(path: Path, suggest_intact: bool = True) -> Dict[str, Any]:
    """The config stored in the training checkpoint a run resumes from.

    Args:
        path: The training checkpoint.
        suggest_intact: For a damaged file, name the newest intact checkpoint beside it.

    Returns:
        The stored config (a dict of :class:`ExperimentConfig` fields).

    Raises:
        CheckpointError: If the file is unreadable or holds no lcr-lightly config.
    """
    try:
        config = read_checkpoint(path, training=True).config
    except CheckpointError as err:
        intact = intact_checkpoint(path) if suggest_intact else None
        if intact is None:
            raise
        raise CheckpointError(
            f"{err}; {intact} beside it is intact: continue from it with --resume-from {intact}"
        ) from None
    if config is None:
        raise CheckpointError(
            f"not a readable lcr-lightly checkpoint: {path} (it holds no lcr-lightly config)"
        )
    return config


def intact_checkpoint(broken: Path) -> Optional[Path]:
    """The newest readable training checkpoint in the folder of a damaged one, if any."""
    others = [p for p in broken.parent.glob("*.ckpt") if p != broken]
    for candidate in sorted(others, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            if read_checkpoint(candidate, training=True).config is not None:
                return candidate
        except CheckpointError:
            continue
    return None
