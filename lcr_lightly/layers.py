"""Finding the feature map and the global pooling of a backbone.

One rule: **the head is trained on exactly the tensor that the global average pooling
consumes at inference.** The layer and the pool are found together, from a dry
forward of the backbone (:func:`lcr_lightly.trace.trace_forward`):

1. The *global average pool* is a module call that reduces a spatial map
   (B, C, H, W), H * W > 1, to (B, C) or (B, C, 1, 1) by its spatial mean (checked on
   the values), after which no module receives a spatial map. When modules nest
   (timm's ``SelectAdaptivePool2d`` around ``nn.AdaptiveAvgPool2d``, a classifier head
   whose ``fc`` is ``Identity``) the innermost is taken: the module that computes the
   average, so a classifier added later is never replaced.
2. The *feature layer* is the module whose output **is** the pool's input (the same
   tensor object, not modified in place since). When nested modules return that same
   tensor (a stage, its last block, an in-place activation, an ``Identity`` after it)
   the outermost is taken (ties: the first to return it), e.g. ``layer4`` rather than
   ``layer4.1``; it must run once per forward.

For timm models this is the contract of ``forward_features`` / ``forward_head``: the
layer returns what ``forward_features`` returns and the pool is the average pooling
inside ``forward_head``. ViTs pool tokens functionally; for them the map is the patch
tokens of the last block that reaches the loss (:func:`find_token_layer`) and there is
no pool module to replace.

Backbones that pool functionally (``x.mean((2, 3))``, ``F.adaptive_avg_pool2d``), whose
last map is already 1x1, or that pool by max (timm ``global_pool="max"``, ``"avgmax"``,
``"catavgmax"``) are refused with a message that lists the candidate maps. A pool that
averages a channels-last map (B, H, W, C) over (H, W) — timm's Swin and other NHWC
models pool with ``input_fmt="NHWC"`` — is global average pooling too: the map is then
read through :func:`channels_last_to_map`.

This module is the rule on one recorded forward; :mod:`lcr_lightly.resolve` runs the dry
forward and turns the result into hooked sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lcr_lightly.capture import Reshape
from lcr_lightly.tokens import TokenLayer
from lcr_lightly.trace import ModuleCall, Trace

LayerSpec = Union[str, nn.Module, None]

# How a feature map is laid out: channels first, channels last (Swin), ViT tokens.
LAYOUTS = ("NCHW", "NHWC", "tokens")


def has_conv(module: nn.Module) -> bool:
    """Whether a module contains an ``nn.Conv2d``."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def channels_last_to_map(features: Tensor) -> Tensor:
    """A channels-last map (B, H, W, C) as (B, C, H, W) (a view, no copy)."""
    return features.permute(0, 3, 1, 2)


def _candidates(root: nn.Module) -> Iterator[str]:
    for name, module in root.named_modules():
        if name and has_conv(module):
            yield name


def _candidate_text(root: nn.Module, limit: int = 12) -> str:
    names = list(_candidates(root))
    # Prefer the shallow names (stages) over every nested conv.
    names.sort(key=lambda n: n.count("."))  # stable: same-depth names keep module order
    shown = names[:limit]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in shown) + more if shown else "none"


def resolve_layer(root: nn.Module, layer: LayerSpec) -> Tuple[str, nn.Module]:
    """Resolves a layer given by dotted name, by module, or automatically.

    Args:
        root: Module to search (a backbone or a whole model).
        layer: A dotted name relative to ``root`` (``"layer4"``, ``"backbone.7"``) or
            the module (automatic discovery: :func:`lcr_lightly.resolve.find_feature_path`).

    Returns:
        The dotted name and the module.

    Raises:
        ValueError: If the name does not exist or the module is not part of ``root``;
            the message lists the candidate layers.
    """
    if isinstance(layer, nn.Module):
        for name, module in root.named_modules():
            if module is layer:
                return name, module
        raise ValueError(
            f"The given layer module ({type(layer).__name__}) is not part of "
            f"{type(root).__name__}. Candidates: {_candidate_text(root)}."
        )
    if isinstance(layer, str):
        modules = dict(root.named_modules())
        if layer not in modules:
            raise ValueError(
                f"No layer named {layer!r} in {type(root).__name__}. "
                f"Candidates: {_candidate_text(root)}."
            )
        return layer, modules[layer]
    raise TypeError(f"layer must be a dotted name or an nn.Module, not {type(layer)}.")


