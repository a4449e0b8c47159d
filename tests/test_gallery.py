"""Galleries: every image embedded once, unreadable files listed, search vs brute force, CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from lcr_lightly import Gallery, build_gallery
from lcr_lightly.data import eval_transform
from lcr_lightly.data.unlabeled import list_images
from lcr_lightly.experiments.build import make_model
from lcr_lightly.experiments.checkpointing import save_model
from lcr_lightly.experiments.cli import main
from lcr_lightly.experiments.config import ExperimentConfig


class CountingEmbed:
    """A fixed random projection of the pixels; remembers how many images it saw."""

    def __init__(self, dim: int = 8, size: int = 16) -> None:
        self.weight = torch.randn(3 * size * size, dim, generator=torch.Generator().manual_seed(0))
        self.seen = 0

    def __call__(self, images: Tensor) -> Tensor:
        self.seen += len(images)
        return images.flatten(1) @ self.weight


def _write_images(root: Path, names: List[str], size: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _brute_force(embed: CountingEmbed, root: Path, names: List[str], transform: Any) -> np.ndarray:
    x = torch.stack([transform(Image.open(root / n).convert("RGB")) for n in names])
    f = embed(x).numpy()
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_build_embeds_every_image_lists_unreadable_files_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "images"
    names = ["a.png", "b/c.jpg", "b/d/e.png", "f.bmp"]
    _write_images(root, names)
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image file name")
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    transform = eval_transform(16, crop=False)
    embed, out = CountingEmbed(), tmp_path / "gallery.npz"
    with pytest.warns(RuntimeWarning, match="1 unreadable file"):
        gallery = build_gallery(embed, root, transform, out=out, batch_size=3, progress=False)
    assert gallery.paths == sorted(names) and embed.seen == 4 and gallery.added == 4
    assert list(gallery.skipped) == ["b/broken.jpg"]
    assert "UnidentifiedImageError" in gallery.skipped["b/broken.jpg"]
    np.testing.assert_allclose(
        gallery.features, _brute_force(embed, root, sorted(names), transform), rtol=1e-5
    )
    loaded = Gallery.load(out)
    assert loaded.paths == gallery.paths and loaded.skipped == gallery.skipped
    np.testing.assert_array_equal(loaded.features, gallery.features)

    # resume: only the new and the changed file are embedded, the deleted one is dropped
    _write_images(root, ["g/new.png"], seed=1)
    _write_images(root, ["a.png"], seed=2)
    os.utime(root / "a.png", ns=(1, 1))  # a changed mtime marks it changed, whatever the clock
    (root / "f.bmp").unlink()
    embed.seen = 0
    with pytest.warns(RuntimeWarning):
        again = build_gallery(embed, root, transform, out=out, progress=False)
    assert embed.seen == 2 and again.added == 2
    expected = sorted(["a.png", "b/c.jpg", "b/d/e.png", "g/new.png"])
    assert again.paths == expected and list(again.skipped) == ["b/broken.jpg"]
    np.testing.assert_allclose(
        again.features, _brute_force(embed, root, expected, transform), rtol=1e-5
    )
    with pytest.raises(ValueError, match="other settings"):
        build_gallery(embed, root, transform, out=out, meta={"pooling": "gap"}, progress=False)


def _synthetic_gallery(n: int, d: int, seed: int = 0) -> Gallery:
    """Clustered unit vectors (as image features are), not a uniform sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 20, 1), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return Gallery("", [f"{i}.png" for i in range(n)], x, np.zeros((n, 2), np.int64))


def test_exact_search_is_the_brute_force_ranking() -> None:
    gallery = _synthetic_gallery(500, 16)
    queries = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    result = gallery.search(queries, k=5)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ gallery.features.T
    order = np.argsort(-sims, axis=1)[:, :5]
    np.testing.assert_array_equal(result.indices, order)
    np.testing.assert_allclose(result.scores, np.take_along_axis(sims, order, 1), rtol=1e-5)
    assert result.paths[0] == [f"{i}.png" for i in order[0]]
    assert gallery.index_params == {"type": "exact"}


