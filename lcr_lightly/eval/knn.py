"""Weighted k-nearest-neighbour classification, through lightly's ``knn_predict``.

The classifier of Wu et al. (2018) as used by lightly's benchmarks: cosine similarity,
the k most similar training items vote for their class with weight
``exp(sim / temperature)``. The vote itself is lightly's
:func:`lightly.utils.benchmarking.knn_predict`; this module validates and normalises the
features and feeds it query chunks, so memory stays at ``chunk_size x N`` similarities.
"""

from __future__ import annotations

import numpy as np
import torch
from lightly.utils.benchmarking import knn_predict

from lcr_lightly._validation import check_finite_rows
from lcr_lightly.eval.arrays import ArrayLike, as_numpy
from lcr_lightly.eval.retrieval import l2_normalize


def knn_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of the temperature-weighted kNN vote.

    Args:
        train_features: (N, D) gallery features.
        train_labels: (N,) gallery labels.
        test_features: (M, D) test features.
        test_labels: (M,) test labels.
        k: Neighbours per query (at most N).
        temperature: Vote temperature.
        chunk_size: Queries scored at once.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: If a feature row holds NaN or inf.
    """
    check_finite_rows("train_features", train_features)
    check_finite_rows("test_features", test_features)
    y_test = as_numpy(test_labels, np.int64).reshape(-1)
    y_train = torch.from_numpy(as_numpy(train_labels, np.int64).reshape(-1))
    classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    bank = torch.from_numpy(l2_normalize(train_features)).T.contiguous()  # (D, N)
    queries = torch.from_numpy(l2_normalize(test_features))
    k = min(k, bank.shape[1])
    predicted = [
        knn_predict(queries[i : i + chunk_size], bank, y_train, classes, k, temperature)[:, 0]
        for i in range(0, len(queries), chunk_size)
    ]
    return float((torch.cat(predicted).numpy() == y_test).mean())