@dataclass(frozen=True)
class FeaturePath:
    """Where LCR reads a backbone: the feature layer and the pool that consumes it.

    Attributes:
        layer_name: Dotted name of the feature layer inside the traced backbone.
        layer: The feature layer.
        pool_name: Dotted name of the global average pool, or None (none replaceable).
        pool: The pool module, or None.
        in_channels: Channels C of the feature map.
        map_shape: Shape (B, C, H, W) of the map in the dry forward.
        layout: How the layer returns the map: ``"NCHW"``, ``"NHWC"`` (channels last)
            or ``"tokens"`` (ViT).
        reshape: Turns the layer's output into a (B, C, H, W) map (None for NCHW).
    """

    layer_name: str
    layer: nn.Module
    pool_name: Optional[str]
    pool: Optional[nn.Module]
    in_channels: int
    map_shape: Tuple[int, ...]
    layout: str = "NCHW"
    reshape: Optional[Reshape] = None


def _spatial(t: Optional[Tensor]) -> bool:
    return t is not None and t.dim() == 4 and t.shape[2] * t.shape[3] > 1


def _reduces_space(call: ModuleCall) -> bool:
    """Whether a call maps a spatial map (B, C, H, W) to (B, D) or (B, D, 1, 1)."""
    x, y = call.input, call.output
    if not _spatial(x) or y is None or y.shape[:1] != x.shape[:1]:  # type: ignore[union-attr]
        return False
    return y.dim() == 2 or (y.dim() == 4 and y.shape[2] == y.shape[3] == 1)


def _average_layout(call: ModuleCall) -> Optional[str]:
    """``"NCHW"`` or ``"NHWC"`` when a space-reducing call returns the spatial mean, else None.

    The mean is taken over (H, W) of a channels-first map, then of a channels-last one.
    Every channel must match within a tolerance relative to the largest channel mean,
    so that the decision does not depend on the scale of the features; the tolerance is
    0.1 %, or the output dtype's resolution where that is coarser (a bfloat16 pool
    rounds the mean by up to 0.4 %).
    """
    assert call.input is not None and call.output is not None
    if call.input.is_meta:  # no values to compare (a backbone built on the meta device)
        return None
    x, y = call.input.float(), call.output.float()
    tol = max(1e-3, torch.finfo(call.output.dtype).eps)
    for layout, dims in (("NCHW", (2, 3)), ("NHWC", (1, 2))):
        mean = x.mean(dim=dims)
        if y.numel() == mean.numel():
            if float((y.reshape(mean.shape) - mean).abs().max()) <= tol * float(mean.abs().max()):
                return layout
    return None


def _global_pools(trace: Trace) -> List[ModuleCall]:
    """Space-reducing calls after whose return no module receives a spatial map.

    Calls that receive the images themselves (the root, a wrapper around the whole
    network) reduce space too but are whole networks, not pools.
    """
    reducing = [c for c in trace.calls if _reduces_space(c) and c.input is not trace.images]
    return [
        c for c in reducing if not any(o.start > c.end and _spatial(o.input) for o in trace.calls)
    ]


def _shape(t: Optional[Tensor]) -> str:
    return str(tuple(t.shape)) if t is not None else "?"


def _map_candidates(trace: Trace, limit: int = 8) -> str:
    """The last spatial maps of the dry forward (2+ positions), outermost producer of each."""
    seen: List[Tuple[int, ModuleCall]] = []
    for call in sorted(trace.calls, key=lambda c: c.end):
        out = call.output
        if call.name and out is not None and _spatial(out):
            for i, (tid, best) in enumerate(seen):
                if tid == id(out):
                    if call.depth < best.depth:
                        seen[i] = (tid, call)
                    break
            else:
                seen.append((id(out), call))
    shown = [f"{c.name!r} {_shape(c.output)}" for _, c in seen[-limit:]]
    return ", ".join(reversed(shown)) if shown else "no module returns a map of 2+ positions"


