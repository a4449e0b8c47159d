"""export_embedder: a (wrapped) model's embedding as a hook-free module, checked on a batch."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_choice
from lcr_lightly.capture import FeatureCapture
from lcr_lightly.encoders import encoders
from lcr_lightly.export.cut import cut_after, layer_output
from lcr_lightly.export.errors import ExportError
from lcr_lightly.export.modules import Embedder, EmbedderInfo, RationalePool
from lcr_lightly.hooks import remove_hooks
from lcr_lightly.inference import POOLING_MODES
from lcr_lightly.rationale import SUBMODULE, CommonRationale
from lcr_lightly.trace import Size, dry_input, dry_sizes, size_text


def export_embedder(
    model: nn.Module,
    pooling: str = "rationale",
    normalize: bool = True,
    rationale: Optional[CommonRationale] = None,
    input_size: Union[int, Size, None] = None,
) -> Embedder:
    """Builds a hook-free module computing the embedding of a (wrapped) model.

    Args:
        model: A model wrapped with :func:`~lcr_lightly.with_common_rationale` (or an
            unwrapped SSL model or a plain backbone, ``pooling="gap"`` only), or a
            backbone that :func:`~lcr_lightly.attach` returned ``rationale`` for.
        pooling: ``"rationale"`` or ``"gap"``.
        normalize: L2-normalise the embedding.
        rationale: The :class:`~lcr_lightly.CommonRationale` of a backbone given to
            :func:`~lcr_lightly.attach` (the functional API).
        input_size: Side, or (H, W), of the example batch the export is checked on; the
            size the model declares, else 64 px (then 224 px if that fails), when None.

    Returns:
        The :class:`Embedder` in eval mode (the model itself is left unchanged; nothing
        in the result refers to it).

    Raises:
        ExportError: If the model has no rationale pooling to export, ``forward`` runs
            no (or several) encoders, or the result would differ from ``model(x)``.
    """
    check_choice("pooling", pooling, POOLING_MODES)
    lcr = rationale if rationale is not None else CommonRationale.find(model)
    if lcr is None and pooling == "rationale":
        raise ExportError(
            f"{type(model).__name__} is not wrapped with with_common_rationale: only "
            "pooling='gap' can be exported (pass rationale=<CommonRationale> for a backbone "
            "given to attach)."
        )
    sizes = [input_size] if input_size else list(dry_sizes(model))
    errors: List[str] = []
    for size in sizes:
        example = dry_input(model, size)
        try:
            with torch.no_grad():
                # an SSL model (it has a training step) runs one of its encoders; a
                # backbone (attach's, or a plain one exported with GAP) is the encoder
                ssl_model = callable(getattr(model, "training_step", None))
                whole = rationale is not None or not ssl_model
                name = "" if whole else _evaluated_encoder(model, example)
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure: try the next size
            errors.append(f"{size_text(size)} px: {type(err).__name__}: {err}")
            continue
        return _build(model, lcr, name, pooling, normalize, example)
    raise ExportError(f"model(x) failed on an example batch: {'; '.join(errors)}")


def _evaluated_encoder(model: nn.Module, example: Tensor) -> str:
    """The child encoder that ``model(x)`` runs in eval mode (``""``: the model itself)."""
    candidates = encoders(model, exclude=(SUBMODULE,))
    if not candidates:
        return ""
    ran: List[str] = []
    handles = [
        child.register_forward_pre_hook(lambda m, a, n=name: ran.append(n))
        for name, child in candidates
    ]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    names = list(dict.fromkeys(ran))
    if len(names) != 1:
        found = ", ".join(repr(n) for n in names) or "none"
        raise ExportError(
            f"{type(model).__name__}(x) runs {len(names)} of its encoders in eval mode "
            f"({found}); an embedder exports one. Export that encoder's backbone with "
            "attach's rationale= instead."
        )
    return names[0]


def _inside(encoder: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    """The dotted name of ``module`` inside ``encoder``, or None."""
    if module is None:
        return None
    for name, sub in encoder.named_modules():
        if sub is module:
            return name
    return None


def _site_in(lcr: CommonRationale, encoder: nn.Module) -> Tuple[str, Optional[str]]:
    """The feature layer and pool (names inside ``encoder``) of the LCR site in it."""
    for site in lcr.sites:
        layer = _inside(encoder, site.layer)
        if layer is not None:
            return layer, _inside(encoder, site.pool)
    raise ExportError(
        "the encoder that model(x) runs holds none of the layers LCR hooks "
        f"({', '.join(s.layer_name for s in lcr.sites)}); its features are not the ones "
        "the head was trained for."
    )


def _keeps_dims(pool: nn.Module, channels: int, example: Tensor) -> bool:
    with torch.no_grad():
        probe = example.new_zeros(1, channels, 2, 2)
        return pool(probe).dim() == 4


def _build(
    model: nn.Module,
    lcr: Optional[CommonRationale],
    name: str,
    pooling: str,
    normalize: bool,
    example: Tensor,
) -> Embedder:
    source = model.get_submodule(name) if name else model
    encoder = copy.deepcopy(source)
    remove_hooks(encoder)  # the copied hooks are dead; drop them
    encoder.eval()
    prefix = f"{name}." if name else ""
    layer: Optional[str] = None
    pool_name: Optional[str] = None
    features: nn.Module = encoder
    pool: Optional[nn.Module] = None
    if lcr is not None:
        layer, pool_name = _site_in(lcr, source)
        if pooling == "rationale" and pool_name is not None:
            original = encoder.get_submodule(pool_name)
            head = copy.deepcopy(lcr.head).eval()
            keep = _keeps_dims(original, head.in_channels, example)
            parent, _, attr = pool_name.rpartition(".")
            setattr(encoder.get_submodule(parent), attr, RationalePool(head, keep, lcr.reshape))
        elif pooling == "rationale":
            features = layer_output(cut_after(encoder, layer), lcr.reshape, example)
            pool = RationalePool(copy.deepcopy(lcr.head).eval(), keepdim=False)
    embedder = Embedder(
        features,
        pool,
        normalize,
        EmbedderInfo(
            encoder=name,
            layer=prefix + layer if layer is not None else None,
            pool=prefix + pool_name if pooling == "rationale" and pool_name else None,
            pooling=pooling,
            normalize=normalize,
            input_size=(int(example.shape[1]), int(example.shape[2]), int(example.shape[3])),
            out_dim=0,
        ),
    ).eval()
    with torch.no_grad():
        got = embedder(example)
        tap = source.get_submodule(layer) if pool is not None and layer is not None else None
        want = _reference(model, example, pooling, normalize, lcr, tap)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ExportError(
            f"the exported embedder gives {tuple(got.shape)} features that differ from "
            f"{type(model).__name__}(x) {tuple(want.shape)} in eval mode: its forward does "
            "more than evaluate one encoder (e.g. applies a projection head); export its "
            "backbone with attach's rationale= instead."
        )
    embedder.info = EmbedderInfo(**{**asdict(embedder.info), "out_dim": int(got.shape[1])})
    return embedder


def _reference(
    model: nn.Module,
    images: Tensor,
    pooling: str,
    normalize: bool,
    lcr: Optional[CommonRationale],
    tap_layer: Optional[nn.Module],
) -> Tensor:
    """The embedding the library computes with its hooks, to check an export against.

    ``model(images).flatten(1)`` in eval mode with the chosen pooling; for an encoder
    cut after its layer (``tap_layer``: no pool to replace), the head's pooling of the
    map that layer returns while ``model(images)`` runs.
    """
    was_training = model.training
    head_training = lcr.training if lcr is not None else False
    tap: Optional[FeatureCapture] = None
    mode = pooling if tap_layer is None else "gap"
    try:
        model.eval()
        with contextlib.ExitStack() as stack:
            if lcr is not None:
                lcr.eval()  # attach's module is not a submodule of the backbone
                stack.enter_context(lcr.using_pooling(mode))
                if tap_layer is not None:
                    tap = FeatureCapture(
                        tap_layer, reshape=lcr.reshape, training_only=False, require_grad=False
                    )
            out = model(images).flatten(1)
        if tap is not None and lcr is not None:
            out = lcr.head.pool(tap.maps[-1])
    finally:
        if tap is not None:
            tap.release()
        if lcr is not None:
            lcr.train(head_training)
        model.train(was_training)
    return nn.functional.normalize(out, dim=1) if normalize else out
