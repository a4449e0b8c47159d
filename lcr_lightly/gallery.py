"""A retrieval gallery: embed every image under a folder, search it with faiss.

:func:`build_gallery` embeds the images under a folder (recursively, in sorted order)
with any embedder (an :class:`~lcr_lightly.export.Embedder`, a loaded ONNX/TorchScript
file, or a callable), skips and lists unreadable files, and writes one ``.npz`` file
atomically: root-relative paths, L2-normalised features, file sizes and modification
times (a resumed build embeds only new or changed files), and a JSON header (pooling,
embedder, transform, index parameters, skipped files).

:meth:`Gallery.search` ranks by inner product (cosine similarity): an exact faiss
``IndexFlatIP`` up to :data:`EXACT_LIMIT` items, an HNSW graph beyond
(:func:`~lcr_lightly.eval.retrieval.hnsw_index`; its parameters are stored in the
gallery and the built graph is kept in the file). ``benchmarks/embed_speed.py``
measures both from 10^3 to 10^6 items.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from lcr_lightly.atomic import atomic_path
from lcr_lightly.data.unlabeled import list_images, read_image
from lcr_lightly.eval.retrieval import HNSW_DEFAULTS, hnsw_index, l2_normalize

# Up to this many items an exact inner-product search answers a query in a few ms on
# 2 CPU cores (benchmarks/embed_speed.py); beyond, HNSW.
EXACT_LIMIT = 100_000
GALLERY_FORMAT = "lcr-lightly-gallery-1"

Embed = Callable[[Tensor], Tensor]
Transform = Callable[[Image.Image], Tensor]


class SearchResult(NamedTuple):
    """The neighbours of each query, best first.

    Attributes:
        scores: (Q, k) inner products of the L2-normalised features (cosines).
        indices: (Q, k) gallery rows (-1 where the gallery has fewer than k items).
        paths: The matching root-relative paths, per query.
    """

    scores: np.ndarray
    indices: np.ndarray
    paths: List[List[str]]


@dataclass
class Gallery:
    """Embedded images and their index.

    Attributes:
        root: The image folder (paths are relative to it).
        paths: Root-relative path of each row.
        features: (N, D) float32, L2-normalised rows.
        stats: (N, 2) int64 file size and modification time (ns) when embedded.
        meta: Pooling, embedder, transform and index parameters (JSON-ready).
        skipped: ``{path: reason}`` of the files that could not be read.
        added: How many images the build that returned it embedded (the rest were kept).
    """

    root: str
    paths: List[str]
    features: np.ndarray
    stats: np.ndarray
    meta: Dict[str, Any] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    added: int = 0
    _index: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def index_params(self) -> Dict[str, Any]:
        """The index for the current size: exact, or HNSW with its parameters.

        ``{"type": "exact"}`` or ``{"type": "hnsw", "M": ..., "ef_construction": ...,
        "ef_search": ...}``.
        """
        if len(self) <= int(self.meta.get("exact_limit", EXACT_LIMIT)):
            return {"type": "exact"}
        return {"type": "hnsw", **HNSW_DEFAULTS, **self.meta.get("hnsw", {})}

    def index(self) -> Any:
        """The faiss index over the features (built on first use)."""
        if self._index is None:
            import faiss

            params = self.index_params
            if params["type"] == "exact":
                index = faiss.IndexFlatIP(self.features.shape[1])
                index.add(self.features)
            else:
                index = hnsw_index(
                    self.features, params["M"], params["ef_construction"], params["ef_search"]
                )
            self._index = index
        return self._index

    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """The k most similar gallery items of each query.

        Args:
            queries: (Q, D) features (tensor or array); L2-normalised here.
            k: Neighbours per query.

        Returns:
            The :class:`SearchResult`.
        """
        if len(self) == 0:
            raise ValueError("the gallery is empty")
        q = l2_normalize(queries)
        if q.ndim != 2 or q.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"queries must be (Q, {self.features.shape[1]}) features, got {tuple(q.shape)}"
            )
        scores, indices = self.index().search(q, int(k))
        paths = [[self.paths[i] for i in row if i >= 0] for row in indices]
        return SearchResult(scores, indices, paths)

    def save(self, path: Any) -> Path:
        """Writes the gallery as one ``.npz`` file, atomically (the HNSW graph included)."""
        import faiss

        header = {
            "format": GALLERY_FORMAT,
            "root": self.root,
            "meta": {**self.meta, "index": self.index_params},
            "skipped": self.skipped,
        }
        arrays: Dict[str, Any] = {
            "features": self.features,
            "paths": np.asarray(self.paths, dtype=np.str_),
            "stats": self.stats,
            "header": np.asarray(json.dumps(header)),
        }
        if self.index_params["type"] == "hnsw":
            arrays["hnsw"] = faiss.serialize_index(self.index())
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: Any) -> Gallery:
        """Reads a gallery written by :meth:`save`.

        Raises:
            ValueError: If the file is not a gallery.
        """
        import faiss

        where = Path(path)
        if not where.is_file():
            raise FileNotFoundError(f"no gallery at {where}")
        try:
            with np.load(where, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                gallery = cls(
                    root=header["root"],
                    paths=[str(p) for p in data["paths"]],
                    features=np.ascontiguousarray(data["features"], dtype=np.float32),
                    stats=np.asarray(data["stats"], dtype=np.int64).reshape(-1, 2),
                    meta={k: v for k, v in header["meta"].items() if k != "index"},
                    skipped=dict(header.get("skipped", {})),
                )
                if "hnsw" in data.files:
                    gallery._index = faiss.deserialize_index(np.asarray(data["hnsw"]))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"not a gallery file: {where} ({type(err).__name__})") from None
        if header.get("format") != GALLERY_FORMAT:
            raise ValueError(f"not a gallery file: {where} (format {header.get('format')!r})")
        return gallery


def _stat(path: Path) -> Tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


class _Images(torch.utils.data.Dataset):
    """Decoded, transformed images; an unreadable one yields its error message."""

    def __init__(self, root: Path, paths: Sequence[str], transform: Transform) -> None:
        self.root, self.paths, self.transform = root, list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[int, Any]:
        try:
            return i, self.transform(read_image(self.root / self.paths[i]))
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three
            return i, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _batches(
    dataset: _Images, batch_size: int, num_workers: int
) -> Iterator[List[Tuple[int, Any]]]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    yield from loader


def build_gallery(
    embed: Embed,
    root: Any,
    transform: Transform,
    out: Optional[Any] = None,
    resume: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    meta: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    save_every: int = 50,
) -> Gallery:
    """Embeds every image under ``root`` (recursively) and writes the gallery.

    Unreadable files (not an image, truncated) are skipped, listed in
    ``Gallery.skipped`` with the reason and counted in one warning; nothing is dropped
    silently. With ``resume`` and an existing ``out`` built with the same ``meta``,
    only new or changed files (size or modification time) are embedded, and files
    that are gone are removed. The file is rewritten atomically every ``save_every``
    batches, so an interrupted build resumes where it stopped.

    Args:
        embed: Images (B, C, H, W) to features (B, D): an exported embedder, a loaded
            ONNX/TorchScript file, or a model in eval mode.
        root: The image folder.
        transform: PIL image to (C, H, W) tensor (the model's evaluation transform).
        out: The gallery file (``.npz``); not written when None.
        resume: Reuse the rows of an existing ``out``.
        batch_size: Images per forward.
        num_workers: DataLoader workers decoding images.
        meta: Fields recorded in the gallery (pooling, model, transform); a resumed
            build requires the same. ``"exact_limit"`` and ``"hnsw"`` (``M``,
            ``ef_construction``, ``ef_search``) set the index.
        progress: Show a progress bar.
        save_every: Batches between intermediate saves (0: only at the end).

    Returns:
        The :class:`Gallery`.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: If ``out`` holds a gallery built with other ``meta``.
    """
    base = Path(root)
    paths = list_images(base)
    meta = dict(meta or {})
    old: Optional[Gallery] = None
    if resume and out is not None and Path(out).is_file():
        old = Gallery.load(out)
        mine = {k: v for k, v in old.meta.items() if k in meta}
        if mine != meta:
            changed = sorted(k for k in meta if mine.get(k) != meta[k])
            raise ValueError(
                f"{out} was built with other settings ({', '.join(changed)}); write to a new "
                "file or pass resume=False to rebuild it"
            )
    stats = {p: _stat(base / p) for p in paths}
    kept: Dict[str, Tuple[np.ndarray, Tuple[int, int]]] = {}
    skipped: Dict[str, str] = {}
    if old is not None:
        for i, p in enumerate(old.paths):
            if p in stats and tuple(old.stats[i]) == stats[p]:
                kept[p] = (old.features[i], stats[p])
        skipped = {p: r for p, r in old.skipped.items() if p in stats}  # retried below
    todo = [p for p in paths if p not in kept]
    gallery = Gallery(str(base), [], np.zeros((0, 0), np.float32), np.zeros((0, 2), np.int64))
    gallery.meta = {  # index settings of meta (e.g. a larger ef_search) override the defaults
        **meta,
        "exact_limit": int(meta.get("exact_limit", EXACT_LIMIT)),
        "hnsw": {**HNSW_DEFAULTS, **meta.get("hnsw", {})},
    }

    def assemble() -> None:
        order = [p for p in paths if p in kept]
        gallery.paths = order
        gallery.features = (
            np.stack([kept[p][0] for p in order]).astype(np.float32)
            if order
            else np.zeros((0, 0), np.float32)
        )
        gallery.stats = np.asarray([kept[p][1] for p in order], dtype=np.int64).reshape(-1, 2)
        gallery.skipped = {p: skipped[p] for p in paths if p in skipped}
        gallery._index = None

    dataset = _Images(base, todo, transform)
    bar = tqdm(total=len(todo), desc="embed", unit="img", disable=not progress)
    with torch.no_grad():
        for step, batch in enumerate(_batches(dataset, batch_size, num_workers), start=1):
            good = [(i, x) for i, x in batch if isinstance(x, Tensor)]
            for i, reason in batch:
                if not isinstance(reason, Tensor):
                    skipped[todo[i]] = reason
            if good:
                feats = l2_normalize(embed(torch.stack([x for _, x in good])))
                for (i, _), row in zip(good, feats):
                    kept[todo[i]] = (row, stats[todo[i]])
                    skipped.pop(todo[i], None)
                gallery.added += len(good)
            bar.update(len(batch))
            if out is not None and save_every and step % save_every == 0:
                assemble()
                gallery.save(out)
    bar.close()
    assemble()
    if gallery.skipped:
        shown = ", ".join(list(gallery.skipped)[:3])
        warnings.warn(
            f"{len(gallery.skipped)} unreadable file(s) under {base} skipped ({shown}"
            f"{', ...' if len(gallery.skipped) > 3 else ''}); Gallery.skipped lists them.",
            RuntimeWarning,
            stacklevel=2,
        )
    if out is not None:
        gallery.save(out)
    return gallery


def search_figure(
    queries: Sequence[Any], result: SearchResult, root: Any, path: Any, thumb: float = 1.6
) -> Path:
    """Draws each query beside its neighbours (score above each), one row per query.

    Args:
        queries: Query image files, in the order of ``result``'s rows.
        result: From :meth:`Gallery.search`.
        root: The gallery's image folder.
        path: The figure file (written atomically).
        thumb: Size of one thumbnail in inches.

    Returns:
        ``path`` as a Path.
    """
    k = max((len(p) for p in result.paths), default=0)
    rows = len(queries)
    # a Figure, not pyplot: the user's backend and pyplot's figure list stay as they are
    fig = Figure(figsize=(thumb * (k + 1), thumb * rows))
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r, query in enumerate(queries):
        axes[r][0].imshow(read_image(query))
        axes[r][0].set_title("query", fontsize=8, color="tab:blue")
        for c in range(k):
            ax = axes[r][c + 1]
            if c < len(result.paths[r]):
                ax.imshow(read_image(Path(root) / result.paths[r][c]))
                ax.set_title(f"{result.scores[r][c]:.3f}", fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    return Path(path)
