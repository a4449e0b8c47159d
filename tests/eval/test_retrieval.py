import numpy as np
import pytest
import torch

from lcr_lightly.eval import l2_normalize, retrieval_metrics


def brute_force(features, labels, ks=(1, 5), search_k=None):
    """Reference: walks each query's explicit ranked list.

    The list is the other items by decreasing similarity, other-class items first among
    equal similarities (pessimistic only against the query). With ``search_k`` (the
    ``index="hnsw"`` reference) only the top ``search_k`` items are listed: AP sums the
    precisions inside the list over min(#relevant, list length), so a query whose
    class-mates all fall outside it scores 0.
    """
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    x = x.astype(np.float32)
    sims = x @ x.T
    n = len(labels)
    hits = {k: 0 for k in ks}
    aps = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        ranked = sorted(others, key=lambda j: (-float(sims[i, j]), labels[j] == labels[i]))
        listed = ranked[:search_k]
        n_rel = sum(labels[j] == labels[i] for j in others)
        if n_rel == 0:
            continue
        found, precisions, first = 0, [], None
        for position, j in enumerate(listed, start=1):
            if labels[j] == labels[i]:
                found += 1
                precisions.append(found / position)
                first = position if first is None else first
        aps.append(sum(precisions) / min(n_rel, len(listed)))
        for k in ks:
            hits[k] += int(first is not None and first <= k)
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
    with pytest.raises(ValueError, match="features has 1 of 3 rows with NaN or inf"):
        retrieval_metrics(np.array([[1.0, 0.0], [np.nan, 1.0], [1.0, 0.0]]), [0, 0, 1])
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


def test_duplicates_inside_a_class_do_not_count_against_the_query():
    # three exact copies per class, classes far apart: a perfect retrieval
    features = np.repeat(np.eye(4)[:3], 3, axis=0)
    labels = np.repeat([0, 1, 2], 3)
    assert retrieval_metrics(features, labels) == {"rank1": 1.0, "rank5": 1.0, "mAP": 1.0}
    hnsw = retrieval_metrics(features, labels, index="hnsw", search_k=8)
    assert hnsw == {"rank1": 1.0, "rank5": 1.0, "mAP": 1.0}


def test_ties_with_the_other_class_still_count_against_the_query():
    # query 0 ties with its class mate 1 and with item 2 of the other class
    features = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = [0, 0, 1, 1]
    got = retrieval_metrics(features, labels, ks=(1, 2))
    # queries 0, 1: list (2, mate, 3): first hit at 2, AP 1/2; query 2: its mate 3 comes
    # after both 0 and 1, AP 1/3; query 3: all others tie, AP 1/3
    assert (got["rank1"], got["rank2"]) == (0.0, 0.5)
    assert got["mAP"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3 + 1 / 3) / 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_tied_data_matches_brute_force_in_exact_and_hnsw_modes(seed):
    # few distinct integer vectors: many ties inside and across classes
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 2, size=(36, 3)).astype(np.float32)
    features[features.sum(1) == 0] = 1.0
    labels = rng.integers(0, 4, 36)
    ref = brute_force(features, labels, ks=(1, 3))
    exact = retrieval_metrics(features, labels, ks=(1, 3), chunk_size=5)
    hnsw = retrieval_metrics(features, labels, ks=(1, 3), index="hnsw", search_k=35)
    for key in ("rank1", "rank3", "mAP"):
        assert exact[key] == pytest.approx(ref[key], abs=1e-12)
        assert hnsw[key] == pytest.approx(ref[key], abs=1e-12)


