"""Feature extraction over a data loader, in both pooling modes at once."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lcr_lightly.capture import FeatureCapture
from lcr_lightly.inference import POOLING_MODES
from lcr_lightly.pooling import norm_pool
from lcr_lightly.rationale import CommonRationale
from lcr_lightly.resolve import find_feature_layer

EXTRA_POOLINGS = ("norm",)


def _taps(lcr: CommonRationale) -> List[FeatureCapture]:
    """Every hooked site's feature layer, tapped in eval mode.

    A layer's output is the map its pool consumes (ViTs: the token map), so a model whose
    ``forward`` evaluates a momentum or teacher copy (lightly's DINO runs the teacher) is
    tapped at the map its inference pools.
    """
    layers: List[nn.Module] = []
    for site in lcr.sites:
        if all(site.layer is not seen for seen in layers):
            layers.append(site.layer)
    return [
        FeatureCapture(layer, reshape=lcr.reshape, training_only=False, require_grad=False)
        for layer in layers
    ]


def _last_map(taps: Sequence[FeatureCapture]) -> Optional[Tensor]:
    """The last map any tap recorded in this batch (then clears them)."""
    maps = [m for tap in taps for m in tap.maps]
    for tap in taps:
        tap.clear()
    return maps[-1] if maps else None


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    poolings: Sequence[str] = ("gap", "rationale"),
    device: Union[str, torch.device, None] = None,
    return_maps: bool = False,
    progress: bool = True,
    desc: str = "features",
    extras: bool = False,
) -> Dict[str, Tensor]:
    """Runs a model in eval mode over a loader and collects its representations.

    For a model wrapped with :func:`~lcr_lightly.with_common_rationale`, the feature map
    is tapped once per batch and both poolings are computed from it: ``"gap"`` is the
    model's own output with global average pooling, ``"rationale"`` the rationale
    pooling of the same map (a second forward is made only when the model's output is
    not the pooled map). ``"norm"`` (any model) pools with per-position feature norms,
    a parameter-free attention baseline. Unwrapped models have no ``"rationale"``.

    Args:
        model: The model; ``model(x)`` returns (B, D) features.
        loader: Yields ``(images, labels, ...)``.
        poolings: Which of ``"gap"``, ``"rationale"`` and ``"norm"`` to return.
        device: Where to run; the model's device when None.
        return_maps: Also return the per-position feature norm (B, h, w) under
            ``"norm_map"`` and, for a wrapped model, the rationale map under
            ``"rationale_map"``.
        progress: Show a tqdm progress bar.
        desc: Progress bar label.
        extras: Also return the batch items after images and labels (e.g. masks), stacked
            under ``"extra0"``, ``"extra1"``, ...

    Returns:
        ``{"labels": (N,), "gap": (N, D), "rationale": (N, D), ...}`` on the CPU.
    """
    valid = POOLING_MODES + EXTRA_POOLINGS
    for mode in poolings:
        if mode not in valid:
            raise ValueError(f"Unknown pooling {mode!r}; expected one of {valid}.")
    lcr = CommonRationale.find(model)
    if lcr is None and "rationale" in poolings:
        raise ValueError(
            f"{type(model).__name__} is not wrapped with with_common_rationale: only "
            "poolings=('gap',) is available."
        )
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    if lcr is not None:
        taps = _taps(lcr)
        previous = lcr.pooling
        lcr.set_pooling("gap")
    elif "norm" in poolings or return_maps:
        backbone = getattr(model, "backbone", model)
        layer = find_feature_layer(backbone)[1]
        taps = [FeatureCapture(layer, training_only=False, require_grad=False)]
    else:
        taps = []
    out: Dict[str, list] = {k: [] for k in ["labels", *poolings]}
    if return_maps:
        out["norm_map"] = []
        if lcr is not None:
            out["rationale_map"] = []
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images, labels = batch[0].to(device), batch[1]
            gap = model(images).flatten(1)
            out["labels"].append(torch.as_tensor(labels).cpu())
            if extras:
                for k, item in enumerate(batch[2:]):
                    out.setdefault(f"extra{k}", []).append(torch.as_tensor(item).cpu())
            if "gap" in poolings:
                out["gap"].append(gap.float().cpu())
            fmap = _last_map(taps)
            if fmap is not None and "norm" in poolings:
                out["norm"].append(norm_pool(fmap).float().cpu())
            if fmap is not None and return_maps:
                out["norm_map"].append(fmap.float().norm(dim=1).cpu())
            if fmap is not None and lcr is not None:
                if "rationale" in poolings:
                    if gap.shape[1] == fmap.shape[1]:
                        rat = lcr.head.pool(fmap)
                    else:
                        with lcr.using_pooling("rationale"):
                            rat = model(images).flatten(1)
                        _last_map(taps)
                    out["rationale"].append(rat.float().cpu())
                if return_maps:
                    out["rationale_map"].append(lcr.head.attention(fmap).float().cpu())
    finally:
        for tap in taps:
            tap.release()
        if lcr is not None:
            lcr.set_pooling(previous)
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}
