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

from lcr_lightly.export.build import export_embedder
from lcr_lightly.export.errors import ExportError, require_onnx
from lcr_lightly.export.files import (
    FORMATS,
    META_KEY,
    LoadedEmbedder,
    load_embedder,
    save_embedder,
)
from lcr_lightly.export.modules import Embedder, EmbedderInfo, LayerOutput, RationalePool

__all__ = [
    "FORMATS",
    "META_KEY",
    "Embedder",
    "EmbedderInfo",
    "ExportError",
    "LayerOutput",
    "LoadedEmbedder",
    "RationalePool",
    "export_embedder",
    "load_embedder",
    "require_onnx",
    "save_embedder",
]
