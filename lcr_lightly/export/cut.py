"""An encoder cut after its feature layer by ``torch.fx``, its output laid out as a map.

Used when there is no pool module to replace (ViT token maps, a layer given
explicitly): torchvision's ``create_feature_extractor`` traces the encoder up to the
layer, with timm's non-traceable modules and functions kept as leaves.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from lcr_lightly.export.errors import ExportError
from lcr_lightly.export.modules import LayerOutput
from lcr_lightly.tokens import TokenMap


def cut_after(encoder: nn.Module, layer: str) -> nn.Module:
    """``encoder`` traced by torch.fx up to ``layer``, returning ``{"map": its output}``."""
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


def layer_output(
    graph: nn.Module, reshape: Optional[Callable[[Tensor], Tensor]], example: Tensor
) -> LayerOutput:
    """The cut encoder with its reshape; a token reshape gets its grid fixed."""
    if not isinstance(reshape, TokenMap):
        return LayerOutput(graph, reshape)
    with torch.no_grad():
        height, width = reshape(graph(example)["map"]).shape[-2:]
    return LayerOutput(graph, reshape, tokens=(reshape.num_prefix_tokens, int(height), int(width)))
