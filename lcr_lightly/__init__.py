"""lcr-lightly: Learning Common Rationale (Shu et al., CVPR 2023) for SSL models.

Example:
    >>> from lcr_lightly import with_common_rationale
    >>> from lcr_lightly.models import MoCoV2
    >>> model = with_common_rationale(MoCoV2(backbone="resnet18", batch_size=32), k=32)
    >>> from lcr_lightly import load_model
    >>> trained = load_model("runs/a/model.pt")  # a run of lcr-lightly pretrain
"""

from typing import TYPE_CHECKING, Any

from lcr_lightly.callbacks import RationaleMaps, RetrievalMonitor
from lcr_lightly.capture import FeatureCapture
from lcr_lightly.export import Embedder, export_embedder, load_embedder, save_embedder
from lcr_lightly.functional import attach
from lcr_lightly.gallery import Gallery, build_gallery
from lcr_lightly.gradcam import gradcam
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.hooks import count_hooks, remove_hooks
from lcr_lightly.layers import FeaturePath, resolve_layer
from lcr_lightly.lightning import release, set_pooling, with_common_rationale
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.pooling import minmax_normalize, norm_pool, weighted_average_pool
from lcr_lightly.rationale import CommonRationale
from lcr_lightly.resolve import (
    FeatureSite,
    Resolution,
    find_feature_layer,
    find_feature_path,
    resolve,
)
from lcr_lightly.step import StepRecord
from lcr_lightly.tokens import tokens_to_map

if TYPE_CHECKING:
    from lcr_lightly.experiments.loading import load_model

__version__ = "0.1.0"

__all__ = [
    "CommonRationale",
    "CommonRationaleHead",
    "Embedder",
    "Gallery",
    "StepRecord",
    "FeaturePath",
    "FeatureSite",
    "FeatureCapture",
    "GradCAMFitLoss",
    "RationaleMaps",
    "Resolution",
    "RetrievalMonitor",
    "attach",
    "build_gallery",
    "count_hooks",
    "export_embedder",
    "find_feature_layer",
    "find_feature_path",
    "gradcam",
    "load_embedder",
    "load_model",
    "minmax_normalize",
    "norm_pool",
    "release",
    "remove_hooks",
    "save_embedder",
    "resolve",
    "resolve_layer",
    "set_pooling",
    "tokens_to_map",
    "weighted_average_pool",
    "with_common_rationale",
]


def __getattr__(name: str) -> Any:
    """``load_model`` is imported on first use: it needs the whole experiment runner."""
    if name == "load_model":
        from lcr_lightly.experiments.loading import load_model

        return load_model
    raise AttributeError(f"module 'lcr_lightly' has no attribute {name!r}")
