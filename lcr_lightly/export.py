"""A hook-free embedder for serving: the encoder, the rationale pooling, L2 normalisation.

A wrapped model pools with forward hooks (:class:`~lcr_lightly.pooling.RationalePooling`),
which ``torch.jit.trace``, ``torch.export``, ONNX and ``torch.compile`` do not see or
refuse. :func:`export_embedder` builds a plain module with the same output:

* the encoder that ``model(x)`` evaluates (a deep copy; DINO's teacher, the online
  encoder otherwise), found by one forward of ``model`` in eval mode;
* with a global average pool (convolutional backbones): that pool module replaced, in
  the copy, by :class:`RationalePool` (the head's rationale pooling as a module), so
  every operation of the encoder before and after the pool is kept as it runs;
* without one (ViT token maps, a layer given explicitly): the encoder cut after the
  feature layer by ``torch.fx`` (torchvision's ``create_feature_extractor``, with timm's
  non-traceable modules kept as leaves), the tokens laid out as a map, the head's
  rationale pooling;
* ``flatten(1)`` and optional L2 normalisation.

The result equals ``model(x).flatten(1)`` in eval mode bit for bit in eager mode (the
same operations in the same order); traced, exported, compiled or ONNX versions agree to
float tolerance (kernels and fusion change the summation order). For token maps, where
``model(x)`` does not rationale-pool, it equals the head's pooling of the map tapped at
the feature layer (what :func:`~lcr_lightly.eval.extract_features` reports). The build
checks this on one example batch and refuses a model whose ``forward`` is something else.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_choice
from lcr_lightly.capture import FeatureCapture, Reshape
from lcr_lightly.encoders import encoders
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.hooks import remove_hooks
from lcr_lightly.inference import POOLING_MODES
from lcr_lightly.rationale import CommonRationale
from lcr_lightly.tokens import TokenMap
from lcr_lightly.trace import dry_input, dry_sizes, size_text

SUBMODULE = "common_rationale"


class ExportError(ValueError):
    """A model that cannot be exported as an embedder (message: one line)."""


def require_onnx(name: str) -> Any:
    """Imports ``onnx`` or ``onnxruntime``, or says in one line which extra installs it.

    Raises:
        ExportError: When the package is missing.
    """
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ExportError(
            f"ONNX files need the package {name!r}, from the [onnx] extra: "
            "pip install 'lcr-lightly[onnx]'"
        ) from None


class RationalePool(nn.Module):
    """The head's rationale pooling as a module, in place of a global average pool.

    Args:
        head: The trained :class:`~lcr_lightly.CommonRationaleHead`.
        keepdim: Return (B, C, 1, 1) like ``nn.AdaptiveAvgPool2d`` (else (B, C)).
        reshape: Turns the pool's input into (B, C, H, W) (a channels-last map), or None.
    """

    def __init__(
        self, head: CommonRationaleHead, keepdim: bool, reshape: Optional[Reshape] = None
    ) -> None:
        super().__init__()
        self.head = head
        self.keepdim = keepdim
        self.reshape = reshape

    def forward(self, features: Tensor) -> Tensor:
        """Pools a map (B, C, H, W) into (B, C) or (B, C, 1, 1)."""
        if self.reshape is not None:
            features = self.reshape(features)
        pooled = self.head.pool(features)
        return pooled[:, :, None, None] if self.keepdim else pooled


class LayerOutput(nn.Module):
    """An encoder cut after its feature layer (an fx graph), its output as a map.

    Args:
        graph: ``create_feature_extractor`` output returning ``{"map": layer output}``.
        reshape: Callable turning the layer output into (B, C, H, W) (ViT tokens), or None.
        tokens: ``(prefix tokens, grid side)`` when ``reshape`` is
            :func:`~lcr_lightly.tokens.tokens_to_map`: the same operations with the grid
            side fixed, so that ``torch.jit.trace`` does not see it computed from a shape.
    """

    def __init__(
        self,
        graph: nn.Module,
        reshape: Optional[Callable[[Tensor], Tensor]],
        tokens: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.graph = graph
        self.reshape = reshape
        self.tokens = tokens

    def forward(self, images: Tensor) -> Tensor:
        """The feature map (B, C, H, W) of a batch of images."""
        out = self.graph(images)["map"]
        if self.tokens is not None:
            prefix, side = self.tokens
            patches = out[:, prefix:, :]
            return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
        return self.reshape(out) if self.reshape is not None else out


@dataclass(frozen=True)
class EmbedderInfo:
    """What an :class:`Embedder` computes (printed by ``lcr-lightly export``).

    Attributes:
        encoder: Name of the encoder in the model (``""``: the model itself).
        layer: Dotted name of the feature layer in the model (None: unwrapped model).
        pool: Dotted name of the replaced pool, or None (cut after the layer, or GAP).
        pooling: ``"rationale"`` or ``"gap"``.
        normalize: Whether the output rows are L2-normalised.
        input_size: (C, H, W) of the example batch the export was checked on.
        out_dim: Width D of the embedding.
    """

    encoder: str
    layer: Optional[str]
    pool: Optional[str]
    pooling: str
    normalize: bool
    input_size: Tuple[int, int, int]
    out_dim: int

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict."""
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        return out


