"""Figures (matplotlib).

GradCAM of the SSL loss beside the learned rationale and the feature norm, the K
projection maps ranked by variance, and samples of the synthetic set with their masks.

Figures are built as ``matplotlib.figure.Figure`` objects and written with
``Figure.savefig`` (which renders with Agg for PNG), never through pyplot: importing or
calling this module leaves the user's backend and pyplot's figure list alone.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from lcr_lightly.capture import FeatureCapture
from lcr_lightly.gradcam import gradcam
from lcr_lightly.pooling import minmax_normalize
from lcr_lightly.rationale import CommonRationale

_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def denormalize(images: Tensor) -> np.ndarray:
    """ImageNet-normalised (B, 3, H, W) tensors to (B, H, W, 3) arrays in [0, 1]."""
    return (images.detach().cpu() * _STD + _MEAN).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def ssl_gradcam(model: nn.Module, views: Sequence[Tensor]) -> Tensor:
    """GradCAM of the SSL loss for the first view, without side effects on the model.

    A copy of the model runs its own (unwrapped) training step in training mode, so
    momentum encoders, queues and BN statistics of ``model`` stay untouched.

    Args:
        model: A wrapped SSL LightningModule.
        views: Two or more views (B, 3, H, W).

    Returns:
        Per-image max-normalised GradCAM maps (B, h, w).
    """
    lcr = CommonRationale.of(model)
    twin: Any = copy.deepcopy(model)
    twin.train()
    twin_lcr = CommonRationale.of(twin)
    layer = twin_lcr.layer
    twin_lcr.release()
    labels = torch.zeros(len(views[0]), dtype=torch.long)
    with torch.enable_grad(), FeatureCapture(layer, reshape=lcr.reshape) as tap:
        loss = type(twin).training_step(twin, (list(views), labels), 0)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        (cam,) = gradcam(loss, tap.outputs[:1], reshape=tap.reshape)
    assert cam is not None
    return cam.detach() / cam.detach().flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def rationale_maps(model: nn.Module, images: Tensor) -> Dict[str, Tensor]:
    """Rationale map A' and the K projection maps of a wrapped model (eval mode).

    Args:
        model: A wrapped model.
        images: (B, 3, H, W).

    Returns:
        ``{"rationale": (B, h, w), "projections": (B, K, h, w), "features": (B, C, h, w)}``.
    """
    lcr = CommonRationale.of(model)
    was = model.training
    model.eval()
    with (
        torch.no_grad(),
        FeatureCapture(
            lcr.layer, reshape=lcr.reshape, training_only=False, require_grad=False
        ) as tap,
    ):
        model(images)
        fmap = tap.maps[-1]
        out = {
            "rationale": lcr.head.attention(fmap),
            "projections": lcr.head.projections(fmap),
            "features": fmap,
        }
    model.train(was)
    return out


# Maps are drawn in a perceptual colormap over a desaturated, dimmed image, so that the
# colours are the map's alone and equal steps of the map look like equal steps of colour.
COLORMAP = "inferno"
MAP_ALPHA = 0.65


def desaturate(image: np.ndarray, dim: float = 0.6) -> np.ndarray:
    """An (H, W, 3) image in [0, 1] as dimmed grey (Rec. 601 luma times ``dim``), RGB."""
    luma = image @ np.array([0.299, 0.587, 0.114])
    return np.repeat((dim * luma)[..., None], 3, axis=-1)


def _overlay(ax: Any, image: np.ndarray, heat: Optional[Tensor], title: str) -> Any:
    """Draws the image, or a [0, 1] map over its desaturated image (returns the map)."""
    shown = None
    if heat is None:
        ax.imshow(image)
    else:
        ax.imshow(desaturate(image))
        up = F.interpolate(heat[None, None].float(), size=image.shape[:2], mode="bilinear")
        shown = ax.imshow(up[0, 0].numpy(), cmap=COLORMAP, alpha=MAP_ALPHA, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return shown


def figure_maps(model: nn.Module, images: Tensor, views: Sequence[Tensor]) -> Dict[str, Tensor]:
    """The three maps of :func:`rationale_figure`, each in [0, 1] per image.

    Args:
        model: A wrapped SSL model.
        images: (B, 3, H, W) normalised images.
        views: Augmented views of the same images for the SSL loss.

    Returns:
        ``{"gradcam": ..., "rationale": ..., "norm": ...}``, each (B, h, w) in [0, 1]:
        the GradCAM of the SSL loss on the first view divided by its maximum (the
        loss's ``target="max"``), the learned rationale A' (min-max normalised, the
        weights of rationale pooling) and the parameter-free feature norm ``||F||`` of
        the same map, min-max normalised as :func:`~lcr_lightly.norm_pool` weights it.
    """
    maps = rationale_maps(model, images)
    return {
        "gradcam": ssl_gradcam(model, views).float().cpu(),  # already / its max
        "rationale": maps["rationale"].detach().float().cpu(),
        "norm": minmax_normalize(maps["features"].float().norm(dim=1)).cpu(),
    }


def rationale_figure(
    model: nn.Module,
    images: Tensor,
    views: Sequence[Tensor],
    out_path: str,
    part_masks: Optional[Tensor] = None,
    titles: Sequence[str] = (
        "image",
        "GradCAM of SSL loss\n(view 1)",
        "learned rationale A'",
        "feature norm ||F||\n(parameter-free)",
    ),
) -> str:
    """Image, GradCAM of the SSL loss, learned rationale and feature norm, one row per image.

    The maps (:func:`figure_maps`, each in [0, 1] per image) share one scale and one
    colour bar, in a perceptual colormap over the desaturated image; part masks, when
    given, are outlined in every column.

    Args:
        model: A wrapped SSL model.
        images: (B, 3, H, W) normalised images (B <= 8 reads best).
        views: Augmented views of the same images for the SSL loss.
        out_path: PNG path.
        part_masks: Optional (B, H, W) masks drawn as contours.
        titles: Column titles.

    Returns:
        The path.
    """
    maps = figure_maps(model, images, views)
    pics = denormalize(images)
    vis = denormalize(views[0])
    n = len(images)
    fig = Figure(figsize=(9.0, 2.1 * n + 0.3), layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    shown = None
    for i in range(n):
        top = i == 0
        _overlay(axes[i, 0], pics[i], None, titles[0] if top else "")
        shown = _overlay(axes[i, 1], vis[i], maps["gradcam"][i], titles[1] if top else "")
        _overlay(axes[i, 2], pics[i], maps["rationale"][i], titles[2] if top else "")
        _overlay(axes[i, 3], pics[i], maps["norm"][i], titles[3] if top else "")
        if part_masks is not None:
            for ax in axes[i, [0, 2, 3]]:
                ax.contour(part_masks[i].numpy(), levels=[0.5], colors="cyan", linewidths=1.0)
    assert shown is not None
    bar = fig.colorbar(shown, ax=axes[:, 1:], location="right", shrink=min(0.9, 2.5 / n))
    bar.set_label("map value per image (GradCAM / max; A', ||F|| min-max)", fontsize=8)
    if part_masks is not None:
        axes[0, 0].set_title(f"{titles[0]} (cyan: parts)", fontsize=9)
    bar.ax.tick_params(labelsize=7)
    fig.savefig(out_path, dpi=120)
    return out_path


def rank_projections(model: nn.Module, loader: Any, max_batches: Optional[int] = None) -> Tensor:
    """Ranks the head's K projections by activation variance over a data set.

    Args:
        model: A wrapped model.
        loader: Yields ``(images, ...)``.
        max_batches: Stop after this many batches.

    Returns:
        Projection indices (K,), highest variance first.
    """
    total, total_sq, count = None, None, 0
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        proj = rationale_maps(model, batch[0])["projections"].double()
        flat = proj.permute(1, 0, 2, 3).flatten(1)  # (K, B*h*w)
        s, sq = flat.sum(1), (flat**2).sum(1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += flat.shape[1]
    if total is None or total_sq is None:
        raise ValueError("The loader yielded no batch.")
    var = total_sq / count - (total / count) ** 2
    return var.argsort(descending=True)


def prune_head(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keeps only the given projections of the head (in place).

    Args:
        model: A wrapped model.
        keep: Projection indices to keep (e.g. the top-m of :func:`rank_projections`).

    Returns:
        The model.
    """
    head = CommonRationale.of(model).head
    if head.mlp is not None:
        raise ValueError("prune_head supports the 1x1-conv head only, not an MLP head.")
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    conv = nn.Conv2d(head.in_channels, len(idx), kernel_size=1, bias=False)
    bn = nn.BatchNorm2d(len(idx))
    with torch.no_grad():
        conv.weight.copy_(head.conv.weight[idx])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(head.bn, name)[idx])
    device = head.conv.weight.device
    head.conv, head.bn, head.k = conv.to(device), bn.to(device), len(idx)
    return model


