"""Lightning callbacks that watch LCR train: the maps, and retrieval for every pooling.

Add them to any Trainer that fits a model wrapped with
:func:`~lcr_lightly.with_common_rationale`::

    trainer = pl.Trainer(
        callbacks=[
            RationaleMaps(val_images, every_n_epochs=1),
            RetrievalMonitor(val_loader, every_n_epochs=1),
            ModelCheckpoint(monitor="val/mAP_rationale", mode="max"),
        ],
    )

* :class:`RationaleMaps` draws, for a fixed set of images, one row per image: the image,
  the GradCAM of the SSL loss (what LCR fits), the learned rationale ``A'`` and the
  feature-norm map, and logs the figure to TensorBoard (``add_image``), to W&B
  (``log_image``) or, for other loggers and without one, as PNG files in the log folder.
* :class:`RetrievalMonitor` scores leave-one-out retrieval (rank-k, mAP) of a labelled
  validation loader for global average, rationale and feature-norm pooling, all three
  pooled from one forward pass per batch
  (:func:`~lcr_lightly.eval.extract_features`), plus kNN accuracy when a labelled gallery
  is given, and logs ``val/mAP_rationale``, ``val/rank1_gap``, ... for
  ``ModelCheckpoint`` and ``EarlyStopping``.

Neither changes training: the global random generators (python, NumPy, torch, CUDA)
are restored (Lightning's ``isolate_rng``), and so are every module's train/eval flag and
the parameters' gradients; :class:`RationaleMaps`, which runs a training step to get the
GradCAM, also restores every parameter and buffer (BN statistics, momentum encoders,
MoCo's queue) and silences the step's ``self.log`` calls.
"""

from lcr_lightly.callbacks.isolation import untouched
from lcr_lightly.callbacks.maps import MakeBatch, RationaleMaps, two_view_batch
from lcr_lightly.callbacks.retrieval import RetrievalMonitor

__all__ = ["MakeBatch", "RationaleMaps", "RetrievalMonitor", "two_view_batch", "untouched"]
