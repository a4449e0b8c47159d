"""Evaluation of a trained model: retrieval, kNN and linear probes per pooling, localisation.

Retrieval is leave-one-out on the test split (as CUB retrieval in the paper); kNN and
the linear probes train on the training split and score the test split. No choice is
made on the test split.
"""

from __future__ import annotations

import sys
from typing import Dict

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lcr_lightly.eval import (
    extract_features,
    knn_accuracy,
    linear_probe,
    localization_report,
    retrieval_metrics,
)
from lcr_lightly.experiments.build import NO_LABELS, DataBundle
from lcr_lightly.experiments.config import ConfigError, ExperimentConfig
from lcr_lightly.rationale import CommonRationale


class EvaluationError(RuntimeError):
    """Evaluation failed after training; the trained model is saved (message: one line)."""


def eval_loader(dataset: Dataset, cfg: ExperimentConfig) -> DataLoader:
    """Batches of an evaluation split (at least 64 images, no shuffling)."""
    return DataLoader(dataset, batch_size=max(cfg.batch_size, 64), num_workers=cfg.num_workers)


def evaluate(
    model: nn.Module, data: DataBundle, cfg: ExperimentConfig
) -> Dict[str, Dict[str, float]]:
    """Retrieval, kNN and linear probe per pooling, and localisation of the maps.

    Retrieval is leave-one-out on the test split (as CUB retrieval in the paper);
    kNN and the probe train on the training split and score the test split. No
    choice is made on the test split.

    Args:
        model: A trained model (wrapped or not).
        data: The data bundle.
        cfg: The experiment config.

    Returns:
        ``{pooling: {metric: value}}`` plus ``"localization"`` when masks exist.

    Raises:
        ConfigError: If the data has no labels (``dataset: folder`` without ``eval_root``).
    """
    if data.num_classes == 0:
        raise ConfigError(NO_LABELS.replace("evaluation skipped", "cannot evaluate"))
    wrapped = CommonRationale.find(model) is not None
    poolings = ("gap", "rationale", "norm") if wrapped else ("gap", "norm")
    bars = cfg.progress and sys.stderr.isatty()  # tqdm bars are noise in a log file
    test = extract_features(
        model,
        eval_loader(data.test_eval, cfg),
        poolings,
        return_maps=data.masks,
        progress=bars,
        desc="test",
        extras=data.masks,
    )
    train = extract_features(
        model, eval_loader(data.train_eval, cfg), poolings, progress=bars, desc="train"
    )
    results: Dict[str, Dict[str, float]] = {}
    for pooling in poolings:
        row = retrieval_metrics(test[pooling], test["labels"])
        row["knn"] = knn_accuracy(train[pooling], train["labels"], test[pooling], test["labels"])
        row.update(linear_rows(train[pooling], train["labels"], test[pooling], test["labels"], cfg))
        results[pooling] = row
    if data.masks:  # test batches are (image, label, object mask, part mask)
        results["localization"] = localize(test, test["extra0"], test["extra1"])
    return results


def linear_rows(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, cfg: ExperimentConfig
) -> Dict[str, float]:
    """Linear top-1/top-5 on all training labels and on each of ``cfg.label_fractions``.

    Returns:
        ``linear``, ``linear_top5`` (all labels) and ``linear_P``, ``linear_top5_P`` for
        each fraction P % below 100.
    """
    out: Dict[str, float] = {}
    for fraction in sorted({1.0, *cfg.label_fractions}, reverse=True):
        probe = linear_probe(
            train, train_labels, test, test_labels, label_fraction=fraction, seed=cfg.data_seed
        )
        suffix = "" if fraction == 1.0 else f"_{round(100 * fraction):d}"
        out[f"linear{suffix}"] = probe["top1"]
        out[f"linear_top5{suffix}"] = probe["top5"]
    return out


def localize(features: Dict[str, Tensor], objects: Tensor, parts: Tensor) -> Dict[str, float]:
    """Pointing game and energy of the rationale and feature-norm maps vs masks.

    Args:
        features: Output of :func:`~lcr_lightly.eval.extract_features` with
            ``return_maps=True`` (``"norm_map"`` and, for LCR models, ``"rationale_map"``).
        objects: Object masks (N, H, W).
        parts: Discriminative-part masks (N, H, W).

    Returns:
        Flat dict: ``{map}_{mask}_{metric}`` and the chance levels.
    """
    out: Dict[str, float] = {}
    for name in ("rationale", "norm"):
        maps = features.get(f"{name}_map")
        if maps is None:
            continue
        for mask_name, masks in (("object", objects), ("part", parts)):
            rep = localization_report(maps, masks)
            out[f"{name}_{mask_name}_pointing"] = rep["pointing"]
            out[f"{name}_{mask_name}_energy"] = rep["energy"]
            out[f"chance_{mask_name}"] = rep["chance"]
    return out
