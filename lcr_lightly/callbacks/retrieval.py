"""RetrievalMonitor: every N epochs, leave-one-out retrieval (and kNN) for every pooling."""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.seed import isolate_rng
from torch import nn

from lcr_lightly._validation import check_positive_int
from lcr_lightly.callbacks.isolation import untouched
from lcr_lightly.callbacks.schedule import is_due
from lcr_lightly.eval.features import extract_features
from lcr_lightly.eval.knn import knn_accuracy
from lcr_lightly.eval.retrieval import retrieval_metrics
from lcr_lightly.rationale import CommonRationale


class RetrievalMonitor(Callback):
    """Every N epochs: leave-one-out retrieval on a validation loader, per pooling.

    One forward pass per batch of the loader gives global average pooling (``gap``),
    rationale pooling (``rationale``, wrapped models) and feature-norm pooling
    (``norm``) of the same feature map (:func:`~lcr_lightly.eval.extract_features`);
    :func:`~lcr_lightly.eval.retrieval_metrics` scores each. Logged (``self.log``,
    epoch-level) as ``<prefix>rank1_<pooling>``, ``<prefix>rank5_<pooling>``,
    ``<prefix>mAP_<pooling>`` and, with a labelled ``gallery``,
    ``<prefix>knn_<pooling>`` (:func:`~lcr_lightly.eval.knn_accuracy` from the gallery to
    the loader), so ``ModelCheckpoint(monitor="val/mAP_rationale", mode="max")`` and
    ``EarlyStopping`` can use them.

    When the trainer runs its own validation loop in an epoch, the scores are computed in
    ``on_validation_epoch_end`` (before checkpoints are saved on validation end);
    otherwise in ``on_train_epoch_end``. Lightning moves ``ModelCheckpoint`` callbacks to
    the end of the list, but not ``EarlyStopping``: list this monitor before it. Give a
    ``ModelCheckpoint`` that monitors these keys the same ``every_n_epochs``.

    ``model(x)`` must return the representation (B, D), as lightly's benchmark modules
    and :mod:`lcr_lightly.models` do. Training is not changed (see :func:`untouched`).

    Args:
        dataloader: Yields ``(images, labels, ...)``; every item queries all others.
        every_n_epochs: Score after every N-th training epoch.
        poolings: Which of ``"gap"``, ``"rationale"``, ``"norm"``; all available when
            None (``rationale`` only for wrapped models).
        gallery: Optional labelled loader (e.g. the training images without
            augmentation) for kNN accuracy.
        knn_k: Neighbours of the kNN vote.
        knn_temperature: Temperature of the kNN vote.
        ks: The k of the rank-k accuracies.
        prefix: Prefix of the logged names.
        prog_bar: Also show ``<prefix>mAP_<first pooling>`` in the progress bar.

    Attributes:
        seconds: Wall time of the last call (feature extraction and scoring).
        last_metrics: The last scores, ``{name: value}``.
    """

    def __init__(
        self,
        dataloader: Iterable[Any],
        every_n_epochs: int = 1,
        poolings: Optional[Sequence[str]] = None,
        gallery: Optional[Iterable[Any]] = None,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        ks: Sequence[int] = (1, 5),
        prefix: str = "val/",
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        self.dataloader = dataloader
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        valid = ("gap", "rationale", "norm")
        if poolings is not None:
            for mode in poolings:
                if mode not in valid:
                    raise ValueError(f"Unknown pooling {mode!r}; expected one of {valid}.")
            if not poolings:
                raise ValueError("poolings: give at least one of ('gap', 'rationale', 'norm').")
        self.poolings = tuple(poolings) if poolings is not None else None
        self.gallery = gallery
        self.knn_k = check_positive_int("knn_k", knn_k)
        self.knn_temperature = knn_temperature
        self.ks = tuple(check_positive_int("ks", k) for k in ks)
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.seconds = 0.0
        self.last_metrics: Dict[str, float] = {}
        self._scored_epoch: Optional[int] = None

    def _poolings(self, model: nn.Module) -> Tuple[str, ...]:
        wrapped = CommonRationale.find(model) is not None
        if self.poolings is None:
            return ("gap", "rationale", "norm") if wrapped else ("gap", "norm")
        if "rationale" in self.poolings and not wrapped:
            raise ValueError(
                f"RetrievalMonitor(poolings={self.poolings}): rationale pooling needs a model "
                f"wrapped with with_common_rationale; {type(model).__name__} is not."
            )
        return self.poolings

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the poolings against the model and that the loaders give labels."""
        self._poolings(pl_module)
        for name, loader in (("dataloader", self.dataloader), ("gallery", self.gallery)):
            if loader is None:
                continue
            with isolate_rng():
                batch = next(iter(loader), None)
            labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
            if labels is None or torch.as_tensor(labels).dim() != 1:
                raise ValueError(
                    f"RetrievalMonitor: {name} must yield (images, labels, ...) batches with "
                    "integer labels (B,); retrieval is scored by class."
                )

    def compute(self, pl_module: nn.Module) -> Dict[str, float]:
        """Scores the model now (also usable outside a Trainer, e.g. before training).

        Args:
            pl_module: The model (wrapped or not).

        Returns:
            ``{"<prefix>mAP_gap": ..., "<prefix>rank1_rationale": ..., ...}``.
        """
        start = time.perf_counter()
        poolings = self._poolings(pl_module)
        out: Dict[str, float] = {}
        with untouched(pl_module, tensors=False, silence_logging=False):
            feats = extract_features(pl_module, self.dataloader, poolings, progress=False)  # type: ignore[arg-type]
            bank = None
            if self.gallery is not None:
                bank = extract_features(pl_module, self.gallery, poolings, progress=False)  # type: ignore[arg-type]
        for pooling in poolings:
            scores = retrieval_metrics(feats[pooling], feats["labels"], ks=self.ks)
            for k in self.ks:
                out[f"{self.prefix}rank{k}_{pooling}"] = scores[f"rank{k}"]
            out[f"{self.prefix}mAP_{pooling}"] = scores["mAP"]
            if bank is not None:
                out[f"{self.prefix}knn_{pooling}"] = knn_accuracy(
                    bank[pooling],
                    bank["labels"],
                    feats[pooling],
                    feats["labels"],
                    k=self.knn_k,
                    temperature=self.knn_temperature,
                )
        self.seconds = time.perf_counter() - start
        self.last_metrics = out
        return out

    def _score_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scored_epoch = trainer.current_epoch
        metrics = self.compute(pl_module)
        shown = f"{self.prefix}mAP_{self._poolings(pl_module)[0]}"
        for name, value in metrics.items():
            pl_module.log(
                name,
                value,
                prog_bar=self.prog_bar and name == shown,
                on_step=False,
                on_epoch=True,
                batch_size=1,
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Scores here when the trainer validates in a due epoch (fit only)."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if is_due(trainer.current_epoch, self.every_n_epochs):
            self._score_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Scores here in due epochs that ran no validation loop."""
        epoch = trainer.current_epoch
        if is_due(epoch, self.every_n_epochs) and self._scored_epoch != epoch:
            self._score_and_log(trainer, pl_module)
