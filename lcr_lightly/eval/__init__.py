"""Evaluation: retrieval, kNN, linear probes, localisation, feature extraction."""

from lcr_lightly.eval.features import extract_features
from lcr_lightly.eval.knn import knn_accuracy
from lcr_lightly.eval.linear import (
    LinearProbeModule,
    label_subset,
    linear_probe,
    linear_probe_paper,
    stratified_split,
)
from lcr_lightly.eval.localization import (
    energy_inside,
    keypoint_masks,
    localization_report,
    mask_area,
    pointing_game,
)
from lcr_lightly.eval.retrieval import l2_normalize, retrieval_metrics

__all__ = [
    "LinearProbeModule",
    "energy_inside",
    "extract_features",
    "keypoint_masks",
    "knn_accuracy",
    "l2_normalize",
    "label_subset",
    "linear_probe",
    "linear_probe_paper",
    "localization_report",
    "mask_area",
    "pointing_game",
    "retrieval_metrics",
    "stratified_split",
]
