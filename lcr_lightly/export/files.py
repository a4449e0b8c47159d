"""Exported embedders on disk: ONNX, TorchScript or a pickled module, with metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_choice
from lcr_lightly.atomic import atomic_path
from lcr_lightly.export.errors import ExportError, require_onnx
from lcr_lightly.export.modules import Embedder
from lcr_lightly.trace import dry_input

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