class Embedder(nn.Module):
    """A hook-free image embedder: features, optional pooling, flatten, L2 norm.

    Built by :func:`export_embedder`; a plain module that ``torch.jit.trace``,
    ``torch.export.export``, ``torch.compile`` and ``torch.onnx.export`` accept.

    Args:
        features: Images (B, C, H, W) to features (an encoder copy, or a cut encoder).
        pool: Applied to the features when not None (rationale pooling of a cut encoder).
        normalize: L2-normalise the output rows.
        info: What the module computes.
    """

    def __init__(
        self,
        features: nn.Module,
        pool: Optional[nn.Module],
        normalize: bool,
        info: EmbedderInfo,
    ) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.normalize = normalize
        self.info = info

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings (B, D) of images (B, C, H, W)."""
        out = self.features(images)
        if self.pool is not None:
            out = self.pool(out)
        out = out.flatten(1)
        if self.normalize:
            out = nn.functional.normalize(out, dim=1)
        return out


def export_embedder(
    model: nn.Module,
    pooling: str = "rationale",
    normalize: bool = True,
    rationale: Optional[CommonRationale] = None,
    input_size: Optional[int] = None,
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
        input_size: Side of the example batch the export is checked on; the size a ViT
            declares, else 64 px (then 224 px if that fails), when None.

    Returns:
        The :class:`Embedder` in eval mode (the model itself is left unchanged; nothing
        in the result refers to it).

    Raises:
        ExportError: If the model has no rationale pooling to export, ``forward`` runs
            no (or several) encoders, or the result would differ from ``model(x)``.
    """
    check_choice("pooling", pooling, POOLING_MODES)
    lcr = rationale if rationale is not None else getattr(model, SUBMODULE, None)
    if lcr is not None and not isinstance(lcr, CommonRationale):
        raise ExportError(f"{type(model).__name__}.{SUBMODULE} is not a CommonRationale.")
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


def _site_in(
    lcr: CommonRationale, root: nn.Module, encoder: nn.Module
) -> Tuple[str, Optional[str]]:
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


