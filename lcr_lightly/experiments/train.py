"""Training one configuration: fit, resume, the run folder and its files.

A run writes into ``cfg.out_dir``: ``checkpoints/last.ckpt`` after every epoch (and
``checkpoints/epochNNN.ckpt`` every ``checkpoint_every`` epochs), then ``model.pt`` (the
weights with their config) and ``config.yaml`` as soon as training ends, then
``results.json``. ``run(cfg, resume=True)`` continues a killed run from ``last.ckpt``
and ends with the same weights as an uninterrupted run (on CPU). On SIGTERM training
stops after the current step, saves ``checkpoints/interrupted.ckpt`` and raises
:class:`TrainingInterrupted`; ``resume=True`` continues from whichever of the two
checkpoints is newer (:func:`~lcr_lightly.experiments.checkpointing.resume_checkpoint`).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from lcr_lightly.atomic import atomic_write
from lcr_lightly.experiments.build import (
    NO_LABELS,
    DataBundle,
    initialisation,
    make_data,
    make_model,
)
from lcr_lightly.experiments.checkpointing import (
    CHECKPOINT_DIR,
    AtomicCheckpointIO,
    CheckpointError,
    ConfigInCheckpoint,
    EpochSeededLoader,
    SigtermCheckpoint,
    read_checkpoint,
    resume_checkpoint,
    save_model,
)
from lcr_lightly.experiments.config import ConfigError, ExperimentConfig, UsageError
from lcr_lightly.experiments.evaluate import EvaluationError, eval_loader, evaluate
from lcr_lightly.experiments.progress import LogProgress, quiet_lightning
from lcr_lightly.experiments.provenance import provenance

RUN_FILES = ("model.pt", "config.yaml", "results.json", CHECKPOINT_DIR)

# Fields that may differ between a killed run and its resumption.
RESUME_FREE = ("out_dir", "progress", "num_workers", "accelerator", "checkpoint_every", "logger")


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM; ``interrupted.ckpt`` holds its state (message: one line).

    Attributes:
        checkpoint: The checkpoint written at the signal.
    """

    def __init__(self, message: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def check_steps(cfg: ExperimentConfig, data: DataBundle) -> None:
    """Refuses a batch larger than the training set (``drop_last`` would leave no step).

    Raises:
        ConfigError: If an epoch would have no training step.
    """
    images = len(data.ssl_train)  # type: ignore[arg-type]
    per_device = math.ceil(images / cfg.devices)
    if per_device < cfg.batch_size:
        where = f"{per_device} per device" if cfg.devices > 1 else f"{images} images"
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the training set ({where}); with "
            f"drop_last no training step would run. Use a batch size of {per_device} or less."
        )


def check_resumable(cfg: ExperimentConfig, path: Path, stored: Optional[Dict[str, Any]]) -> None:
    """Refuses to resume a checkpoint that was trained with other settings.

    Args:
        cfg: The config of the resumed run.
        path: The checkpoint.
        stored: The config stored in it.

    Raises:
        CheckpointError: If the checkpoint holds no lcr-lightly config.
        ConfigError: If a training setting differs (``RESUME_FREE`` fields may).
    """
    if stored is None:
        raise CheckpointError(
            f"not a readable lcr-lightly checkpoint: {path} (it holds no lcr-lightly config)"
        )
    current = cfg.to_dict()
    changed = [
        k for k in current if k in stored and k not in RESUME_FREE and stored[k] != current[k]
    ]
    if changed:
        diffs = ", ".join(f"{k}={stored[k]!r} there but {current[k]!r} now" for k in changed)
        raise ConfigError(
            f"cannot resume {path}: it was trained with other settings ({diffs}); resume with "
            "the same settings or start over."
        )


def _checkpoint_callbacks(folder: Path, every: int) -> List[pl.Callback]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    # enable_version_counter=False: overwrite, never write a "last-v1.ckpt" beside a stale file
    common: Dict[str, Any] = dict(dirpath=folder, enable_version_counter=False)
    periodic: Dict[str, Any] = dict(
        filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_top_k=-1
    )
    if every == 1:  # one callback: every epoch's file and last.ckpt
        return [ModelCheckpoint(every_n_epochs=1, save_last=True, **periodic, **common)]
    last = ModelCheckpoint(filename="last", every_n_epochs=1, **common)
    if every == 0:
        return [last]
    return [last, ModelCheckpoint(every_n_epochs=every, **periodic, **common)]