def _dry_size(trace: Trace) -> str:
    return "x".join(str(s) for s in trace.input_shape[-2:])


def _single_call(trace: Trace, module: nn.Module, name: str, root: nn.Module) -> ModuleCall:
    calls = trace.calls_of(module)
    if not calls:
        raise ValueError(
            f"{name!r} does not run in a forward of {type(root).__name__} (dry forward at "
            f"{_dry_size(trace)} px). Maps that do: {_map_candidates(trace)}."
        )
    if len(calls) > 1:
        raise ValueError(
            f"{name!r} runs {len(calls)} times in one forward of {type(root).__name__}; "
            "its hook would see several different tensors. Choose a module that runs once: "
            f"{_map_candidates(trace)}."
        )
    return calls[0]


def _refuse_no_pool(root: nn.Module, trace: Trace, pools: List[ModuleCall]) -> ValueError:
    size = _dry_size(trace)
    if pools:  # spatial reduction exists, but not by averaging
        last = max(pools, key=lambda c: c.start)
        return ValueError(
            f"The global pooling of {type(root).__name__}, {last.name!r} "
            f"({type(last.module).__name__}), maps {_shape(last.input)} to "
            f"{_shape(last.output)} but is not average pooling (max, avg+max or "
            "concatenated avg/max pooling: its output is neither the channels-first nor "
            "the channels-last spatial mean). Rationale pooling replaces global average "
            "pooling only; build the backbone with average pooling (timm: "
            "global_pool='avg')."
        )
    return ValueError(
        f"{type(root).__name__} has no global average pooling module (dry forward at "
        f"{size} px): it pools functionally (x.mean((2, 3)), F.adaptive_avg_pool2d) or its "
        "last map is already 1x1, so the head could not be trained on the map that is "
        "pooled at inference. Pass layer=<dotted name> to train on one of these maps "
        f"(set_pooling('rationale') is then unavailable; pool with "
        f"common_rationale.head.pool(map) yourself): {_map_candidates(trace)}."
    )


def _pool_of(pools: List[ModuleCall]) -> Tuple[Optional[ModuleCall], str]:
    """The last averaging pool among ``pools`` and the layout it averages."""
    for call in sorted(pools, key=lambda c: c.start, reverse=True):
        layout = _average_layout(call)
        if layout is not None:
            return call, layout
    return None, "NCHW"


def _explicit_pool(root: nn.Module, trace: Trace, pool: Tuple[str, nn.Module]) -> ModuleCall:
    """The one call of a ``pool=`` given by the user, which must reduce the map to a vector.

    Rationale pooling returns one vector per image in its place, so a pool that keeps a
    spatial output would break the model's forward at inference.
    """
    call = _single_call(trace, pool[1], pool[0], root)
    if not _reduces_space(call):
        raise ValueError(
            f"The pool {pool[0]!r} maps {_shape(call.input)} to {_shape(call.output)}; "
            "pool= must be the global pooling that turns the feature map into one vector "
            "per image, (B, C) or (B, C, 1, 1)."
        )
    return call


def _producer(root: nn.Module, trace: Trace, pool: ModuleCall) -> ModuleCall:
    assert pool.input is not None
    producers = [
        c
        for c in trace.producers(pool.input, pool.input_version)
        if c.name and len(trace.calls_of(c.module)) == 1
    ]
    if not producers:
        raise ValueError(
            f"The input of the global pool {pool.name!r} of {type(root).__name__} "
            f"{_shape(pool.input)} is not the output of a module (it is computed "
            "functionally, e.g. F.relu(self.features(x)), or by a module that runs several "
            "times), so no hook can capture it. Pass layer=<dotted name> of the module "
            f"that returns it; maps: {_map_candidates(trace)}."
        )
    return min(producers, key=lambda c: (c.depth, c.end))


def _reshape_for(layout: str, tokens: Optional[TokenLayer]) -> Optional[Reshape]:
    if layout == "NHWC":
        return channels_last_to_map
    if layout == "tokens" and tokens is not None:
        return tokens.reshape
    return None


