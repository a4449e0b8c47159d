"""Exported-file features vs the library's, on real image files.

The library's features are those of ``lcr_lightly.eval.extract_features`` (the wrapped
model with its pooling hooks, the run's evaluation transform), L2-normalised; the
exported file (ONNX on onnxruntime, TorchScript or pt) embeds the same decoded images.
Prints the largest absolute difference and the cosine between the two per image
(corrupt files are skipped and named, as by ``lcr-lightly embed``).

    python benchmarks/onnx_vs_library.py --checkpoint outputs/demo/mocov2_lcr/model.pt \
        --exported embedder.onnx --images data/synthetic_cub/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lcr_lightly import load_embedder
from lcr_lightly.data import UnlabeledFolder, eval_transform
from lcr_lightly.eval import extract_features
from lcr_lightly.experiments.build import load_model
from lcr_lightly.experiments.checkpointing import read_checkpoint
from lcr_lightly.experiments.config import ExperimentConfig
from lcr_lightly.experiments.serving import transform_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--exported", required=True)
    parser.add_argument("--images", required=True)
    args = parser.parse_args()
    cfg = ExperimentConfig.from_dict(read_checkpoint(args.checkpoint).config or {})
    model = load_model(cfg, Path(args.checkpoint))
    exported = load_embedder(args.exported)
    pooling = exported.meta["pooling"]
    spec = transform_spec(cfg)
    files = UnlabeledFolder(args.images, eval_transform(spec["image_size"], crop=spec["crop"]))
    loader = DataLoader(files, batch_size=64)
    library = extract_features(model, loader, poolings=(pooling,), progress=False)[pooling]
    library = torch.nn.functional.normalize(library, dim=1)
    with torch.no_grad():
        ours = torch.cat([exported(batch[0]) for batch in loader]).float()
    diff = (ours - library).abs().max().item()
    cosine = (ours * library).sum(dim=1)
    print(
        f"{len(files)} images, pooling {pooling}, {ours.shape[1]}-d: "
        f"max |exported - library| = {diff:.2e}, min cosine = {cosine.min().item():.7f} "
        f"({exported.meta.get('format')} file {args.exported})"
    )


if __name__ == "__main__":
    main()
