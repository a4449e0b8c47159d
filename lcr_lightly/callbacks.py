"""Lightning callbacks that watch LCR train: the maps, and retrieval for every pooling.

Add them to any Trainer that fits a model wrapped with
:func:`~lcr_lightly.with_common_rationale`::

    trainer = pl.Trainer(
        callbacks=[
            RationaleMaps(val_images, every_n_epochs=1),
            RetrievalMonitor(val_loader, every_n_epochs=1),
            ModelCheckpoint(monitor="val/mAP_rationale", mode="max"),
        ],
    )

* :class:`RationaleMaps` draws, for a fixed set of images, one row per image: the image,
  the GradCAM of the SSL loss (what LCR fits), the learned rationale ``A'`` and the
  feature-norm map, and logs the figure to TensorBoard (``add_image``), to W&B
  (``log_image``) or, for other loggers and without one, as PNG files in the log folder.
* :class:`RetrievalMonitor` scores leave-one-out retrieval (rank-k, mAP) of a labelled
  validation loader for global average, rationale and feature-norm pooling, all three
  pooled from one forward pass per batch
  (:func:`~lcr_lightly.eval.extract_features`), plus kNN accuracy when a labelled gallery
  is given, and logs ``val/mAP_rationale``, ``val/rank1_gap``, ... for
  ``ModelCheckpoint`` and ``EarlyStopping``.

Neither changes training: the global random generators (python, NumPy, torch, CUDA)
are restored (Lightning's ``isolate_rng``), and so are every module's train/eval flag and
the parameters' gradients; :class:`RationaleMaps`, which runs a training step to get the
GradCAM, also restores every parameter and buffer (BN statistics, momentum encoders,
MoCo's queue) and silences the step's ``self.log`` calls.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lcr_lightly._validation import check_positive_int
from lcr_lightly.eval.features import extract_features
from lcr_lightly.eval.knn import knn_accuracy
from lcr_lightly.eval.retrieval import retrieval_metrics
from lcr_lightly.pooling import minmax_normalize
from lcr_lightly.rationale import CommonRationale

__all__ = ["RationaleMaps", "RetrievalMonitor", "two_view_batch", "untouched"]

MakeBatch = Callable[[Tensor, Tensor], Any]


def two_view_batch(images: Tensor, labels: Tensor) -> Tuple[List[Tensor], Tensor]:
    """The default training batch built from fixed images: ``([x, flip(x)], labels)``.

    The first view is the image itself, so the GradCAM of the first captured map lines
    up with the image column of :class:`RationaleMaps`.

    Args:
        images: (B, 3, H, W).
        labels: (B,).

    Returns:
        The batch in the shape lightly's two-view transforms give.
    """
    return [images, images.flip(-1)], labels


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log``/``log_dict`` while a callback runs a step."""


