"""Feature extraction over a data loader, in both pooling modes at once."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lcr_lightly.capture import FeatureCapture, Reshape
from lcr_lightly.layers import find_feature_layer
from lcr_lightly.pooling import POOLING_MODES, norm_pool
from lcr_lightly.rationale import CommonRationale

EXTRA_POOLINGS = ("norm",)


class MapRecorder:
    """The maps some forward hooks recorded since the last :meth:`clear`; removable."""

    def __init__(self) -> None:
        self.maps: List[Tensor] = []
        self._handles: List[Any] = []

    def clear(self) -> None:
        """Drops the recorded maps."""
        self.maps = []

    def release(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class PoolInputs(MapRecorder):
    """Records the input of every call of the given pooling modules (forward pre-hooks).

    For a model whose ``forward`` evaluates a momentum or teacher copy (lightly's DINO
    runs the teacher), the map that inference pools is the input of that copy's pool, not
    the output of the online encoder's layer.

    Args:
        pools: The pooling modules (``CommonRationale``'s hooked pools).
    """

    def __init__(self, pools: Sequence[nn.Module]) -> None:
        super().__init__()
        self._handles = [pool.register_forward_pre_hook(self._record) for pool in pools]

    def _record(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            self.maps.append(args[0])


class LayerOutputs(MapRecorder):
    """Records the output of every call of the given layers (forward hooks), as maps.

    For ViTs, which pool tokens functionally: the token layer of the online encoder and
    of its momentum/teacher copies, so that a ``forward`` evaluating the teacher (lightly's
    DINO) is tapped as well.

    Args:
        layers: The layers.
        reshape: Turns a layer output into a (B, C, H, W) map (ViT tokens), or None.
    """

    def __init__(self, layers: Sequence[nn.Module], reshape: Optional[Reshape]) -> None:
        super().__init__()
        self.reshape = reshape
        self._handles = [layer.register_forward_hook(self._record) for layer in layers]

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, Tensor):
            fmap = self.reshape(out) if self.reshape is not None else out
            if fmap.dim() == 4:
                self.maps.append(fmap)


def _token_layers(model: nn.Module, lcr: CommonRationale) -> List[nn.Module]:
    """The online layer and the same layer of each momentum/teacher copy (by dotted name)."""
    modules = dict(model.named_modules())
    layers = [lcr.capture.layer]
    for site in lcr.sites[1:]:
        layer = modules.get(site.layer_name)
        if layer is not None and all(layer is not seen for seen in layers):
            layers.append(layer)
    return layers


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
    lcr: Optional[CommonRationale] = getattr(model, "common_rationale", None)
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
    previous = lcr.pooling if lcr is not None else None
    tap: Optional[Union[FeatureCapture, PoolInputs, LayerOutputs]] = None
    if lcr is not None:
        lcr.pooling = "gap"
        pools = [site.pooler.module for site in lcr.sites if site.pooler is not None]
        if pools:  # the map a hooked pool consumes, whichever encoder forward runs
            tap = PoolInputs(pools)
        else:  # token maps (ViTs): no pool module, the token layer's reshaped output
            tap = LayerOutputs(_token_layers(model, lcr), lcr.capture.reshape)
    elif "norm" in poolings or return_maps:
        backbone = getattr(model, "backbone", model)
        tap = FeatureCapture(
            find_feature_layer(backbone)[1], training_only=False, require_grad=False
        )
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
            fmap = tap.maps[-1] if tap is not None and tap.maps else None
            if tap is not None:
                tap.clear()
            if fmap is not None and "norm" in poolings:
                out["norm"].append(norm_pool(fmap).float().cpu())
            if fmap is not None and return_maps:
                out["norm_map"].append(fmap.float().norm(dim=1).cpu())
            if fmap is not None and lcr is not None:
                if "rationale" in poolings:
                    if gap.shape[1] == fmap.shape[1]:
                        rat = lcr.head.pool(fmap)
                    else:
                        lcr.pooling = "rationale"
                        rat = model(images).flatten(1)
                        lcr.pooling = "gap"
                        if tap is not None:
                            tap.clear()
                    out["rationale"].append(rat.float().cpu())
                if return_maps:
                    out["rationale_map"].append(lcr.head.attention(fmap).float().cpu())
    finally:
        if tap is not None:
            tap.release()
        if lcr is not None and previous is not None:
            lcr.pooling = previous
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}