def test_hnsw_beyond_the_exact_limit_recalls_the_brute_force_neighbours(tmp_path: Path) -> None:
    gallery = _synthetic_gallery(3000, 16)
    gallery.meta = {"exact_limit": 1000, "hnsw": {"M": 16, "ef_construction": 80, "ef_search": 64}}
    params = gallery.index_params
    assert params == {"type": "hnsw", "M": 16, "ef_construction": 80, "ef_search": 64}
    queries = gallery.features[:50] + 0.05
    found = gallery.search(queries, k=10).indices
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(q @ gallery.features.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.95
    import faiss

    assert isinstance(gallery.index(), faiss.IndexHNSWFlat)
    assert gallery.index().hnsw.efSearch == 64
    gallery.save(tmp_path / "g.npz")  # the built graph is stored, with its parameters
    loaded = Gallery.load(tmp_path / "g.npz")
    assert isinstance(loaded._index, faiss.IndexHNSWFlat) and loaded.index_params == params
    np.testing.assert_array_equal(loaded.search(queries, k=10).indices, found)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LCR model.pt on the tiny ResNet at 32 px (random weights, randomised head)."""
    folder = tmp_path_factory.mktemp("run")
    cfg = ExperimentConfig(widths=[8, 8, 16, 16], image_size=32, epochs=0, out_dir=str(folder))
    torch.manual_seed(0)
    model = make_model(cfg)
    head = model.common_rationale.head
    with torch.no_grad():
        head.conv.weight.normal_()
        head.bn.running_mean.normal_()
    save_model(folder / "model.pt", model.state_dict(), cfg.to_dict())
    return folder / "model.pt"


def test_cli_export_embed_search_end_to_end(tmp_path: Path, checkpoint: Path, capsys) -> None:
    images = tmp_path / "images"
    names = [f"c{c}/{i}.png" for c in range(3) for i in range(4)]
    _write_images(images, names, size=40)
    onnx_file = tmp_path / "embedder.onnx"
    main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx_file)])
    printed = capsys.readouterr().out
    assert "layer:      backbone.layer4" in printed and "replaces backbone.avgpool" in printed
    assert "(batch, 3, 32, 32)" in printed and "(batch, 16), L2-normalised" in printed

    gallery_file = tmp_path / "gallery.npz"
    main(["embed", "--checkpoint", str(onnx_file), "--images", str(images)]
         + ["--out", str(gallery_file), "--no-progress"])  # fmt: skip
    gallery = Gallery.load(gallery_file)
    assert gallery.paths == sorted(names) and gallery.meta["pooling"] == "rationale"
    # the ONNX features equal the library's: model(x) with rationale pooling, L2-normalised
    from lcr_lightly.experiments.build import load_model

    model = load_model(ExperimentConfig(widths=[8, 8, 16, 16], image_size=32), checkpoint).eval()
    transform = eval_transform(32, crop=False)
    x = torch.stack([transform(Image.open(images / n).convert("RGB")) for n in sorted(names)])
    with torch.no_grad():
        want = torch.nn.functional.normalize(model(x), dim=1).numpy()
    np.testing.assert_allclose(gallery.features, want, rtol=1e-4, atol=1e-5)

    _write_images(images, ["c0/extra.png"], size=40, seed=3)
    with pytest.raises(SystemExit) as exc:  # an existing gallery is never overwritten silently
        main(["embed", "--checkpoint", str(onnx_file), "--images", str(images)]
             + ["--out", str(gallery_file)])  # fmt: skip
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    main(["embed", "--checkpoint", str(onnx_file), "--images", str(images)]
         + ["--out", str(gallery_file), "--resume", "--no-progress"])  # fmt: skip
    assert "13 images (1 embedded now)" in capsys.readouterr().out

    figure = tmp_path / "fig.png"
    main(["search", "--gallery", str(gallery_file), "--query", str(images / "c1" / "2.png")]
         + ["-k", "3", "--figure", str(figure)])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    ranked = [line.split() for line in lines if line.startswith("    ")]
    assert [r[2] for r in ranked][0] == "c1/2.png" and len(ranked) == 3  # itself first
    assert float(ranked[0][1]) == pytest.approx(1.0, abs=1e-5)
    assert figure.stat().st_size > 0


def test_cli_refusals_are_one_line(tmp_path: Path, checkpoint: Path, capsys) -> None:
    not_model = tmp_path / "x.onnx"
    not_model.write_bytes(b"garbage")
    (tmp_path / "images").mkdir()
    for argv in (
        ["embed", "--checkpoint", str(not_model), "--images", str(tmp_path / "images")]
        + ["--out", str(tmp_path / "g.npz")],
        ["embed", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "none")]
        + ["--out", str(tmp_path / "g.npz")],
        ["search", "--gallery", str(tmp_path / "missing.npz"), "--query", str(tmp_path)],
        ["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_list_images_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    _write_images(tmp_path, ["z.png", "a/b.JPG", ".h/c.png", "a/.d.png"])
    assert list_images(tmp_path) == ["a/b.JPG", "z.png"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_embed_speed_script_prints_both_tables() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, str(root / "benchmarks/embed_speed.py"), "--backbone", "small_resnet"]
        + ["--image-size", "32", "--batch-size", "4", "--repeats", "1", "--no-compile", "--no-onnx"]
        + ["--sizes", "500", "--dim", "16", "--queries", "50"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| exported (eager) |" in res.stdout and "| hooked model(x) |" in res.stdout
    assert "| 500 |" in res.stdout


def test_gallery_index_settings_come_from_meta(tmp_path: Path) -> None:
    import faiss

    _write_images(tmp_path / "im", [f"{i}.png" for i in range(6)])
    meta = {"exact_limit": 3, "hnsw": {"ef_search": 77}}
    gallery = build_gallery(
        CountingEmbed(), tmp_path / "im", eval_transform(16, crop=False),
        out=tmp_path / "g.npz", meta=meta, progress=False,
    )  # fmt: skip
    expected = {"type": "hnsw", "M": 32, "ef_construction": 100, "ef_search": 77}
    assert gallery.index_params == expected
    loaded = Gallery.load(tmp_path / "g.npz")
    assert loaded.index_params == gallery.index_params
    assert isinstance(loaded.index(), faiss.IndexHNSWFlat) and loaded.index().hnsw.efSearch == 77