@contextmanager
def untouched(
    model: nn.Module, tensors: bool = True, silence_logging: bool = True
) -> Iterator[None]:
    """Runs a block on a model in the middle of training and undoes its side effects.

    Restored on exit: the global random generators (python, NumPy, torch and CUDA,
    through Lightning's ``isolate_rng``), each module's train/eval flag, each
    parameter's ``.grad`` (the same object), and with ``tensors`` the values of every
    parameter and buffer (BN running statistics, momentum encoders updated in a
    ``training_step``, non-persistent buffers such as lightly's MoCo queue).
    ``silence_logging`` turns the module's ``log``/``log_dict`` into no-ops inside the
    block, so a training step run for a figure logs nothing.

    Python attributes that the block changes (other than these) are not restored.

    Args:
        model: The model.
        tensors: Snapshot and restore parameter and buffer values (one copy of them).
        silence_logging: Silence ``model.log`` and ``model.log_dict``.

    Yields:
        Nothing.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    # (module, name, tensor): a step may also rebind a buffer (a lazily built queue)
    slots = [
        (module, name, tensor)
        for module in model.modules()
        for name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]
    ]
    values: Dict[int, Tensor] = {}
    if tensors:
        for _, _, tensor in slots:
            if id(tensor) not in values:
                values[id(tensor)] = tensor.detach().clone()
    shadowed = {name: model.__dict__.get(name) for name in ("log", "log_dict")}
    if silence_logging:
        for name in shadowed:
            model.__dict__[name] = _no_log
    try:
        with isolate_rng():
            yield
    finally:
        if silence_logging:
            for name, previous in shadowed.items():
                if previous is None:
                    model.__dict__.pop(name, None)
                else:
                    model.__dict__[name] = previous
        if tensors:
            with torch.no_grad():
                for module, name, tensor in slots:
                    if getattr(module, name) is not tensor:
                        setattr(module, name, tensor)
                for _, _, tensor in slots:
                    value = values[id(tensor)]
                    if tensor.shape != value.shape:  # resized in place
                        tensor.data = value
                    else:
                        tensor.copy_(value)
        for p, g in zip(params, grads):
            p.grad = g
        for module, mode in modes:
            module.training = mode


def _lcr_of(model: nn.Module, who: str) -> CommonRationale:
    lcr = getattr(model, "common_rationale", None)
    if not isinstance(lcr, CommonRationale):
        raise ValueError(
            f"{who} needs a model wrapped with lcr_lightly.with_common_rationale; "
            f"{type(model).__name__} has no 'common_rationale' submodule."
        )
    return lcr


def _due(epoch: int, every: int) -> bool:
    return (epoch + 1) % every == 0


def _first_items(source: Union[Tensor, Iterable[Any]], n: int) -> Tuple[Tensor, Tensor]:
    """The first ``n`` images (and labels, zeros if none) of a tensor or a loader."""
    if isinstance(source, Tensor):
        if source.dim() != 4:
            raise ValueError(
                f"images must be a (B, 3, H, W) tensor, got shape {tuple(source.shape)}."
            )
        images = source[:n]
        return images, torch.zeros(len(images), dtype=torch.long)
    images_seen: List[Tensor] = []
    labels_seen: List[Tensor] = []
    with isolate_rng():  # creating a loader's iterator draws from torch's generator
        for batch in source:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise ValueError(
                    "images: the loader must yield (B, 3, H, W) tensors or (images, labels, "
                    f"...) batches; got a batch of {type(x).__name__}."
                )
            y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
            images_seen.append(x)
            labels_seen.append(
                torch.as_tensor(y) if y is not None else torch.zeros(len(x), dtype=torch.long)
            )
            if sum(len(t) for t in images_seen) >= n:
                break
    if not images_seen:
        raise ValueError("images: the loader yielded no batch.")
    return torch.cat(images_seen)[:n], torch.cat(labels_seen)[:n]


def _render(fig: Figure) -> np.ndarray:
    """The figure's pixels, (H, W, 3) uint8."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class RationaleMaps(Callback):
    """Every N epochs: image | GradCAM of the SSL loss | rationale A' | feature norm.

    One row per image, for a fixed set of images. The GradCAM is that of the SSL loss of
    one training step on ``make_batch(images, labels)`` (the model in its training
    modes, as LCR sees it), for the first online view; ``A'`` and the feature-norm map
    come from an eval-mode forward of the images. Every map is min-max normalised per
    image (the GradCAM divided by its maximum) and drawn with one colour map and one
    scale over a grey copy of the image, at the map's own resolution (a 4x4 map
    shows 16 cells).

    Logged with tag ``tag`` to every TensorBoard logger (``add_image``) and W&B logger
    (``log_image``) of the trainer; with any other logger, or none, written as
    ``<log_dir>/<tag>/epochNNN.png`` (the first logger's ``log_dir``, else the
    trainer's ``default_root_dir``). Training is not changed (see :func:`untouched`).

    Args:
        images: (B, 3, H, W) images, or a loader yielding ``(images, labels, ...)``
            batches (the first ``num_images`` are used).
        every_n_epochs: Draw after every N-th training epoch.
        num_images: Rows of the figure.
        make_batch: ``(images, labels) -> training batch`` for the model's
            ``training_step``; :func:`two_view_batch` by default. Its first online view
            should be ``images`` (a multi-crop model: append the local crops).
        tag: Logger tag and PNG folder name.
        mean: Per-channel mean the images were normalised with (ImageNet's by default).
        std: Per-channel standard deviation, likewise.
        cmap: Matplotlib colour map of the maps (perceptual: ``inferno``, ``viridis``).
        cell_inches: Side of one panel in inches.
        dpi: Pixels per inch of the logged figure.

    Attributes:
        seconds: Wall time of the last drawing (maps, figure and logging).
        last_path: The last PNG written, or None.
    """

    COLUMNS = ("image", "GradCAM of SSL loss", "rationale A'", "feature norm")

    def __init__(
        self,
        images: Union[Tensor, Iterable[Any]],
        every_n_epochs: int = 1,
        num_images: int = 6,
        make_batch: Optional[MakeBatch] = None,
        tag: str = "rationale_maps",
        mean: Sequence[float] = tuple(IMAGENET_NORMALIZE["mean"]),
        std: Sequence[float] = tuple(IMAGENET_NORMALIZE["std"]),
        cmap: str = "inferno",
        cell_inches: float = 1.6,
        dpi: int = 100,
    ) -> None:
        super().__init__()
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        num_images = check_positive_int("num_images", num_images)
        self.images, self.labels = _first_items(images, num_images)
        if len(self.images) < 2:
            raise ValueError(
                "RationaleMaps needs at least 2 images: the training step that gives the "
                "GradCAM normalises with batch statistics."
            )
        self.make_batch = make_batch or two_view_batch
        self.tag = tag
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.cmap = cmap
        self.cell_inches = cell_inches
        self.dpi = check_positive_int("dpi", dpi)
        self.seconds = 0.0
        self.last_path: Optional[Path] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuses a model that is not wrapped with LCR (no rationale to draw)."""
        _lcr_of(pl_module, "RationaleMaps")

    def maps(self, pl_module: pl.LightningModule) -> Dict[str, Tensor]:
        """The four panels of every image, computed without changing the model.

        Args:
            pl_module: A wrapped model (in the train/eval modes training uses).

        Returns:
            ``{"image": (B, 3, H, W) in [0, 1], "gradcam", "rationale", "norm": (B, h, w)
            in [0, 1]}`` on the CPU.
        """
        lcr = _lcr_of(pl_module, "RationaleMaps")
        param = next(pl_module.parameters())
        images, labels = self.images.to(param.device), self.labels.to(param.device)
        n = len(images)
        record, last = lcr.record, lcr.last_step
        modes = [(m, m.training) for m in pl_module.modules()]
        with untouched(pl_module):
            # the eval panels first: the training step below moves BN statistics
            eval_maps = extract_features(
                pl_module,
                DataLoader(TensorDataset(images, labels), batch_size=n),
                poolings=("gap",),
                return_maps=True,
                progress=False,
            )
            for module, mode in modes:  # the step runs in the modes training uses
                module.training = mode
            lcr.record = True
            lcr.last_step = None
            try:
                with torch.enable_grad():
                    pl_module.training_step(self.make_batch(images, labels), 0)
                found = lcr.last_step
            finally:
                lcr.record, lcr.last_step = record, last
        if found is None or not found.gradcams:  # a non-finite step skipped with a warning
            cam = torch.zeros_like(eval_maps["norm_map"])
        else:
            cam = found.gradcams[0][:n].detach().float().cpu()
            cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        pictures = (images.detach().float().cpu() * self.std + self.mean).clamp(0, 1)
        return {
            "image": pictures,
            "gradcam": cam,
            "rationale": eval_maps["rationale_map"],
            "norm": minmax_normalize(eval_maps["norm_map"]),
        }

    def figure(self, maps: Dict[str, Tensor], title: str = "") -> Figure:
        """The figure of :meth:`maps`: one row per image, one shared colour scale.

        Args:
            maps: Output of :meth:`maps`.
            title: Figure title (e.g. the epoch).

        Returns:
            A matplotlib figure of ``(4 * cell_inches + 0.6) x (rows * cell_inches + 0.35)``
            inches (0.6: the colour bar, 0.35: the titles) at ``dpi``.
        """
        pictures = maps["image"].permute(0, 2, 3, 1).numpy()
        grey = pictures @ np.array([0.299, 0.587, 0.114])  # luminance, colour removed
        rows, cell = len(pictures), self.cell_inches
        fig = Figure(figsize=(4 * cell + 0.6, rows * cell + 0.35), dpi=self.dpi)
        grid = fig.add_gridspec(
            rows, 5, width_ratios=[1, 1, 1, 1, 0.08], left=0.01, right=0.9, bottom=0.01,
            top=1 - 0.35 / (rows * cell + 0.35), wspace=0.04, hspace=0.04,
        )  # fmt: skip
        norm = Normalize(0.0, 1.0)
        h, w = grey.shape[1:]
        for i in range(rows):
            for j, key in enumerate(("image", "gradcam", "rationale", "norm")):
                ax = fig.add_subplot(grid[i, j])
                ax.set_xticks([])
                ax.set_yticks([])
                if key == "image":
                    ax.imshow(pictures[i])
                else:
                    ax.imshow(grey[i], cmap="gray", vmin=0, vmax=1)
                    ax.imshow(
                        maps[key][i].numpy(),
                        cmap=self.cmap,
                        norm=norm,
                        alpha=0.7,
                        interpolation="nearest",
                        extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                    )
                if i == 0:
                    ax.set_title(self.COLUMNS[j], fontsize=8)
        bar = fig.colorbar(ScalarMappable(norm, self.cmap), cax=fig.add_subplot(grid[:, 4]))
        bar.ax.tick_params(labelsize=7)
        if title:
            fig.suptitle(title, fontsize=9, y=1 - 0.08 / (rows * cell + 0.35), va="top")
        return fig

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draws and logs the figure every ``every_n_epochs`` epochs."""
        if not _due(trainer.current_epoch, self.every_n_epochs):
            return
        start = time.perf_counter()
        fig = self.figure(self.maps(pl_module), title=f"epoch {trainer.current_epoch}")
        pixels = _render(fig)
        step = trainer.global_step
        shown = False
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, pixels, step, dataformats="HWC")
                shown = True
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=self.tag, images=[pixels], step=step)
                shown = True
        if not shown and trainer.is_global_zero:
            loggers = trainer.loggers
            root = getattr(loggers[0], "log_dir", None) if loggers else None
            folder = Path(root or trainer.default_root_dir) / self.tag
            folder.mkdir(parents=True, exist_ok=True)
            self.last_path = folder / f"epoch{trainer.current_epoch:03d}.png"
            fig.savefig(self.last_path, dpi=self.dpi)
        self.seconds = time.perf_counter() - start


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
        wrapped = isinstance(getattr(model, "common_rationale", None), CommonRationale)
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
        if _due(trainer.current_epoch, self.every_n_epochs):
            self._score_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Scores here in due epochs that ran no validation loop."""
        epoch = trainer.current_epoch
        if _due(epoch, self.every_n_epochs) and self._scored_epoch != epoch:
            self._score_and_log(trainer, pl_module)
