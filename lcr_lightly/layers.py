"""Finding the feature map and the global pooling of a backbone.

One rule: **the head is trained on exactly the tensor that the global average pooling
consumes at inference.** The layer and the pool are found together, from a dry
forward of the backbone (:func:`lcr_lightly.tracing.trace_forward`):

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
``"catavgmax"``) are refused with a message that lists the candidate maps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lcr_lightly.capture import Reshape
from lcr_lightly.tokens import find_token_layer, tokens_to_map
from lcr_lightly.tracing import ModuleCall, Trace, trace_forward

LayerSpec = Union[str, nn.Module, None]


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _candidates(root: nn.Module) -> Iterator[str]:
    for name, module in root.named_modules():
        if name and _has_conv(module):
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
        layer: ``None`` for automatic discovery (:func:`find_feature_layer`), a dotted
            name relative to ``root`` (``"layer4"``, ``"backbone.7"``) or the module.

    Returns:
        The dotted name and the module.

    Raises:
        ValueError: If the name does not exist or the module is not part of ``root``;
            the message lists the candidate layers.
    """
    if layer is None:
        return find_feature_layer(root)
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
    raise TypeError(f"layer must be None, a dotted name or an nn.Module, not {type(layer)}.")


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
        num_prefix_tokens: For token outputs (ViT): prefix tokens dropped by the
            reshape to a map; None for convolutional maps.
    """

    layer_name: str
    layer: nn.Module
    pool_name: Optional[str]
    pool: Optional[nn.Module]
    in_channels: int
    map_shape: Tuple[int, ...]
    num_prefix_tokens: Optional[int] = None

    @property
    def reshape(self) -> Optional[Reshape]:
        """The token-to-map reshape for ViT layers, None for convolutional maps."""
        if self.num_prefix_tokens is None:
            return None
        return functools.partial(tokens_to_map, num_prefix_tokens=self.num_prefix_tokens)


def _spatial(t: Optional[Tensor]) -> bool:
    return t is not None and t.dim() == 4 and t.shape[2] * t.shape[3] > 1


def _reduces_space(call: ModuleCall) -> bool:
    """Whether a call maps a spatial map (B, C, H, W) to (B, D) or (B, D, 1, 1)."""
    x, y = call.input, call.output
    if not _spatial(x) or y is None or y.shape[:1] != x.shape[:1]:  # type: ignore[union-attr]
        return False
    return y.dim() == 2 or (y.dim() == 4 and y.shape[2] == y.shape[3] == 1)


def _is_average(call: ModuleCall) -> bool:
    """Whether a space-reducing call returns the spatial mean of its input (same C).

    Every channel must match within a tolerance relative to the largest channel mean,
    so that the decision does not depend on the scale of the features; the tolerance is
    0.1 %, or the output dtype's resolution where that is coarser (a bfloat16 pool
    rounds the mean by up to 0.4 %).
    """
    assert call.input is not None and call.output is not None
    x, y = call.input.float(), call.output.float()
    if y.numel() != x.shape[0] * x.shape[1]:
        return False
    mean = x.mean(dim=(2, 3))
    tol = max(1e-3, torch.finfo(call.output.dtype).eps)
    return float((y.reshape(mean.shape) - mean).abs().max()) <= tol * float(mean.abs().max())


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
            "concatenated avg/max pooling). Rationale pooling replaces global average "
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


def _pool_of(pools: List[ModuleCall]) -> Optional[ModuleCall]:
    averages = [c for c in pools if _is_average(c)]
    return max(averages, key=lambda c: c.start) if averages else None


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


def _map_of(
    output: Tensor, name: str, root: nn.Module, reshape: Optional[Reshape]
) -> Tuple[Tuple[int, ...], Optional[int]]:
    """The map shape a layer output gives, and the prefix tokens of a ViT reshape."""
    prefix: Optional[int] = None
    if reshape is not None:
        fmap = reshape(output)
    elif output.dim() == 3 and find_token_layer(root) is not None:
        prefix = find_token_layer(root)[3]  # type: ignore[index]
        fmap = tokens_to_map(output, prefix)
    else:
        fmap = output
    if fmap.dim() != 4:
        raise ValueError(
            f"Layer {name!r} of {type(root).__name__} returns shape {tuple(output.shape)}; "
            "LCR needs a (B, C, H, W) map. Choose a convolutional stage, or pass reshape= "
            "for token outputs of a backbone that is not a recognised ViT."
        )
    return tuple(fmap.shape), prefix


def find_feature_path(
    root: nn.Module,
    layer: LayerSpec = None,
    pool: LayerSpec = None,
    reshape: Optional[Reshape] = None,
    trace: Optional[Trace] = None,
) -> FeaturePath:
    """Finds the feature layer and the global average pool of a backbone together.

    With neither ``layer`` nor ``pool``, both follow the module rule above (ViTs: the
    token layer of :func:`find_token_layer`, no pool). With ``pool`` only, the layer is
    the module that returns the pool's input. With ``layer``, the pool is the global
    average pool that consumes exactly its output, or None when there is none (the head
    still trains; rationale pooling is then unavailable). Channels, the map shape and
    the ViT token reshape always come from the dry forward.

    Args:
        root: The backbone (its ``forward`` takes an image batch).
        layer: None, or the feature layer as dotted name in ``root`` or module.
        pool: None, or the global pooling as dotted name in ``root`` or module.
        reshape: Callable turning the layer output into (B, C, H, W), when it is not a
            map and ``root`` is not a recognised ViT.
        trace: A dry forward of ``root`` to reuse; made here when None.

    Returns:
        The :class:`FeaturePath`.

    Raises:
        ValueError: When no layer/pool pair exists (functional or max pooling, 1x1 map),
            for a bad name, or when an explicit pool does not consume the explicit
            layer's output; the message lists the candidate maps.
        RuntimeError: If the dry forward fails.
    """
    layer_ref = resolve_layer(root, layer) if layer is not None else None
    pool_ref = resolve_layer(root, pool) if pool is not None else None
    if trace is None:
        trace = trace_forward(root)
    pools = _global_pools(trace)
    pool_call: Optional[ModuleCall]
    if layer_ref is None and pool_ref is None:
        tokens = find_token_layer(root)
        if tokens is not None:
            pool_call = None
            layer_call = _single_call(trace, tokens[1], tokens[0], root)
        else:
            pool_call = _pool_of(pools)
            if pool_call is None:
                raise _refuse_no_pool(root, trace, pools)
            _single_call(trace, pool_call.module, pool_call.name, root)
            layer_call = _producer(root, trace, pool_call)
    elif layer_ref is None:
        assert pool_ref is not None
        pool_call = _single_call(trace, pool_ref[1], pool_ref[0], root)
        layer_call = _producer(root, trace, pool_call)
    else:
        layer_call = _single_call(trace, layer_ref[1], layer_ref[0], root)
        if pool_ref is not None:
            pool_call = _single_call(trace, pool_ref[1], pool_ref[0], root)
            if (
                pool_call.input is not layer_call.output
                or pool_call.input_version != layer_call.output_version
            ):
                raise ValueError(
                    f"The pool {pool_ref[0]!r} consumes {_shape(pool_call.input)}, not the "
                    f"output of layer {layer_ref[0]!r}: the head would be trained on one "
                    "map and weight another at inference. Pass only one of layer= and "
                    "pool=, or a matching pair."
                )
        else:
            out = layer_call.output
            consuming = [
                c
                for c in pools
                if out is not None
                and c.input is out
                and c.input_version == layer_call.output_version
            ]
            pool_call = _pool_of(consuming)
    if layer_call.output is None:
        raise ValueError(f"Layer {layer_call.name!r} returns no tensor.")
    map_shape, prefix = _map_of(layer_call.output, layer_call.name, root, reshape)
    return FeaturePath(
        layer_name=layer_call.name,
        layer=layer_call.module,
        pool_name=pool_call.name if pool_call is not None else None,
        pool=pool_call.module if pool_call is not None else None,
        in_channels=int(map_shape[1]),
        map_shape=map_shape,
        num_prefix_tokens=prefix,
    )


def find_feature_layer(backbone: nn.Module) -> Tuple[str, nn.Module]:
    """Finds the feature layer of a backbone (see :func:`find_feature_path`).

    Args:
        backbone: The backbone module.

    Returns:
        The dotted name of the layer inside ``backbone`` and the layer module.

    Raises:
        ValueError: If the backbone has no map that a global average pool consumes.
    """
    path = find_feature_path(backbone)
    return path.layer_name, path.layer


def find_global_pool(root: nn.Module, layer: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """Finds the global average pool that consumes exactly the output of ``layer``.

    Args:
        root: The backbone that contains ``layer``.
        layer: The feature layer.

    Returns:
        ``(name, module)`` or ``None`` when nothing consumes the layer's output by
        global average pooling (the backbone pools functionally).
    """
    path = find_feature_path(root, layer=layer)
    if path.pool is None or path.pool_name is None:
        return None
    return path.pool_name, path.pool
