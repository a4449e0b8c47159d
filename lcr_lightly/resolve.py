"""Where LCR hooks a model: the one resolver behind ``attach`` and ``with_common_rationale``.

:func:`resolve` answers, once, for a backbone (``attach``) or a whole SSL model
(``with_common_rationale``): which layer returns the feature map F, which global average
pool consumes it, in which layout, and — for a model — the same layer and pool in every
momentum/teacher copy of the online encoder (:mod:`lcr_lightly.encoders`). It runs the
dry forward (:mod:`lcr_lightly.trace`) at the size the backbone declares, applies the
rule of :mod:`lcr_lightly.layers` to it and returns a :class:`Resolution`: the public
description of what is hooked, which :class:`~lcr_lightly.CommonRationale` keeps as
``sites``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from torch import nn

from lcr_lightly.capture import Reshape
from lcr_lightly.encoders import encoder_group
from lcr_lightly.layers import FeaturePath, LayerSpec, feature_path, resolve_layer
from lcr_lightly.tokens import find_token_layer
from lcr_lightly.trace import DryForwardError, dry_sizes, trace_forward


@dataclass(frozen=True)
class FeatureSite:
    """One encoder's feature layer and pool, as hooked by LCR.

    Attributes:
        layer_name: Dotted name of the feature layer (relative to the resolved model or
            backbone).
        layer: The feature layer.
        pool_name: Dotted name of its global average pool, or None.
        pool: The pool, or None.
        online: Whether this encoder may be the online one: its maps are captured (until
            the first training step decides, when several may).
        encoder: The model's child holding the site (``""`` for a backbone given to
            ``attach``).
    """

    layer_name: str
    layer: nn.Module
    pool_name: Optional[str] = None
    pool: Optional[nn.Module] = None
    online: bool = False
    encoder: str = ""


@dataclass(frozen=True)
class Resolution:
    """What LCR hooks in a model or backbone.

    Attributes:
        sites: The online encoder's site first (the traced one), then its
            momentum/teacher copies in registration order.
        in_channels: Channels C of the feature map.
        map_shape: Shape (B, C, H, W) of the map in the dry forward.
        layout: ``"NCHW"``, ``"NHWC"`` (channels last) or ``"tokens"`` (ViT).
        reshape: Turns the layer's output into (B, C, H, W) (None for NCHW maps).
    """

    sites: Tuple[FeatureSite, ...]
    in_channels: int
    map_shape: Tuple[int, ...]
    layout: str = "NCHW"
    reshape: Optional[Reshape] = None


def find_feature_path(
    root: nn.Module,
    layer: LayerSpec = None,
    pool: LayerSpec = None,
    reshape: Optional[Reshape] = None,
) -> FeaturePath:
    """Finds the feature layer and the global average pool of a backbone together.

    The dry forward runs at the size the backbone declares (timm ``pretrained_cfg``, a
    patch embedding's ``img_size``), else at 64 px; when the rule refuses at one size
    (a stride-64 network leaves only 1x1 maps at 64 px) the next size is tried; when
    every size refuses, the first refusal is raised.

    Args:
        root: The backbone (its ``forward`` takes an image batch).
        layer: None (the rule of :mod:`lcr_lightly.layers`), or the feature layer as
            dotted name in ``root`` or module.
        pool: None, or the global pooling as dotted name in ``root`` or module.
        reshape: Callable turning the layer output into (B, C, H, W), when it is not a
            map and ``root`` is not a recognised ViT.

    Returns:
        The :class:`~lcr_lightly.layers.FeaturePath`.

    Raises:
        ValueError: When no layer/pool pair exists (functional or max pooling, 1x1 map),
            for a bad name, or when an explicit pool does not consume the explicit
            layer's output; the message lists the candidate maps.
        DryForwardError: If the dry forward fails at every size.
    """
    layer_ref = resolve_layer(root, layer) if layer is not None else None
    pool_ref = resolve_layer(root, pool) if pool is not None else None
    tokens = find_token_layer(root)
    remaining = list(dry_sizes(root))
    refusal: Optional[ValueError] = None
    while remaining:
        try:
            trace = trace_forward(root, remaining)
        except DryForwardError:
            if refusal is not None:
                raise refusal from None
            raise
        ran = (int(trace.input_shape[-2]), int(trace.input_shape[-1]))
        remaining = remaining[remaining.index(ran) + 1 :]
        try:
            return feature_path(root, trace, layer_ref, pool_ref, reshape, tokens)
        except ValueError as err:
            refusal = refusal or err
    assert refusal is not None
    raise refusal


def find_feature_layer(backbone: nn.Module) -> Tuple[str, nn.Module]:
    """The feature layer of a backbone (see :func:`find_feature_path`).

    Args:
        backbone: The backbone module.

    Returns:
        The dotted name of the layer inside ``backbone`` and the layer module.

    Raises:
        ValueError: If the backbone has no map that a global average pool consumes.
    """
    path = find_feature_path(backbone)
    return path.layer_name, path.layer


def _backbone_path(
    root: nn.Module,
    layer: LayerSpec,
    pool: LayerSpec,
    reshape: Optional[Reshape],
    in_channels: Optional[int],
    prefix: str,
) -> FeaturePath:
    """:func:`find_feature_path`, with the channels checked against ``in_channels``.

    When the dry forward cannot run (a backbone whose ``forward`` does not take an image
    batch) an explicit ``layer`` and ``in_channels`` are enough: no pool is inferred then.
    """
    try:
        path = find_feature_path(root, layer=layer, pool=pool, reshape=reshape)
    except DryForwardError:
        if layer is None or in_channels is None:
            raise
        layer_name, layer_module = resolve_layer(root, layer)
        pool_name, pool_module = resolve_layer(root, pool) if pool is not None else (None, None)
        return FeaturePath(layer_name, layer_module, pool_name, pool_module, in_channels, ())
    if in_channels is not None and in_channels != path.in_channels:
        raise ValueError(
            f"in_channels={in_channels}, but layer "
            f"{_dotted(prefix, path.layer_name)!r} gives maps of shape "
            f"{path.map_shape}: {path.in_channels} channels. Leave in_channels out (it is "
            "read off the dry forward) or pass the right layer=."
        )
    return path


def _dotted(prefix: str, inner: str) -> str:
    return f"{prefix}.{inner}" if prefix and inner else prefix or inner


def _online_child(model: nn.Module, layer: LayerSpec, pool: LayerSpec) -> Optional[str]:
    """The child holding an explicit ``layer=``/``pool=`` (both must be in it), or None."""
    names = [resolve_layer(model, spec)[0] for spec in (layer, pool) if spec is not None]
    if not names:
        return None
    if not all(names):
        raise ValueError(f"layer=/pool= must name a module inside {type(model).__name__}.")
    child = names[0].split(".")[0]
    if any(name.split(".")[0] != child for name in names):
        raise ValueError(f"layer= and pool= must be in the same encoder ({child!r}).")
    return child


def _module(model: nn.Module, spec: LayerSpec) -> Optional[nn.Module]:
    """An explicit spec (names are relative to the model) as the module it names."""
    return None if spec is None else resolve_layer(model, spec)[1]


def resolve(
    root: nn.Module,
    layer: LayerSpec = None,
    pool: LayerSpec = None,
    in_channels: Optional[int] = None,
    reshape: Optional[Reshape] = None,
    model: bool = False,
    exclude: Tuple[str, ...] = (),
) -> Resolution:
    """Resolves where LCR hooks a backbone (``model=False``) or an SSL model.

    For a model, the online encoder's group is found among its children
    (:func:`lcr_lightly.encoders.encoder_group`; with ``layer``/``pool`` the encoder
    holding them is the online one), its first member is traced, and the layer and pool
    at the same dotted names in the other members are its copies.

    Args:
        root: The backbone, or the SSL model when ``model`` is True.
        layer: The feature layer: None (automatic), dotted name relative to ``root``, or
            module.
        pool: The global pooling to replace at inference: None (the average pool that
            consumes the layer's output), dotted name or module.
        in_channels: Channels of the map, checked against the dry forward (needed only
            when the dry forward cannot run).
        reshape: Turns the layer's output into (B, C, H, W) (inferred for ViTs and
            channels-last maps).
        model: Whether ``root`` is a model with several encoders.
        exclude: Children of a model to skip (LCR's own submodule).

    Returns:
        The :class:`Resolution`.

    Raises:
        ValueError: For a bad layer name, a backbone with no map that a global average
            pool consumes (the message lists the candidates), or ``in_channels`` that
            disagree with the map.
    """
    if not model:
        path = _backbone_path(root, layer, pool, reshape, in_channels, "")
        online = FeatureSite(path.layer_name, path.layer, path.pool_name, path.pool, True)
        return Resolution((online,), path.in_channels, path.map_shape, path.layout, path.reshape)
    explicit = _online_child(root, layer, pool)
    group = encoder_group(root, primary=explicit, exclude=exclude)
    online_names = (explicit,) if explicit is not None else group.online
    children = dict(root.named_children())
    primary = explicit or group.online[0]
    path = _backbone_path(
        children[primary],
        _module(root, layer),
        _module(root, pool),
        reshape,
        in_channels,
        primary,
    )
    sites: List[FeatureSite] = []
    for member in [primary] + [m for m in group.members if m != primary]:
        modules = dict(children[member].named_modules())
        copy_layer = modules.get(path.layer_name)
        copy_pool = modules.get(path.pool_name) if path.pool_name is not None else None
        if copy_layer is None or type(copy_layer) is not type(path.layer):
            continue
        sites.append(
            FeatureSite(
                _dotted(member, path.layer_name),
                path.layer if member == primary else copy_layer,
                _dotted(member, path.pool_name or "") if copy_pool is not None else None,
                copy_pool,
                member in online_names,
                member,
            )
        )
    return Resolution(tuple(sites), path.in_channels, path.map_shape, path.layout, path.reshape)
