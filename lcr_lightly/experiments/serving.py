"""``lcr-lightly export``, ``embed`` and ``search``: a trained model as a retrieval system.

``export`` turns a checkpoint written by ``lcr-lightly pretrain``/``demo`` into a
hook-free embedder file (ONNX, TorchScript or a pickled module,
:func:`~lcr_lightly.export.save_embedder`); ``embed`` builds a gallery over a folder of
images with a checkpoint or such a file (:func:`~lcr_lightly.gallery.build_gallery`);
``search`` ranks the gallery for query images. The evaluation transform is the one of
the run's config (stored in the checkpoint and carried into the exported file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, NamedTuple, Optional, Tuple

import torch
from jsonargparse import ArgumentParser, Namespace
from torch import Tensor

from lcr_lightly.data import eval_transform
from lcr_lightly.experiments.checkpointing import CheckpointError, read_checkpoint
from lcr_lightly.experiments.config import ExperimentConfig, PositiveInt

Pooling = Literal["rationale", "gap"]
Format = Literal["onnx", "torchscript", "pt"]


class ServingError(ValueError):
    """A serving command that cannot run as given (message: one line)."""


class Source(NamedTuple):
    """An embedder opened from a checkpoint or an exported file."""

    embed: Callable[[Tensor], Tensor]
    meta: Dict[str, Any]  # pooling, transform, model path, embedder info
    transform: Callable[[Any], Tensor]


def transform_spec(cfg: ExperimentConfig) -> Dict[str, Any]:
    """The evaluation transform of a run, as stored in exported files and galleries.

    The synthetic set is rendered at its size and only resized; real images are resized
    and centre-cropped, as :func:`~lcr_lightly.experiments.build.make_data` does.
    """
    return {"image_size": cfg.image_size, "crop": cfg.dataset != "synthetic"}


def _transform(spec: Dict[str, Any]) -> Callable[[Any], Tensor]:
    return eval_transform(int(spec["image_size"]), crop=bool(spec["crop"]))


def _model_from_checkpoint(path: Path) -> Tuple[Any, ExperimentConfig]:
    from lcr_lightly.experiments.build import load_model

    stored = read_checkpoint(path).config
    if stored is None:
        raise CheckpointError(
            f"{path} holds weights without an lcr-lightly config; pass a model.pt or .ckpt "
            "written by lcr-lightly pretrain/demo, or an exported embedder"
        )
    cfg = ExperimentConfig.from_dict(stored)
    return load_model(cfg, path).eval(), cfg


def export_checkpoint(
    checkpoint: Path, pooling: Optional[str], normalize: bool = True
) -> Tuple[Any, Dict[str, Any]]:
    """The embedder of a checkpoint and the metadata to store with it."""
    from lcr_lightly.export import ExportError, export_embedder

    model, cfg = _model_from_checkpoint(checkpoint)
    chosen = pooling or ("rationale" if cfg.lcr else "gap")
    try:
        embedder = export_embedder(
            model, pooling=chosen, normalize=normalize, input_size=cfg.image_size
        )
    except ExportError as err:
        raise ServingError(f"cannot export {checkpoint}: {err}") from None
    meta = {"transform": transform_spec(cfg), "checkpoint": str(checkpoint.resolve())}
    return embedder, meta


def open_source(path: Path, pooling: Optional[str] = None) -> Source:
    """Opens a checkpoint (exported on the fly) or an exported embedder file.

    Args:
        path: ``model.pt``/``.ckpt`` written by lcr-lightly, or a file from ``export``.
        pooling: Pooling of a checkpoint (its LCR setting decides when None); for an
            exported file it must match the exported one.

    Returns:
        The :class:`Source`.
    """
    from lcr_lightly.export import ExportError, load_embedder

    if not path.is_file():
        raise ServingError(f"no checkpoint or exported embedder at {path} (no such file)")
    embed: Callable[[Tensor], Tensor]
    try:
        embedder, meta = export_checkpoint(path, pooling)
        meta, embed = {**embedder.info.to_dict(), **meta}, embedder
        exported = False
    except CheckpointError as checkpoint_error:
        try:
            loaded = load_embedder(path)
        except ExportError as export_error:
            raise ServingError(
                f"{path} is neither an lcr-lightly checkpoint ({checkpoint_error}) nor an "
                f"exported embedder ({export_error})"
            ) from None
        meta, embed, exported = dict(loaded.meta), loaded, True
    if exported:
        if "transform" not in meta or "pooling" not in meta:
            raise ServingError(f"{path} carries no lcr-lightly metadata (pooling, transform)")
        if pooling is not None and pooling != meta["pooling"]:
            raise ServingError(
                f"{path} was exported with pooling={meta['pooling']!r}, not {pooling!r}; "
                "export again with --pooling, or embed from the checkpoint"
            )
    meta["model"] = str(path.resolve())
    return Source(embed, meta, _transform(meta["transform"]))


def add_commands(sub: Any, make_parser: Callable[..., ArgumentParser]) -> None:
    """Adds the ``export``, ``embed`` and ``search`` sub-commands."""
    p = make_parser(description="Export a checkpoint as a hook-free embedder file.")
    p.add_argument("--checkpoint", type=str, required=True, help="model.pt or .ckpt file")
    p.add_argument("--format", type=Format, default="onnx", help="onnx, torchscript or pt")
    p.add_argument("--out", type=str, required=True, help="output file")
    p.add_argument(
        "--pooling", type=Optional[Pooling], default=None,
        help="rationale or gap (default: rationale for an LCR checkpoint, else gap)",
    )  # fmt: skip
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    sub.add_subcommand("export", p, help="Export a checkpoint as ONNX/TorchScript/pt embedder.")

    p = make_parser(description="Embed every image under a folder into a gallery file.")
    p.add_argument("--checkpoint", type=str, required=True, help="checkpoint or exported file")
    p.add_argument("--images", type=str, required=True, help="image folder (recursive)")
    p.add_argument("--out", type=str, required=True, help="gallery file (.npz)")
    p.add_argument("--pooling", type=Optional[Pooling], default=None, help="rationale or gap")
    p.add_argument("--batch-size", dest="batch_size", type=PositiveInt, default=64)
    p.add_argument("--num-workers", dest="num_workers", type=int, default=0)
    p.add_argument(
        "--resume", action="store_true", help="keep the rows of --out; embed new/changed files"
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_subcommand("embed", p, help="Embed a folder of images into a gallery file.")

    p = make_parser(description="Search a gallery for the nearest images of queries.")
    p.add_argument("--gallery", type=str, required=True, help="gallery file from embed")
    p.add_argument("--query", type=str, required=True, help="an image or a folder of images")
    p.add_argument("-k", "--k", dest="k", type=PositiveInt, default=10, help="neighbours")
    p.add_argument(
        "--checkpoint", type=Optional[str], default=None,
        help="model (default: the one the gallery was embedded with)",
    )  # fmt: skip
    p.add_argument("--figure", type=Optional[str], default=None, help="draw results (.png)")
    sub.add_subcommand("search", p, help="Search a gallery with query images.")


def cmd_export(args: Namespace) -> None:
    """``lcr-lightly export``."""
    from lcr_lightly.export import ExportError, load_embedder, save_embedder

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise ServingError(f"no checkpoint at {checkpoint} (no such file)")
    embedder, meta = export_checkpoint(checkpoint, args.pooling, not args.no_normalize)
    out = Path(args.out)
    try:
        save_embedder(embedder, out, args.format, meta)
    except ExportError as err:
        raise ServingError(str(err)) from None
    info = embedder.info
    c, h, w = info.input_size
    print(f"exported {checkpoint} -> {out} ({args.format})")
    print(f"  layer:      {info.layer}")
    print(f"  pooling:    {info.pooling}" + (f" (replaces {info.pool})" if info.pool else ""))
    print(f"  input:      (batch, {c}, {h}, {w}), transform {json.dumps(meta['transform'])}")
    print(f"  output:     (batch, {info.out_dim})" + (", L2-normalised" if info.normalize else ""))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, h, w, generator=generator)
    with torch.no_grad():
        diff = (load_embedder(out)(x) - embedder(x)).abs().max().item()
    print(f"  check:      max |file - module| = {diff:.2e} on a batch of 3")


def _query_paths(query: Path) -> Tuple[Path, List[str]]:
    from lcr_lightly.data.unlabeled import list_images

    if query.is_dir():
        found = list_images(query)
        if not found:
            raise ServingError(f"no images under {query}")
        return query, found
    if query.is_file():
        return query.parent, [query.name]
    raise ServingError(f"no query image or folder at {query}")


def cmd_embed(args: Namespace) -> None:
    """``lcr-lightly embed``."""
    from lcr_lightly.gallery import build_gallery

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise ServingError("--resume and --overwrite exclude each other")
    if out.exists() and not (args.resume or args.overwrite):
        raise ServingError(
            f"{out} exists; pass --resume to embed only new or changed files, or --overwrite"
        )
    images = Path(args.images)
    if not images.is_dir():
        raise ServingError(f"--images {images} is not a folder")
    source = open_source(Path(args.checkpoint), args.pooling)
    keys = ("pooling", "model", "transform")
    try:
        gallery = build_gallery(
            source.embed,
            images,
            source.transform,
            out=out,
            resume=args.resume,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            meta={k: source.meta[k] for k in keys},
            progress=not args.no_progress,
        )
    except ValueError as err:
        raise ServingError(str(err)) from None
    params = gallery.index_params
    dim = gallery.features.shape[1] if len(gallery) else 0
    print(
        f"{out}: {len(gallery)} images ({gallery.added} embedded now), {dim}-d features, "
        f"pooling {source.meta['pooling']}, index {params['type']}"
    )
    if gallery.skipped:
        print(f"{len(gallery.skipped)} unreadable file(s) skipped:")
        for path, reason in gallery.skipped.items():
            print(f"  {path}: {reason}")


def cmd_search(args: Namespace) -> None:
    """``lcr-lightly search``."""
    from lcr_lightly.data.unlabeled import read_image
    from lcr_lightly.gallery import Gallery, search_figure

    try:
        gallery = Gallery.load(args.gallery)
    except (FileNotFoundError, ValueError) as err:
        raise ServingError(str(err)) from None
    model = Path(args.checkpoint or gallery.meta.get("model", ""))
    source = open_source(model, gallery.meta.get("pooling"))
    if source.meta.get("transform") != gallery.meta.get("transform"):
        raise ServingError(f"{model} uses another transform than the gallery's model")
    root, found = _query_paths(Path(args.query))
    tensors, names = [], []
    for name in found:
        try:
            tensors.append(source.transform(read_image(root / name)))
            names.append(name)
        except (OSError, ValueError, SyntaxError) as err:  # listed, never dropped silently
            print(f"skipped unreadable query {root / name}: {err}")
    if not names:
        raise ServingError(f"no readable query image at {args.query}")
    with torch.no_grad():
        queries = torch.cat(
            [source.embed(torch.stack(tensors[i : i + 64])) for i in range(0, len(tensors), 64)]
        )
    try:
        result = gallery.search(queries, args.k)
    except ValueError as err:
        raise ServingError(str(err)) from None
    for q, name in enumerate(names):
        print(f"query {root / name}:")
        for rank, (path, score) in enumerate(zip(result.paths[q], result.scores[q]), start=1):
            print(f"  {rank:3d}  {score:.4f}  {path}")
    if args.figure:
        search_figure([root / n for n in names], result, gallery.root, args.figure)
        print(f"figure written to {args.figure}")


COMMANDS: Dict[str, Callable[[Namespace], None]] = {
    "export": cmd_export,
    "embed": cmd_embed,
    "search": cmd_search,
}
