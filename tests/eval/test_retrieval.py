import numpy as np
import pytest
import torch

from lcr_lightly.eval import retrieval_metrics


def brute_force(features, labels, ks=(1, 5)):
    """Reference: explicit loops over the pessimistic-tie definition."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    x = x.astype(np.float32)
    sims = x @ x.T
    n = len(labels)
    hits = {k: 0 for k in ks}
    aps = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        rel = [j for j in others if labels[j] == labels[i]]
        if not rel:
            continue
        ranks = {j: sum(1 for o in others if sims[i, o] >= sims[i, j]) for j in rel}
        precisions = [sum(1 for r in rel if sims[i, r] >= sims[i, j]) / ranks[j] for j in rel]
        aps.append(np.mean(precisions))
        for k in ks:
            hits[k] += int(min(ranks.values()) <= k)
    out = {f"rank{k}": hits[k] / n for k in ks}
    out["mAP"] = float(np.mean(aps))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_features(seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(40, 6))
    labels = rng.integers(0, 5, size=40)
    got = retrieval_metrics(torch.from_numpy(features), torch.from_numpy(labels), chunk_size=7)
    ref = brute_force(features, labels)
    for key in ("rank1", "rank5", "mAP"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9)


def test_ties_and_singleton_classes():
    # integer-valued features give many exact ties; class 9 has a single image
    features = np.array(
        [[1, 0], [1, 0], [0, 1], [1, 0], [0, 1], [1, 1], [1, 1], [0, 1], [2, 0]], dtype=np.float32
    )
    labels = np.array([0, 1, 1, 0, 0, 2, 2, 1, 9])
    got = retrieval_metrics(features, labels)
    ref = brute_force(features, labels)
    for key in ("rank1", "rank5", "mAP"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9)


def test_hand_checkable_case():
    # two tight clusters, one per class: everything is perfect
    features = np.array([[1, 0.01], [1, -0.01], [0.01, 1], [-0.01, 1]])
    labels = [0, 0, 1, 1]
    assert retrieval_metrics(features, labels) == {"rank1": 1.0, "rank5": 1.0, "mAP": 1.0}
    # a collapsed representation scores no rank-1 (pessimistic ties)
    collapsed = retrieval_metrics(np.ones((4, 3)), labels)
    assert collapsed["rank1"] == 0.0 and collapsed["rank5"] == 1.0
    features = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    labels = [0, 0, 1, 1]
    # query 0 ranks 2 (0.8) then 1 (0.6): rank1 miss, AP = 1/2
    # query 1 ranks 2 (0.96), 3 (0.8), 0 (0.6): match at rank 3, AP = 1/3
    # query 2 ranks 1 (0.96), 0 (0.8), 3 (0.6): match at rank 3, AP = 1/3
    # query 3 ranks 1 (0.8), 2 (0.6): match at rank 2, AP = 1/2
    got = retrieval_metrics(features, labels, ks=(1, 2, 3))
    assert (got["rank1"], got["rank2"], got["rank3"]) == (0.0, 0.5, 1.0)
    assert got["mAP"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)


def test_hnsw_option_agrees_on_easy_data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 5
    labels = np.repeat(np.arange(5), 20)
    features = centers[labels] + rng.normal(size=(100, 16)) * 0.5
    exact = retrieval_metrics(features, labels)
    approx = retrieval_metrics(features, labels, index="hnsw", search_k=99)
    assert approx["rank1"] == pytest.approx(exact["rank1"], abs=0.02)
    assert approx["mAP"] == pytest.approx(exact["mAP"], abs=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 1.0], [1.0, 0.0]]), [0, 0])
    with pytest.raises(ValueError, match="index"):
        retrieval_metrics(np.eye(3), [0, 0, 1], index="lsh")


def test_streamed_and_symmetric_paths_agree(monkeypatch):
    import lcr_lightly.eval.retrieval as retrieval

    rng = np.random.default_rng(3)
    features, labels = rng.normal(size=(50, 8)), rng.integers(0, 6, 50)
    full = retrieval_metrics(features, labels, chunk_size=16)
    monkeypatch.setattr(retrieval, "FULL_MATRIX_LIMIT", 10)
    streamed = retrieval_metrics(features, labels, chunk_size=16)
    assert full == pytest.approx(streamed, abs=1e-12)
    assert full == pytest.approx(brute_force(features, labels), abs=1e-9)
