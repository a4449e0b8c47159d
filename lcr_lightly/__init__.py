"""lcr-lightly: Learning Common Rationale (Shu et al., CVPR 2023) for SSL models.

Example:
    >>> from lcr_lightly import with_common_rationale
    >>> from lcr_lightly.models import MoCoV2
    >>> model = with_common_rationale(MoCoV2(backbone="resnet18", batch_size=32), k=32)
"""

from lcr_lightly.capture import FeatureCapture
from lcr_lightly.export import Embedder, export_embedder, load_embedder, save_embedder
from lcr_lightly.gallery import Gallery, build_gallery
from lcr_lightly.gradcam import gradcam
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.hooks import count_hooks, remove_hooks
from lcr_lightly.layers import (
    FeaturePath,
    find_feature_layer,
    find_feature_path,
    find_global_pool,
    resolve_layer,
)
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.pooling import minmax_normalize, norm_pool, weighted_average_pool
from lcr_lightly.rationale import CommonRationale, StepRecord, attach
from lcr_lightly.tokens import tokens_to_map
from lcr_lightly.wrap import release, set_pooling, with_common_rationale

__version__ = "0.1.0"

__all__ = [
    "CommonRationale",
    "CommonRationaleHead",
    "Embedder",
    "Gallery",
    "StepRecord",
    "FeaturePath",
    "FeatureCapture",
    "GradCAMFitLoss",
    "attach",
    "build_gallery",
    "count_hooks",
    "export_embedder",
    "find_feature_layer",
    "find_feature_path",
    "find_global_pool",
    "gradcam",
    "load_embedder",
    "minmax_normalize",
    "norm_pool",
    "release",
    "remove_hooks",
    "save_embedder",
    "resolve_layer",
    "set_pooling",
    "tokens_to_map",
    "weighted_average_pool",
    "with_common_rationale",
]
