"""``lcr_lightly.load_model``: a model trained by ``lcr-lightly pretrain``, back in Python."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import pytorch_lightning as pl

from lcr_lightly.experiments.checkpointing import CheckpointError, read_checkpoint
from lcr_lightly.experiments.config import FIELD_NAMES, ExperimentConfig


def load_model(path: Union[str, os.PathLike], **overrides: Any) -> pl.LightningModule:
    """Rebuilds a trained model from a ``model.pt`` (or a run's ``.ckpt``) and its config.

    The file holds the weights and the config they were trained with, so nothing else
    is needed: no flags, no initial weights, no data.

    Example:
        >>> import torch
        >>> import lcr_lightly
        >>> model = lcr_lightly.load_model("runs/a/model.pt")  # eval mode
        >>> features = model(torch.randn(2, 3, 64, 64))  # (2, C): rationale pooling
        >>> lcr_lightly.set_pooling(model, "gap")  # the same weights, average pooling

    Args:
        path: ``<out_dir>/model.pt`` or a checkpoint in ``<out_dir>/checkpoints``.
        **overrides: Config fields to change that do not change the weights' shapes
            (e.g. ``normalize="batch"``).

    Returns:
        The model (a LightningModule, LCR-wrapped when it was trained with LCR), in eval
        mode, on the CPU.

    Raises:
        CheckpointError: If the file is unreadable or holds no lcr-lightly config (a
            plain ``state_dict``: build the model and call ``load_state_dict``).
        ConfigError: If an override is not a valid value.
    """
    from lcr_lightly.experiments.build import load_model as load_configured

    saved = read_checkpoint(path)
    if saved.config is None:
        raise CheckpointError(
            f"not a readable lcr-lightly checkpoint: {path} (it holds no lcr-lightly config: "
            "build the model yourself and call load_state_dict)"
        )
    stored = {k: v for k, v in saved.config.items() if k in FIELD_NAMES}
    model = load_configured(ExperimentConfig(**{**stored, **overrides}), Path(path))
    return model.eval()
