"""Self-supervised LightningModules built from lightly blocks."""

from lcr_lightly.models.backbones import (
    SmallResNet,
    build_backbone,
    drop_stem_pool,
    load_backbone_weights,
)
from lcr_lightly.models.base import SSLModule, split_views
from lcr_lightly.models.methods import BYOL, MoCoV2, SimCLR, SimSiam

METHODS = {"mocov2": MoCoV2, "byol": BYOL, "simsiam": SimSiam, "simclr": SimCLR}

__all__ = [
    "BYOL",
    "METHODS",
    "MoCoV2",
    "SSLModule",
    "SimCLR",
    "SimSiam",
    "SmallResNet",
    "build_backbone",
    "drop_stem_pool",
    "load_backbone_weights",
    "split_views",
]
