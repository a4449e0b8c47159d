"""Weighted k-nearest-neighbour classification through faiss.

The classifier of Wu et al. (2018) as used by lightly's benchmarks: cosine
similarity, the k most similar training items vote for their class with weight
``exp(sim / temperature)``.
"""

from __future__ import annotations

from typing import Optional

import faiss
import numpy as np
import torch
from torch import Tensor

from lcr_lightly._validation import check_finite_rows
from lcr_lightly.eval.retrieval import ArrayLike, _as_numpy, l2_normalize


def knn_predict(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
) -> Tensor:
    """Class scores of a temperature-weighted kNN vote.

    Args:
        train_features: (N, D) gallery features.
        train_labels: (N,) gallery labels.
        query_features: (M, D) query features.
        k: Neighbours per query.
        temperature: Vote temperature.
        num_classes: Number of classes; ``max(label) + 1`` when None.

    Returns:
        (M, num_classes) vote scores.

    Raises:
        ValueError: If a feature row holds NaN or inf.
    """
    check_finite_rows("train_features", train_features)
    check_finite_rows("query_features", query_features)
    gallery = l2_normalize(train_features)
    queries = l2_normalize(query_features)
    labels = _as_numpy(train_labels, np.int64).reshape(-1)
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, gallery.shape[0])
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    sims, ids = index.search(queries, k)
    weights = torch.from_numpy(sims).div(temperature).exp()
    votes = torch.zeros(queries.shape[0], classes)
    votes.scatter_add_(1, torch.from_numpy(labels[ids]), weights)
    return votes


def knn_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of :func:`knn_predict`.

    Args:
        train_features: (N, D) gallery features.
        train_labels: (N,) gallery labels.
        test_features: (M, D) test features.
        test_labels: (M,) test labels.
        k: Neighbours per query.
        temperature: Vote temperature.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: If a feature row holds NaN or inf.
    """
    check_finite_rows("train_features", train_features)
    check_finite_rows("test_features", test_features)
    y_test = _as_numpy(test_labels, np.int64).reshape(-1)
    y_train = _as_numpy(train_labels, np.int64).reshape(-1)
    classes = int(max(y_train.max(), y_test.max())) + 1
    votes = knn_predict(train_features, y_train, test_features, k, temperature, classes)
    return float((votes.argmax(dim=1).numpy() == y_test).mean())
