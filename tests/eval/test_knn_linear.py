import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lcr_lightly.eval import knn_accuracy, label_subset, linear_probe, stratified_split


@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_knn_accuracy_matches_an_explicit_weighted_vote(chunk_size):
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(50, 8)), rng.integers(0, 4, 50)
    test, test_labels = rng.normal(size=(10, 8)), rng.integers(0, 4, 10)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(test) @ unit(train).T
    hits = 0
    for q in range(10):  # the 7 most similar items vote with weight exp(sim / 0.1)
        votes = np.zeros(4)
        for j in np.argsort(-sims[q])[:7]:
            votes[labels[j]] += np.exp(sims[q, j] / 0.1)
        hits += int(votes.argmax() == test_labels[q])
    got = knn_accuracy(
        train, labels, test, test_labels, k=7, temperature=0.1, chunk_size=chunk_size
    )
    assert got == hits / 10 and 0 < hits < 10  # the data must make the vote matter


def test_knn_accuracy_hand_case():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    test = np.array([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]])
    assert knn_accuracy(train, [0, 0, 1, 1], test, [0, 1, 1], k=1) == pytest.approx(2 / 3)


def test_stratified_split_is_disjoint_and_covers_classes():
    labels = np.repeat(np.arange(4), [10, 3, 2, 1])
    tr, val = stratified_split(labels, 0.2, seed=0)
    assert set(tr).isdisjoint(val) and len(tr) + len(val) == len(labels)
    assert set(labels[val]) == {0, 1, 2} and 3 in set(labels[tr])


def test_linear_probe_separable_and_chooses_on_validation():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5)) * 3
    ytr, yte = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 10)
    xtr = centers[ytr] + rng.normal(size=(90, 5))
    xte = centers[yte] + rng.normal(size=(30, 5))
    out = linear_probe(xtr, ytr, xte, yte, weight_decays=(0.0, 1e-2))
    assert out["top1"] >= 0.9 and out["val_top1"] >= 0.8 and out["weight_decay"] in (0.0, 1e-2)
    # labels independent of the features: near chance
    shuffled = linear_probe(xtr, rng.permutation(ytr), xte, yte)
    assert shuffled["top1"] < 0.7


class _HeadPerEpoch(pl.Callback):
    """Records the classifier and the validation accuracy of every epoch."""

    def __init__(self):
        self.heads, self.val = [], []

    def on_validation_epoch_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.heads.append(copy.deepcopy(module.classification_head).eval())
            self.val.append(float(trainer.callback_metrics["val_top1"]))


def test_paper_protocol_probe_selects_the_best_validation_epoch():
    from lcr_lightly.data import SyntheticFineGrained, eval_transform
    from lcr_lightly.eval import linear_probe_paper
    from lcr_lightly.models import SmallResNet

    torch.manual_seed(0)
    backbone = SmallResNet(widths=(8, 8, 16, 16))
    backbone.fc = torch.nn.Identity()
    kw = dict(num_classes=3, image_size=32)
    train = SyntheticFineGrained(images_per_class=16, **kw)
    test = SyntheticFineGrained(images_per_class=6, split="test", **kw)
    before = [p.detach().clone() for p in backbone.parameters()]
    record = _HeadPerEpoch()
    torch.manual_seed(0)
    out = linear_probe_paper(
        backbone,
        train,
        test,
        num_classes=3,
        feature_dim=16,
        image_size=32,
        epochs=6,
        batch_size=8,
        lr=0.5,
        val_fraction=0.3,
        trainer_kwargs=dict(
            accelerator="cpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[record],
        ),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.parameters()))  # frozen
    # Test accuracy of every epoch's head, computed here from the backbone's features.
    tf = eval_transform(32)
    x = torch.stack([tf(test[i][0]) for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        features = backbone.eval()(x)
        test_acc = [float((h(features).argmax(1) == y).float().mean()) for h in record.heads]
    best = record.val.index(max(record.val))  # the first epoch reaching the maximum
    # The run must make the choice matter: the last epoch is not the best one.
    assert best != len(record.val) - 1 and test_acc[best] != test_acc[-1], (record.val, test_acc)
    assert out["val_top1"] == pytest.approx(record.val[best])
    assert out["top1"] == pytest.approx(test_acc[best])


def test_nan_features_are_refused():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    test = np.array([[1.0, 0.05], [0.05, 1.0]])
    bad_train = train.copy()
    bad_train[2, 1] = np.nan
    with pytest.raises(ValueError, match="train_features has 1 of 4 rows with NaN or inf"):
        knn_accuracy(bad_train, [0, 0, 1, 1], test, [0, 1], k=1)
    bad_test = torch.from_numpy(test).clone()
    bad_test[:, 0] = float("nan")
    with pytest.raises(ValueError, match="test_features has 2 of 2 rows"):
        knn_accuracy(train, [0, 0, 1, 1], bad_test, [0, 1], k=1)
    with pytest.raises(ValueError, match="train_features has 1 of 4 rows"):
        linear_probe(bad_train, [0, 0, 1, 1], test, [0, 1], steps=2)
    with pytest.raises(ValueError, match="test_features has 2 of 2 rows"):
        linear_probe(train, [0, 0, 1, 1], bad_test, [0, 1], steps=2)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.2])
def test_label_subset_is_stratified_and_seeded(fraction):
    labels = np.repeat(np.arange(4), [10, 5, 3, 1])
    kept = label_subset(labels, fraction, seed=0)
    for c, n in enumerate([10, 5, 3, 1]):
        assert (labels[kept] == c).sum() == max(1, round(fraction * n))
    assert np.array_equal(kept, label_subset(labels, fraction, seed=0))
    assert len(np.unique(kept)) == len(kept) and np.all(np.diff(kept) > 0)
    if fraction < 1:
        assert not np.array_equal(kept, label_subset(labels, fraction, seed=1))


def test_label_subset_refuses_a_bad_fraction():
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"^label fraction must be in \(0, 1\]"):
            label_subset(np.arange(4), bad)


def test_linear_probe_top5_and_label_fraction():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16)) * 4
    y = np.repeat(np.arange(8), 20)
    x = centers[y] + rng.normal(size=(160, 16))
    out = linear_probe(x, y, x, y, label_fraction=0.2)
    assert out["top1"] > 0.9 and out["top5"] >= out["top1"]
    # a probe trained on the kept labels only: the same as training on that subset
    kept = label_subset(y, 0.2, seed=0)
    assert out["top1"] == linear_probe(x[kept], y[kept], x, y)["top1"]
    # overlapping classes: top-1 well below 1 while the true class is usually in the top 5
    # (chance alone is 5/8), so a top-5 computed as top-1 fails here
    noisy = centers[y] / 8 + rng.normal(size=(160, 16))
    hard = linear_probe(noisy[::2], y[::2], noisy[1::2], y[1::2])
    assert hard["top1"] < 0.8 and hard["top5"] >= hard["top1"] + 0.15
    # with at most 5 classes, top-5 is always right
    three = linear_probe(x[y < 3], y[y < 3], x[y < 3], y[y < 3])
    assert three["top5"] == 1.0