def test_agrees_with_torchmetrics_without_ties():
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalPrecision

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, 60)
    labels[0] = 9  # a query without relevant items: a rank-k miss, left out of mAP
    features = rng.normal(size=(6, 8))[labels % 6] + rng.normal(size=(60, 8))
    got = retrieval_metrics(features, labels, ks=(1, 5))
    x = torch.nn.functional.normalize(torch.from_numpy(features).double(), dim=1)
    sims = x @ x.T
    off = ~torch.eye(60, dtype=torch.bool)
    preds = 2.0 + sims[off]  # torchmetrics drops relevant items with a score <= 0
    target = torch.from_numpy(labels[:, None] == labels[None, :])[off]
    indexes = torch.arange(60)[:, None].expand(60, 60)[off]
    assert all(len(torch.unique(row)) == 59 for row in preds.view(60, 59))  # no ties
    expected_map = RetrievalMAP(empty_target_action="skip")(preds, target, indexes)
    hit1 = RetrievalHitRate(top_k=1)(preds, target, indexes)
    hit5 = RetrievalHitRate(top_k=5)(preds, target, indexes)
    precision1 = RetrievalPrecision(top_k=1)(preds, target, indexes)
    assert got["mAP"] == pytest.approx(float(expected_map), abs=1e-6)
    assert got["rank1"] == pytest.approx(float(hit1), abs=1e-6)
    assert got["rank1"] == pytest.approx(float(precision1), abs=1e-6)
    assert got["rank5"] == pytest.approx(float(hit5), abs=1e-6)


def _singletons_in_the_middle(seed):
    """21 items: classes of 3 and of 2 around a block of 7 single-item classes."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, 1, 2, 2] + list(range(10, 17)) + [3, 3, 3, 4, 4, 5, 5])
    return rng.normal(size=(21, 5)), labels


@pytest.mark.parametrize("approximate", [False, True])
def test_a_chunk_of_single_item_classes_does_not_end_the_scan(approximate):
    features, labels = _singletons_in_the_middle(0)
    kw = dict(index="hnsw", search_k=20) if approximate else dict(chunk_size=7)
    got = retrieval_metrics(features, labels, ks=(1, 3), **kw)  # chunk 2 has no pair
    ref = brute_force(features, labels, ks=(1, 3))
    for key in ("rank1", "rank3", "mAP"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key


def test_two_items_are_enough_and_one_is_refused():
    assert retrieval_metrics(np.array([[1.0], [0.9]]), np.array([0, 0]), ks=(1,))["rank1"] == 1.0
    with pytest.raises(ValueError, match=r"^Retrieval needs at least two items\.$"):
        retrieval_metrics(np.array([[1.0, 0.0]]), np.array([0]))


def test_l2_normalize_gives_float32_unit_rows_from_float64():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=np.float64)
    got = l2_normalize(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)


def test_labels_as_a_column_score_like_flat_labels():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 5)
    features = rng.normal(size=(20, 6))
    ref = brute_force(features, labels)
    for kw in ({}, {"index": "hnsw", "search_k": 19}):
        got = retrieval_metrics(features, labels.reshape(-1, 1), **kw)
        assert got["rank1"] == pytest.approx(ref["rank1"]), kw
        assert got["mAP"] == pytest.approx(ref["mAP"], abs=1e-9), kw


def test_no_query_with_a_same_class_item_scores_zero():
    features = np.random.default_rng(0).normal(size=(4, 3))
    for kw in ({}, {"index": "hnsw"}):
        got = retrieval_metrics(features, np.arange(4), ks=(1,), **kw)
        assert got["rank1"] == 0.0 and got["mAP"] == 0.0, kw


@pytest.mark.parametrize("search_k", [3, 5])
def test_hnsw_scores_its_truncated_list_like_a_brute_force_reference(search_k):
    # 30 items: the HNSW graph holds them all, so its lists are the exact top search_k.
    rng = np.random.default_rng(search_k)
    labels = np.repeat(np.arange(3), 10)
    features = rng.normal(size=(30, 8))
    got = retrieval_metrics(features, labels, ks=(1, 3), index="hnsw", search_k=search_k)
    ref = brute_force(features, labels, ks=(1, 3), search_k=search_k)
    # the data includes queries with no class-mate in their list (they score zero AP)
    assert ref["rank3"] < 1.0
    for key in ("rank1", "rank3", "mAP"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