def _cut_after(encoder: nn.Module, layer: str) -> nn.Module:
    """``encoder`` traced by torch.fx up to ``layer``, returning ``{"map": its output}``."""
    from torchvision.models.feature_extraction import create_feature_extractor

    tracer: Dict[str, Any] = {}
    try:  # timm marks the modules and functions that fx cannot trace through
        from timm.models import get_notrace_functions, get_notrace_modules

        tracer = {
            "leaf_modules": list(get_notrace_modules()),
            "autowrap_functions": list(get_notrace_functions()),
        }
    except ImportError:
        pass
    # Optional forward arguments (masks, ...) keep their defaults: the embedder takes images.
    params = list(inspect.signature(encoder.forward).parameters.values())[1:]
    concrete = {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    try:
        return create_feature_extractor(
            encoder,
            return_nodes={layer: "map"},
            tracer_kwargs=tracer,
            concrete_args=concrete or None,
        )
    except Exception as err:
        raise ExportError(
            f"torch.fx cannot trace {type(encoder).__name__} up to {layer!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "use pooling='gap', or a backbone with a global average pool module."
        ) from None


def _layer_output(
    graph: nn.Module, reshape: Optional[Callable[[Tensor], Tensor]], example: Tensor
) -> LayerOutput:
    """The cut encoder with its reshape; a token reshape gets its grid fixed."""
    if not isinstance(reshape, TokenMap):
        return LayerOutput(graph, reshape)
    with torch.no_grad():
        side = int(reshape(graph(example)["map"]).shape[-1])
    return LayerOutput(graph, reshape, tokens=(reshape.num_prefix_tokens, side))


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
        layer, pool_name = _site_in(lcr, model, source)
        if pooling == "rationale" and pool_name is not None:
            original = encoder.get_submodule(pool_name)
            head = copy.deepcopy(lcr.head).eval()
            keep = _keeps_dims(original, head.in_channels, example)
            parent, _, attr = pool_name.rpartition(".")
            setattr(encoder.get_submodule(parent), attr, RationalePool(head, keep, lcr.reshape))
        elif pooling == "rationale":
            features = _layer_output(_cut_after(encoder, layer), lcr.reshape, example)
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


FORMATS = ("onnx", "torchscript", "pt")
META_KEY = "lcr_lightly"


def save_embedder(
    embedder: Embedder,
    path: Any,
    format: str = "onnx",
    meta: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Writes an embedder as ONNX, TorchScript or a pickled module, atomically.

    The batch axis stays dynamic (ONNX: ``torch.onnx.export`` with a dynamic batch
    dimension; TorchScript: ``torch.jit.trace``). The file carries :class:`EmbedderInfo`
    and ``meta`` (e.g. the evaluation transform) as JSON: ONNX metadata, a TorchScript
    extra file, or a dict entry beside the module.

    Args:
        embedder: From :func:`export_embedder`.
        path: The file.
        format: ``"onnx"``, ``"torchscript"`` or ``"pt"`` (``torch.save`` of the module;
            :func:`load_embedder` unpickles it, so load only files you trust).
        meta: Further JSON-ready fields stored with it.

    Returns:
        The stored metadata.
    """
    import json

    from lcr_lightly.experiments.atomic import atomic_path

    check_choice("format", format, FORMATS)
    stored = {**embedder.info.to_dict(), **(meta or {}), "format": format}
    example = dry_input(embedder, embedder.info.input_size[1:])
    embedder = embedder.eval()
    with atomic_path(path) as tmp, torch.no_grad():
        if format == "onnx":
            onnx = require_onnx("onnx")

            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                embedder,
                (example,),
                input_names=["images"],
                output_names=["embedding"],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                verbose=False,
            )
            assert program is not None
            program.save(str(tmp))
            proto = onnx.load(str(tmp))
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_KEY, json.dumps(stored)
            onnx.save(proto, str(tmp))
        elif format == "torchscript":
            traced = torch.jit.trace(embedder, example)
            torch.jit.save(traced, str(tmp), _extra_files={f"{META_KEY}.json": json.dumps(stored)})
        else:
            torch.save({META_KEY: stored, "embedder": embedder}, tmp)
    return stored


class LoadedEmbedder:
    """An exported embedder read back: call it on images (B, C, H, W), get (B, D).

    Attributes:
        meta: The metadata stored with it (:class:`EmbedderInfo` fields and extras).
        run: The callable (an onnxruntime session's run, a TorchScript or torch module).
    """

    def __init__(self, run: Callable[[Tensor], Tensor], meta: Dict[str, Any]) -> None:
        self.run = run
        self.meta = meta

    def __call__(self, images: Tensor) -> Tensor:
        """Embeddings (B, D) of images (B, C, H, W)."""
        return self.run(images)


def load_embedder(path: Any) -> LoadedEmbedder:
    """Reads a file written by :func:`save_embedder` (any of its formats).

    ONNX files run on onnxruntime (CPU); TorchScript and ``pt`` files on torch.

    Args:
        path: The file.

    Returns:
        The :class:`LoadedEmbedder`.

    Raises:
        ExportError: If the file is not an exported embedder.
    """
    import json
    from pathlib import Path

    where = Path(path)
    if not where.is_file():
        raise ExportError(f"no exported embedder at {where} (no such file)")
    with open(where, "rb") as handle:
        head = handle.read(2)
    if head != b"PK":  # torch's zip container; ONNX is a protobuf
        ort = require_onnx("onnxruntime")

        try:
            session = ort.InferenceSession(str(where), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ExportError(
                f"not an exported embedder: {where} (neither a torch file nor ONNX: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__})"
            ) from None
        meta = json.loads(session.get_modelmeta().custom_metadata_map.get(META_KEY, "{}"))
        name = session.get_inputs()[0].name

        def run_onnx(images: Tensor) -> Tensor:
            out = session.run(None, {name: images.detach().cpu().float().numpy()})[0]
            return torch.from_numpy(out)

        return LoadedEmbedder(run_onnx, meta)
    extra = {f"{META_KEY}.json": ""}
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            script = torch.jit.load(str(where), map_location="cpu", _extra_files=extra)
        return LoadedEmbedder(script, json.loads(extra[f"{META_KEY}.json"] or "{}"))
    except RuntimeError:
        pass  # not TorchScript: a pickled module
    try:
        loaded = torch.load(where, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ExportError(f"not an exported embedder: {where} ({type(err).__name__})") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("embedder"), nn.Module):
        raise ExportError(
            f"not an exported embedder: {where} (a torch file without an 'embedder' module; "
            "a training checkpoint goes to --checkpoint of a model, see lcr-lightly export)"
        )
    module = loaded["embedder"].eval()
    return LoadedEmbedder(module, dict(loaded.get(META_KEY, {})))
