"""Linear probes on frozen features.

Two protocols, both selecting hyper-parameters or epochs on a validation split carved
from the training split (never on the test split):

* :func:`linear_probe` (fast default): multinomial logistic regression on cached
  features, full-batch L-BFGS, weight decay chosen on the validation split, then refit
  on the whole training split and scored once on the test split.
* :func:`linear_probe_paper` (the paper's protocol): a linear layer on a frozen
  backbone, random-resized-crop + flip, SGD lr 30, momentum 0.9, no weight decay, 100
  epochs with x0.1 decay at 60 and 80, batch 256; the epoch is chosen on validation.
"""

from __future__ import annotations

import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from lightly.utils.benchmarking import LinearClassifier
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from lcr_lightly._validation import check_finite_rows
from lcr_lightly.data.transforms import eval_transform
from lcr_lightly.eval.arrays import ArrayLike, as_numpy


def stratified_split(
    labels: ArrayLike, val_fraction: float = 0.1, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Splits indices into train and validation, per class.

    Every class with at least two items gives at least one to each side.

    Args:
        labels: (N,) labels.
        val_fraction: Fraction of each class for validation.
        seed: Random seed.

    Returns:
        ``(train_indices, val_indices)``.
    """
    y = as_numpy(labels, np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    train: List[int] = []
    val: List[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def label_subset(labels: ArrayLike, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a stratified, seeded fraction of the labelled items.

    The paper's linear probes use 100 %, 50 % and 20 % of the training labels; each class
    keeps ``round(fraction * n_c)`` of its ``n_c`` items (at least one), drawn with ``seed``.

    Args:
        labels: (N,) labels.
        fraction: Fraction of each class to keep, in (0, 1].
        seed: Random seed.

    Returns:
        Sorted indices of the kept items.

    Raises:
        ValueError: If ``fraction`` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction!r}.")
    y = as_numpy(labels, np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    kept: List[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        kept.extend(idx[: max(1, int(round(len(idx) * fraction)))])
    return np.sort(np.array(kept, dtype=np.int64))


def _fit_logreg(x: Tensor, y: Tensor, classes: int, weight_decay: float, steps: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):  # a fixed start; the caller's RNG is untouched
        torch.manual_seed(0)
        layer = nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(layer(x), y)
        loss = loss + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


def _accuracy(layer: nn.Linear, x: Tensor, y: Tensor, k: int = 1) -> float:
    with torch.no_grad():
        top = layer(x).topk(min(k, layer.out_features), dim=1).indices
        return float((top == y[:, None]).any(dim=1).float().mean())


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    steps: int = 200,
    seed: int = 0,
    label_fraction: float = 1.0,
) -> Dict[str, float]:
    """Logistic-regression probe on cached features (fast default).

    Args:
        train_features: (N, D) training features.
        train_labels: (N,) training labels.
        test_features: (M, D) test features.
        test_labels: (M,) test labels.
        weight_decays: Candidates, chosen on the validation split.
        val_fraction: Fraction of each training class held out for validation.
        steps: L-BFGS iterations.
        seed: Seed of the validation split and of the label subset.
        label_fraction: Train on this stratified fraction of the training labels
            (:func:`label_subset`; the paper's 100 / 50 / 20 %).

    Returns:
        ``{"top1": test accuracy, "top5": test top-5 accuracy, "val_top1": best
        validation accuracy, "weight_decay": chosen value}``.

    Raises:
        ValueError: If a feature row holds NaN or inf.
    """
    check_finite_rows("train_features", train_features)
    check_finite_rows("test_features", test_features)
    xtr = torch.from_numpy(as_numpy(train_features, np.float32))
    ytr = torch.from_numpy(as_numpy(train_labels, np.int64).reshape(-1))
    if label_fraction < 1.0:
        kept = torch.from_numpy(label_subset(ytr, label_fraction, seed))
        xtr, ytr = xtr[kept], ytr[kept]
    xte = torch.from_numpy(as_numpy(test_features, np.float32))
    yte = torch.from_numpy(as_numpy(test_labels, np.int64).reshape(-1))
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    classes = int(max(ytr.max(), yte.max())) + 1
    tr_idx, val_idx = stratified_split(ytr, val_fraction, seed)
    best_wd, best_val = weight_decays[0], -1.0
    for wd in weight_decays:
        layer = _fit_logreg(xtr[tr_idx], ytr[tr_idx], classes, wd, steps)
        acc = _accuracy(layer, xtr[val_idx], ytr[val_idx]) if len(val_idx) else 0.0
        if acc > best_val:
            best_wd, best_val = wd, acc
    layer = _fit_logreg(xtr, ytr, classes, best_wd, steps)
    return {
        "top1": _accuracy(layer, xte, yte),
        "top5": _accuracy(layer, xte, yte, k=5),
        "val_top1": best_val,
        "weight_decay": best_wd,
    }


class _TransformedSubset(Dataset):
    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Any) -> None:
        self.subset = Subset(dataset, list(indices))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        image, label = self.subset[i][:2]
        return self.transform(image), int(label)


class LinearProbeModule(LinearClassifier):
    """lightly's :class:`LinearClassifier` with the paper's optimisation.

    The frozen model runs in eval mode under ``no_grad`` (so a wrapped model's rationale
    pooling applies when selected). SGD with momentum 0.9, no weight decay, the given
    learning rate (not scaled by the batch size) and x0.1 decays at ``milestones``.
    Checkpoints hold the linear head only.

    Args:
        model: Feature extractor; ``model(x)`` returns (B, D).
        feature_dim: D.
        num_classes: Number of classes.
        lr: SGD learning rate (the paper: 30).
        milestones: Epochs at which the learning rate is multiplied by 0.1.
        batch_size: Batch size per device (recorded; the learning rate is not scaled).
    """

    def __init__(
        self,
        model: nn.Module,
        feature_dim: int,
        num_classes: int,
        lr: float = 30.0,
        milestones: Sequence[int] = (60, 80),
        batch_size: int = 256,
    ) -> None:
        super().__init__(
            model, batch_size, lr=lr, feature_dim=feature_dim, num_classes=num_classes, topk=(1,)
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.milestones = list(milestones)

    def configure_optimizers(self) -> Any:
        """SGD (momentum 0.9, no weight decay) with step decay."""
        opt = torch.optim.SGD(self.classification_head.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, gamma=0.1)
        return [opt], [sched]

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Keeps only the head: the frozen model never changes."""
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith("classification_head.")
        }


def linear_probe_paper(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    num_classes: int,
    feature_dim: int,
    image_size: int = 224,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 30.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int = 0,
    trainer_kwargs: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    """The paper's linear evaluation on a frozen backbone.

    Args:
        model: Feature extractor (``model(x)`` returns (B, feature_dim)); frozen.
        train_dataset: Training split yielding ``(PIL image, label)``.
        test_dataset: Test split yielding ``(PIL image, label)``.
        num_classes: Number of classes.
        feature_dim: Feature dimension.
        image_size: Crop size.
        epochs: Training epochs (100); decays at 60 % and 80 % of them.
        batch_size: Batch size (256).
        lr: Learning rate (30).
        val_fraction: Fraction of each training class held out to choose the epoch.
        seed: Seed of the split.
        num_workers: Data loader workers.
        trainer_kwargs: Extra ``pl.Trainer`` arguments.

    Returns:
        ``{"top1": test accuracy of the best validation epoch, "val_top1": ...}``; the
        epoch is chosen by Lightning's ``ModelCheckpoint(monitor="val_top1")`` (the
        first epoch reaching the maximum).
    """
    labels = [int(train_dataset[i][1]) for i in range(len(train_dataset))]  # type: ignore[arg-type]
    tr_idx, val_idx = stratified_split(np.array(labels), val_fraction, seed)
    normalize = eval_transform(image_size).transforms[-1]
    train_tf = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    )
    test_tf = eval_transform(image_size)
    loaders = [
        DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)
        for ds, shuffle in (
            (_TransformedSubset(train_dataset, tr_idx.tolist(), train_tf), True),
            (_TransformedSubset(train_dataset, val_idx.tolist(), test_tf), False),
            (_TransformedSubset(test_dataset, range(len(test_dataset)), test_tf), False),  # type: ignore[arg-type]
        )
    ]
    probe = LinearProbeModule(
        model,
        feature_dim,
        num_classes,
        lr=lr,
        milestones=(int(epochs * 0.6), int(epochs * 0.8)),
        batch_size=batch_size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        best = ModelCheckpoint(dirpath=tmp, monitor="val_top1", mode="max", save_top_k=1)
        kwargs: Dict[str, Any] = dict(max_epochs=epochs, logger=False)
        kwargs.update(trainer_kwargs or {})
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), best]
        pl.Trainer(**kwargs).fit(probe, loaders[0], loaders[1])
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    probe.load_state_dict(state["state_dict"], strict=False)
    correct = total = 0
    probe.eval()
    with torch.no_grad():
        for x, y in loaders[2]:
            correct += int((probe(x.to(probe.device)).argmax(1).cpu() == y).sum())
            total += len(y)
    assert best.best_model_score is not None  # set by the first validation epoch
    return {"top1": correct / max(total, 1), "val_top1": float(best.best_model_score)}