def feature_path(
    root: nn.Module,
    trace: Trace,
    layer: Optional[Tuple[str, nn.Module]] = None,
    pool: Optional[Tuple[str, nn.Module]] = None,
    reshape: Optional[Reshape] = None,
    tokens: Optional[TokenLayer] = None,
) -> FeaturePath:
    """Applies the rule to one dry forward of ``root``: the feature layer and its pool.

    With neither ``layer`` nor ``pool``, both follow the module rule above (ViTs: the
    ``tokens`` block, no pool). With ``pool`` only, the layer is the module that returns
    the pool's input. With ``layer``, the pool is the global average pool that consumes
    exactly its output, or None when there is none (the head still trains; rationale
    pooling is then unavailable). Channels and the map shape come from the trace.

    Args:
        root: The traced backbone (for messages).
        trace: Its dry forward (:func:`lcr_lightly.trace.trace_forward`).
        layer: None, or the feature layer as ``(dotted name, module)``.
        pool: None, or the global pooling as ``(dotted name, module)``.
        reshape: Turns the layer's output into (B, C, H, W) when it is not a map and
            ``root`` is not a recognised ViT.
        tokens: The ViT block of :func:`lcr_lightly.tokens.find_token_layer`, or None.

    Returns:
        The :class:`FeaturePath`.

    Raises:
        ValueError: When no layer/pool pair exists (functional or max pooling, 1x1 map),
            or an explicit pool does not consume the explicit layer's output; the
            message lists the candidate maps.
    """
    pools = _global_pools(trace)
    pool_call: Optional[ModuleCall] = None
    if layer is None and pool is None and tokens is not None:
        layer_call, layout = _single_call(trace, tokens.module, tokens.name, root), "tokens"
    elif layer is None and pool is None:
        pool_call, layout = _pool_of(pools)
        if pool_call is None:
            raise _refuse_no_pool(root, trace, pools)
        _single_call(trace, pool_call.module, pool_call.name, root)
        layer_call = _producer(root, trace, pool_call)
    elif layer is None:
        assert pool is not None
        pool_call = _explicit_pool(root, trace, pool)
        layout = _average_layout(pool_call) or "NCHW"
        layer_call = _producer(root, trace, pool_call)
    else:
        layer_call = _single_call(trace, layer[1], layer[0], root)
        out, version = layer_call.output, layer_call.output_version
        if pool is not None:
            pool_call = _explicit_pool(root, trace, pool)
            if pool_call.input is not out or pool_call.input_version != version:
                raise ValueError(
                    f"The pool {pool[0]!r} consumes {_shape(pool_call.input)}, not the "
                    f"output of layer {layer[0]!r}: the head would be trained on one "
                    "map and weight another at inference. Pass only one of layer= and "
                    "pool=, or a matching pair."
                )
            layout = _average_layout(pool_call) or "NCHW"
        else:
            consuming = [c for c in pools if c.input is out and c.input_version == version]
            pool_call, layout = _pool_of(consuming)
        if out is not None and out.dim() == 3 and tokens is not None:
            layout = "tokens"
    if layer_call.output is None:
        raise ValueError(f"Layer {layer_call.name!r} returns no tensor.")
    reshape = reshape or _reshape_for(layout, tokens)
    output = layer_call.output
    fmap = reshape(output) if reshape is not None else output
    if fmap.dim() != 4:
        raise ValueError(
            f"Layer {layer_call.name!r} of {type(root).__name__} returns shape "
            f"{tuple(output.shape)}; LCR needs a (B, C, H, W) map. Choose a convolutional "
            "stage, or pass reshape= for token outputs of a backbone that is not a "
            "recognised ViT."
        )
    return FeaturePath(
        layer_name=layer_call.name,
        layer=layer_call.module,
        pool_name=pool_call.name if pool_call is not None else None,
        pool=pool_call.module if pool_call is not None else None,
        in_channels=int(fmap.shape[1]),
        map_shape=tuple(fmap.shape),
        layout=layout,
        reshape=reshape,
    )
