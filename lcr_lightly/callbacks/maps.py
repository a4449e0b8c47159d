"""RationaleMaps: every N epochs, image | GradCAM of the SSL loss | rationale A' | feature norm.

The figure is drawn with matplotlib's object-oriented API (a ``Figure`` and an Agg
canvas), so the user's pyplot backend is never changed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

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
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lcr_lightly._validation import check_positive_int
from lcr_lightly.callbacks.isolation import untouched
from lcr_lightly.callbacks.schedule import is_due
from lcr_lightly.eval.features import extract_features
from lcr_lightly.pooling import minmax_normalize
from lcr_lightly.rationale import CommonRationale

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


def _lcr_of(model: nn.Module, who: str) -> CommonRationale:
    lcr = CommonRationale.find(model)
    if lcr is None:
        raise ValueError(
            f"{who} needs a model wrapped with lcr_lightly.with_common_rationale; "
            f"{type(model).__name__} has no 'common_rationale' submodule."
        )
    return lcr


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
        if not is_due(trainer.current_epoch, self.every_n_epochs):
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
