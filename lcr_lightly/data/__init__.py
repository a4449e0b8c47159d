"""Data: local-root loaders, the synthetic fine-grained set, the CUB-layout exporter."""

from lcr_lightly.data.cub import CUB200, CUBLocalization
from lcr_lightly.data.export import export_cub_layout
from lcr_lightly.data.fgvc import cifar100, fgvc_aircraft, image_folder, stanford_cars
from lcr_lightly.data.files import (
    DatasetNotFoundError,
    UnreadableImageError,
    read_image,
    resolve_root,
)
from lcr_lightly.data.synthetic import SyntheticFineGrained, fine_grained_classes
from lcr_lightly.data.transforms import eval_geometry, eval_transform, ssl_transform
from lcr_lightly.data.unlabeled import UnlabeledFolder, list_images

__all__ = [
    "CUB200",
    "CUBLocalization",
    "DatasetNotFoundError",
    "SyntheticFineGrained",
    "UnlabeledFolder",
    "UnreadableImageError",
    "cifar100",
    "eval_geometry",
    "eval_transform",
    "export_cub_layout",
    "fgvc_aircraft",
    "fine_grained_classes",
    "image_folder",
    "list_images",
    "read_image",
    "resolve_root",
    "ssl_transform",
    "stanford_cars",
]
