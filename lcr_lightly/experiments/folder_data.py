"""``dataset: folder``: SSL pretraining on an unlabeled folder, evaluation only with labels.

The SSL set is every readable image under ``data_root``
(:class:`~lcr_lightly.data.UnlabeledFolder`). Retrieval, kNN and the linear probe need
labels: with ``eval_root`` (``train/<class>/`` and ``test/<class>/``, read as
``dataset: imagefolder``) they run as usual; without it the bundle has no classes and
:func:`~lcr_lightly.experiments.pipeline.run` skips the evaluation with one line.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lcr_lightly.data import UnlabeledFolder, eval_transform
from lcr_lightly.experiments.config import ExperimentConfig

NO_LABELS = (
    "evaluation skipped: dataset 'folder' has no labels (pass --eval-root DIR with train/ "
    "and test/ class folders to evaluate retrieval, kNN and the linear probe)"
)


def folder_bundle(cfg: ExperimentConfig, views: Any) -> Any:
    """The data bundle of ``dataset: folder`` (``num_classes`` 0 without ``eval_root``).

    Args:
        cfg: The experiment config.
        views: The SSL multi-view transform.

    Returns:
        A :class:`~lcr_lightly.experiments.pipeline.DataBundle`.
    """
    from lcr_lightly.experiments.pipeline import DataBundle, make_data

    ssl_train = UnlabeledFolder(str(cfg.data_root), transform=views)
    if cfg.eval_root is None:
        plain = ssl_train.with_transform(eval_transform(cfg.image_size))
        return DataBundle(ssl_train, plain, plain, 0, masks=False)
    labelled = make_data(
        replace(cfg, dataset="imagefolder", data_root=cfg.eval_root, eval_root=None)
    )
    return DataBundle(
        ssl_train, labelled.train_eval, labelled.test_eval, labelled.num_classes, masks=False
    )