def projection_figure(
    model: nn.Module, images: Tensor, out_path: str, order: Optional[Tensor] = None, top: int = 8
) -> str:
    """The K per-projection maps of each image, sorted by variance (paper, App. B).

    Args:
        model: A wrapped model.
        images: (B, 3, H, W).
        out_path: PNG path.
        order: Projection order (e.g. from :func:`rank_projections`); by this batch's
            variance when None.
        top: How many projections to show.

    Returns:
        The path.
    """
    proj = rationale_maps(model, images)["projections"]
    if order is None:
        order = proj.permute(1, 0, 2, 3).flatten(1).var(1).argsort(descending=True)
    order = order[:top]
    pics = denormalize(images)
    n = len(images)
    fig = Figure(figsize=(1.4 * (len(order) + 1), 1.4 * n))
    axes = fig.subplots(n, len(order) + 1, squeeze=False)
    for i in range(n):
        _overlay(axes[i, 0], pics[i], None, "image" if i == 0 else "")
        for j, k in enumerate(order.tolist()):
            heat = minmax_normalize(proj[i : i + 1, k])[0]
            _overlay(axes[i, j + 1], pics[i], heat, f"proj {k}" if i == 0 else "")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return out_path


def synthetic_grid(dataset: Any, out_path: str, per_class: int = 1, classes: int = 8) -> str:
    """Samples of a synthetic set with their object and part masks.

    Args:
        dataset: A :class:`~lcr_lightly.data.SyntheticFineGrained`.
        out_path: PNG path.
        per_class: Samples per class.
        classes: Number of classes shown.

    Returns:
        The path.
    """
    idx: List[int] = []
    for c in range(min(classes, dataset.num_classes)):
        idx += [c * dataset.images_per_class + j for j in range(per_class)]
    fig = Figure(figsize=(1.5 * len(idx), 4.8))
    axes = fig.subplots(3, len(idx), squeeze=False)
    for col, i in enumerate(idx):
        s = dataset.sample(i)
        axes[0, col].imshow(s["image"])
        axes[0, col].set_title(dataset.classes[s["label"]], fontsize=7)
        axes[1, col].imshow(s["object_mask"], cmap="gray")
        axes[2, col].imshow(s["part_mask"], cmap="gray")
        for row in range(3):
            axes[row, col].axis("off")
    axes[1, 0].text(
        -0.1, 0.5, "object", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right"
    )
    axes[2, 0].text(
        -0.1, 0.5, "parts", transform=axes[2, 0].transAxes, rotation=90, va="center", ha="right"
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return out_path
