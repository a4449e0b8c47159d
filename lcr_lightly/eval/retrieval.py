"""Leave-one-out retrieval: rank-k accuracy and mean average precision.

Every item of a split queries all the others by cosine similarity (features are
L2-normalised). For a query q with same-class items ("relevant") and other-class items:

* The ranking is the other items by decreasing similarity to q; among items of equal
  similarity, the other-class items come first (ties are ranked pessimistically, but only
  against the query: two relevant items that tie with each other do not push each other
  down, so exact duplicates inside a class score as well as a single copy).
* Sort the relevant items by decreasing similarity, s_(1) >= s_(2) >= ... >= s_(R); the
  i-th of them has rank ``rank_i = i + O_i`` with ``O_i = #{other-class items with
  similarity >= s_(i)}``.
* rank-k: the query scores if ``rank_1 <= k``; rank-k accuracy is the fraction of all
  queries that score (a query without relevant items never does).
* AP: ``mean_i i / rank_i`` (precision at each relevant item); mAP is the mean AP over
  queries that have at least one relevant item.

A collapsed representation (all features equal) thus scores 0 rank-1 instead of 100 %,
while exact duplicates of the query's class score 1.

The exact mode needs every similarity anyway (mAP is over the full ranking of the
other N - 1 items), so it computes them in one chunked BLAS pass and ranks with
NumPy's SIMD sort, then ranks each query's same-class items (sorted, padded to a
block) with one float32 ``searchsorted`` per query and finds ties among them from
the sorted runs, never copying a block to float64; up to 16,384 items the symmetric
similarity matrix is built from half the products (``benchmarks/retrieval_speed.py``
times it against that product). For galleries too large for that, ``index="hnsw"``
searches an approximate faiss HNSW index for the top ``search_k`` items and reports
rank-k and mAP over that truncated list (``mAP@search_k``), with the same tie rule inside the list.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from lcr_lightly._validation import check_finite_rows
from lcr_lightly.eval.arrays import ArrayLike, as_numpy


def l2_normalize(features: ArrayLike) -> np.ndarray:
    """L2-normalises rows (zero rows stay zero).

    Args:
        features: (N, D) features.

    Returns:
        (N, D) float32 array with unit-norm rows.
    """
    x = as_numpy(features, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check(features: ArrayLike, labels: ArrayLike) -> tuple:
    check_finite_rows("features", features)
    x = l2_normalize(features)
    y = as_numpy(labels, np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"features must be (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.shape[0] < 2:
        raise ValueError("Retrieval needs at least two items.")
    return x, y


def retrieval_metrics(
    features: ArrayLike,
    labels: ArrayLike,
    ks: Sequence[int] = (1, 5),
    index: str = "exact",
    search_k: int = 100,
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """Leave-one-out retrieval metrics of a split.

    Args:
        features: (N, D) features (tensor or array); cosine similarity is used.
        labels: (N,) integer class labels.
        ks: The k of the rank-k accuracies.
        index: ``"exact"`` (full ranking) or ``"hnsw"`` (approximate faiss index;
            mAP over the top ``search_k`` results).
        search_k: Results retrieved per query with ``index="hnsw"``.
        chunk_size: Queries per block in the exact mode.

    Returns:
        ``{"rank1": ..., "rank5": ..., "mAP": ...}`` as fractions in [0, 1].

    Raises:
        ValueError: If shapes disagree, there are fewer than two items, a feature row
            holds NaN or inf, or ``index`` is unknown.
    """
    x, y = _check(features, labels)
    if index == "exact":
        return _exact(x, y, ks, chunk_size)
    if index == "hnsw":
        return _approximate(x, y, ks, search_k)
    raise ValueError(f"Unknown index={index!r}; expected 'exact' or 'hnsw'.")


FULL_MATRIX_LIMIT = 16384  # items; the full float32 similarity matrix then fits in 1 GiB


def _similarity_blocks(xt: Tensor, chunk_size: int) -> Iterator[Tuple[int, int, Tensor]]:
    """Row blocks of the cosine similarity matrix, as writable float32 tensors.

    Up to :data:`FULL_MATRIX_LIMIT` items the symmetric matrix is built from its upper
    block-triangle (half the matrix multiplication); beyond, blocks are streamed.
    """
    n = xt.shape[0]
    if n <= FULL_MATRIX_LIMIT:
        full = torch.empty(n, n)
        for i in range(0, n, chunk_size):
            stop = min(i + chunk_size, n)
            block = xt[i:stop] @ xt[i:].T
            full[i:stop, i:] = block
            full[i:, i:stop] = block.T
        for i in range(0, n, chunk_size):
            stop = min(i + chunk_size, n)
            yield i, stop, full[i:stop]
        return
    for i in range(0, n, chunk_size):
        stop = min(i + chunk_size, n)
        yield i, stop, xt[i:stop] @ xt.T


def _exact(x: np.ndarray, y: np.ndarray, ks: Sequence[int], chunk_size: int) -> Dict[str, float]:
    n = x.shape[0]
    xt = torch.from_numpy(x)
    hits = {k: 0 for k in ks}
    ap_sum, ap_count = 0.0, 0
    for start, stop, block in _similarity_blocks(xt, chunk_size):
        sims = block.numpy()
        m = stop - start
        rows = np.arange(m)
        sims[rows, rows + start] = -2.0  # the query itself: below every cosine
        rel = y[start:stop, None] == y[None, :]
        rel[rows, rows + start] = False
        counts = rel.sum(axis=1)
        most = int(counts.max())
        if most == 0:
            continue
        # Each row's same-class similarities, descending, padded with -inf.
        row_of = np.repeat(rows, counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        padded = np.full((m, most), -np.inf, dtype=np.float32)
        padded[row_of, np.arange(len(row_of)) - first[row_of]] = sims[rel]
        relevant = np.sort(padded, axis=1)[:, ::-1]
        ordered = np.sort(sims, axis=1)  # NumPy's SIMD sort
        # items of the row at least as similar (the query itself is below every cosine):
        # one searchsorted per row of float32 values, no float64 copy of the block
        at_least = n - np.stack(
            [np.searchsorted(o, r, side="left") for o, r in zip(ordered, relevant)]
        )
        # same-class items at least as similar: the end of each value's run of ties
        index = np.arange(most)
        last = np.ones((m, most), dtype=bool)
        last[:, :-1] = relevant[:, :-1] != relevant[:, 1:]
        ends = np.where(last, index, most)
        same_at_least = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1] + 1
        position = index + 1  # i: 1 for the row's most similar
        ranks = position + (at_least - same_at_least)
        valid = position[None, :] <= counts[:, None]
        precision = np.where(valid, position / ranks, 0.0)
        scored = counts > 0
        ap_sum += float((precision.sum(axis=1)[scored] / counts[scored]).sum())
        ap_count += int(scored.sum())
        best = ranks[scored, 0]
        for k in ks:
            hits[k] += int((best <= k).sum())
    return _summary(hits, ap_sum, ap_count, n, ks)


HNSW_DEFAULTS = {"M": 32, "ef_construction": 100, "ef_search": 256}


def hnsw_index(
    features: np.ndarray,
    m: int = 32,
    ef_construction: Optional[int] = None,
    ef_search: Optional[int] = None,
) -> Any:
    """A faiss HNSW inner-product index over L2-normalised rows (cosine similarity).

    Args:
        features: (N, D) float32 rows, L2-normalised.
        m: Neighbours per node of the graph.
        ef_construction: Candidate list size while building (faiss's default when None).
        ef_search: Candidate list size while searching (faiss's default when None;
            faiss searches at least k).

    Returns:
        The built ``faiss.IndexHNSWFlat``.
    """
    import faiss

    index = faiss.IndexHNSWFlat(features.shape[1], int(m), faiss.METRIC_INNER_PRODUCT)
    if ef_construction is not None:
        index.hnsw.efConstruction = int(ef_construction)
    if ef_search is not None:
        index.hnsw.efSearch = int(ef_search)
    index.add(np.ascontiguousarray(features, dtype=np.float32))
    return index


def _approximate(
    x: np.ndarray, y: np.ndarray, ks: Sequence[int], search_k: int
) -> Dict[str, float]:
    n = x.shape[0]
    k = min(max(search_k, max(ks)) + 1, n)
    index = hnsw_index(x, 32)
    sims, ids = index.search(x, k)
    hits = {kk: 0 for kk in ks}
    ap_sum, ap_count = 0.0, 0
    for i in range(n):
        keep = (ids[i] != i) & (ids[i] >= 0)
        row, row_sims = ids[i][keep][: k - 1], sims[i][keep][: k - 1]
        rel_total = int((y == y[i]).sum()) - 1
        if rel_total == 0:
            continue
        rel = y[row] == y[i]
        ap_count += 1
        if not rel.any():
            continue
        relevant = np.sort(row_sims[rel])[::-1]
        others = np.sort(row_sims[~rel])
        # other-class items of the list at least as similar as each relevant item
        ranks = np.arange(1, len(relevant) + 1)
        ranks = ranks + len(others) - np.searchsorted(others, relevant, side="left")
        ap_sum += float((np.arange(1, len(relevant) + 1) / ranks).sum() / min(rel_total, len(row)))
        for kk in ks:
            hits[kk] += int(ranks[0] <= kk)
    return _summary(hits, ap_sum, ap_count, n, ks)


def _summary(
    hits: Dict[int, int], ap_sum: float, ap_count: int, n: int, ks: Sequence[int]
) -> Dict[str, float]:
    out = {f"rank{k}": hits[k] / n for k in ks}
    out["mAP"] = ap_sum / ap_count if ap_count else 0.0
    return out