def _selection_callbacks(cfg: ExperimentConfig, data: DataBundle, folder: Path) -> List[Any]:
    """Retrieval on ``data.test_eval`` (the validation split), the best epoch's checkpoint, maps."""
    if cfg.eval_split != "val":  # never select on the test split
        raise ValueError("checkpoint selection needs eval_split 'val' (never the test split)")
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lcr_lightly.callbacks import RationaleMaps, RetrievalMonitor

    val: Any = data.test_eval  # the validation split when eval_split is "val"
    callbacks: List[Any] = [RetrievalMonitor(eval_loader(val, cfg))]
    if cfg.lcr:
        step = max(len(val) // 6, 1)
        images = torch.stack([val[i * step][0] for i in range(min(6, len(val)))])
        callbacks.append(RationaleMaps(images, num_images=len(images)))
    monitor = "val/mAP_rationale" if cfg.lcr else "val/mAP_gap"
    best = ModelCheckpoint(
        dirpath=folder, filename="best", monitor=monitor, mode="max", enable_version_counter=False
    )
    return [*callbacks, best]


def fit(
    cfg: ExperimentConfig,
    model: pl.LightningModule,
    data: DataBundle,
    resume: bool = False,
    checkpoint: Optional[Path] = None,
    select: bool = False,
) -> pl.LightningModule:
    """Trains a model with a Lightning Trainer (CSV or TensorBoard log, ``cfg.logger``).

    With ``select`` (``cfg.eval_split`` must be ``"val"`` and ``data`` made from it) it
    also scores retrieval on the validation split and draws the maps every epoch, and
    ends with the weights of the epoch whose validation mAP (rationale pooling with LCR,
    else GAP) was highest, ``checkpoints/best.ckpt``, kept by Lightning's
    ``ModelCheckpoint``.

    Checkpoints go to ``<out_dir>/checkpoints`` (see the module docstring). Every epoch
    is seeded from ``(cfg.seed, epoch)`` (:class:`EpochSeededLoader`), so a resumed run
    replays exactly what the killed run would have done.

    Args:
        cfg: The experiment config.
        model: The model.
        data: The data bundle.
        resume: Continue from :func:`resume_checkpoint` (optimizer, schedule, MoCo queue,
            epoch); otherwise checkpoints of an earlier run in ``out_dir`` are deleted.
        checkpoint: With ``resume``, continue from this file instead (e.g. an intact
            ``epochNNN.ckpt`` beside a damaged ``last.ckpt``).
        select: Select the checkpoint on validation retrieval (see above).

    Returns:
        The trained model (with ``select``, the selected epoch's weights).

    Raises:
        TrainingInterrupted: On SIGTERM, after saving ``checkpoints/interrupted.ckpt``.
        ConfigError: If the batch is larger than the training set, or the checkpoint
            to resume was trained with other settings.
        CheckpointError: If the checkpoint to resume is missing or unreadable.
    """
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    check_steps(cfg, data)
    folder = Path(cfg.out_dir) / CHECKPOINT_DIR
    ckpt_path: Optional[Path] = None
    first_epoch = 0
    if resume:
        ckpt_path = checkpoint or resume_checkpoint(cfg)
        if not ckpt_path.is_file():
            raise CheckpointError(
                f"nothing to resume: {ckpt_path} does not exist (no epoch of a run in "
                f"{cfg.out_dir} has finished)"
            )
        saved = read_checkpoint(ckpt_path, training=True)
        check_resumable(cfg, ckpt_path, saved.config)
        first_epoch = int(saved.next_epoch or 0)
    else:
        for stale in folder.glob("*.ckpt"):  # an earlier run's: never resume those
            stale.unlink()
    # on a terminal Lightning's bar; in a log file (CI, nohup, a cluster) whole lines
    log_lines = cfg.progress and not sys.stdout.isatty()
    progress = [LogProgress(cfg.batch_size * cfg.devices)] if log_lines else []
    selection = _selection_callbacks(cfg, data, folder) if select else []
    with quiet_lightning():  # the Trainer prints a tip when it is built
        trainer = pl.Trainer(
            max_epochs=cfg.epochs,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=cfg.precision,
            logger=(TensorBoardLogger if cfg.logger == "tensorboard" else CSVLogger)(
                cfg.out_dir, name="logs"
            ),
            callbacks=[
                LearningRateMonitor(logging_interval="step"),
                ConfigInCheckpoint(cfg.to_dict()),
                *selection,
                *_checkpoint_callbacks(folder, cfg.checkpoint_every),
                SigtermCheckpoint(folder),
                *progress,
            ],
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=cfg.progress,
            enable_model_summary=False,
            log_every_n_steps=1,
            deterministic=False,
        )
    loader = EpochSeededLoader(
        data.ssl_train,
        seed=cfg.seed,
        first_epoch=first_epoch,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
    )
    try:
        with quiet_lightning():
            trainer.fit(model, loader, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SystemExit with code 0: a job script would see success
        saved_at = folder / SigtermCheckpoint.FILENAME
        raise TrainingInterrupted(
            f"training stopped by SIGTERM at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; its state is saved in {saved_at}. Continue with: "
            f"lcr-lightly pretrain --out-dir {shlex.quote(str(cfg.out_dir))} --resume",
            saved_at,
        ) from None
    best = selection[-1].best_model_path if selection else ""
    if best:  # end with the epoch selected on validation retrieval
        model.load_state_dict(read_checkpoint(best).state_dict)
    return model


def run(
    cfg: ExperimentConfig,
    data: Optional[DataBundle] = None,
    resume: bool = False,
    checkpoint: Optional[Path] = None,
) -> Dict[str, Any]:
    """Builds, trains and evaluates one configuration; writes ``results.json``.

    The trained model is saved (``model.pt``, ``config.yaml``) before the evaluation
    starts, so an evaluation failure keeps it.

    Args:
        cfg: The experiment config.
        data: A data bundle to reuse (built from ``cfg`` when None).
        resume: Continue the run in ``cfg.out_dir`` from :func:`resume_checkpoint`.
        checkpoint: With ``resume``, continue from this training checkpoint instead.

    Returns:
        ``{"config": ..., "results": ..., "train_seconds": ..., "provenance": ...}``
        (commit, library versions and the initial weights' hash, see
        :mod:`lcr_lightly.experiments.provenance`).

    Raises:
        EvaluationError: If the evaluation fails (the message says how to re-run it).
    """
    data = data or make_data(cfg)
    model = make_model(cfg, num_classes=None)
    print(f"{cfg.backbone}: {initialisation(cfg)}", flush=True)  # never a silent random init
    start = time.time()
    if cfg.epochs > 0:
        fit(
            cfg,
            model,
            data,
            resume=resume,
            checkpoint=checkpoint,
            select=cfg.eval_split == "val",
        )
    elapsed = time.time() - start
    out_dir = save_run(cfg, model)
    try:
        if data.num_classes == 0:  # an unlabeled folder: nothing to score against
            print(NO_LABELS)
            results: Dict[str, Any] = {}
        else:
            results = evaluate(model, data, cfg)
    except Exception as err:
        reason = str(err).strip().splitlines()
        saved_model = shlex.quote(str(out_dir / "model.pt"))
        raise EvaluationError(
            f"evaluation failed ({type(err).__name__}: {reason[0] if reason else ''}); the "
            f"trained model is saved, re-run the evaluation with: lcr-lightly evaluate "
            f"--checkpoint {saved_model}"
        ) from err
    out = {
        "config": cfg.to_dict(),
        "results": results,
        "train_seconds": elapsed,
        "provenance": provenance(cfg.weights, cfg.backbone),
    }
    atomic_write(out_dir / "results.json", json.dumps(out, indent=2))
    return out


def save_run(cfg: ExperimentConfig, model: nn.Module) -> Path:
    """Writes ``model.pt`` (weights and config) and ``config.yaml`` into ``cfg.out_dir``.

    Both are written atomically; the config inside ``model.pt`` is the one that counts
    (``config.yaml`` is a copy for reading and editing), so ``lcr-lightly
    evaluate/visualize --checkpoint <dir>/model.pt`` rebuilds exactly this model.

    Args:
        cfg: The run's config.
        model: The trained model.

    Returns:
        The output folder.
    """
    import yaml

    out = Path(cfg.out_dir)
    save_model(out / "model.pt", model.state_dict(), cfg.to_dict())
    atomic_write(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    return out


def prepare_out_dir(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> None:
    """Refuses a --out-dir holding another run unless --resume or --overwrite says why."""
    out = Path(cfg.out_dir)
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return
    if not overwrite and failed_start(out, held):
        # a run that stopped before its first checkpoint (bad data, a bug): nothing to
        # keep, so its own rerun is not refused
        for name in held:
            shutil.rmtree(out / name)
        return
    if not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UsageError(
            f"--out-dir {out} is not empty ({shown}); pass --resume to continue its run or "
            "--overwrite to start over"
        )
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def failed_start(out: Path, held: List[str]) -> bool:
    """Whether ``out`` holds only the logs (and empty checkpoint folder) of a failed run."""
    if not set(held) <= {"logs", CHECKPOINT_DIR} or not all((out / h).is_dir() for h in held):
        return False
    return not any((out / CHECKPOINT_DIR).glob("*.ckpt"))
