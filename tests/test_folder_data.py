"""``dataset: folder``: SSL pretraining on unlabeled images, corrupt files named and skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from lcr_lightly.data import UnlabeledFolder, eval_transform
from lcr_lightly.experiments.cli import main

FLAGS = ["--widths", "8", "8", "16", "16", "--image-size", "32", "--batch-size", "4"]
FLAGS += ["--memory-bank-size", "8", "--no-progress"]


def _write(root: Path, names: List[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / name)


def test_unlabeled_folder_reads_nested_images_and_names_corrupt_ones(tmp_path: Path) -> None:
    _write(tmp_path, ["a.png", "x/b.jpg", "x/y/c.png"])
    (tmp_path / "x" / "bad.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match=r"2 corrupt image\(s\)"):
        data = UnlabeledFolder(tmp_path, transform=eval_transform(32, crop=False))
    assert data.paths == ["a.png", "x/b.jpg", "x/y/c.png"]
    assert sorted(data.skipped) == ["empty.jpg", "x/bad.png"]
    image, label = data[1]
    assert tuple(image.shape) == (3, 32, 32) and label == -1
    # a file that breaks after the scan is replaced by the next image, once named
    (tmp_path / "x" / "b.jpg").write_bytes(b"gone")
    with pytest.warns(RuntimeWarning, match="x/b.jpg"):
        image2, _ = data[1]
    np.testing.assert_array_equal(image2.numpy(), data[2][0].numpy())
    assert "x/b.jpg" in data.skipped


def test_pretrain_on_an_unlabeled_folder_skips_evaluation_or_uses_eval_root(
    tmp_path: Path, capsys
) -> None:
    images = tmp_path / "unlabeled"
    _write(images, [f"{d}/{i}.png" for d in ("p", "q/r") for i in range(4)])
    (images / "q" / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="1 corrupt image"):
        main(["pretrain", "--dataset", "folder", "--data-root", str(images), "--epochs", "1"]
             + FLAGS + ["--out-dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "evaluation skipped: dataset 'folder' has no labels" in printed
    assert (out / "model.pt").is_file()
    assert json.loads((out / "results.json").read_text())["results"] == {}

    labelled = tmp_path / "labelled"
    _write(
        labelled, [f"{s}/{c}/{i}.png" for s in ("train", "test") for c in "ab" for i in range(3)]
    )
    run2 = ["--eval-root", str(labelled), "--out-dir", str(tmp_path / "run2")]
    main(["pretrain", "--dataset", "folder", "--data-root", str(images), "--epochs", "0"]
         + FLAGS + run2)  # fmt: skip
    results = json.loads((tmp_path / "run2" / "results.json").read_text())["results"]
    assert set(results["rationale"]) >= {"rank1", "mAP", "knn", "linear"}

    with pytest.raises(SystemExit) as exc:  # evaluate needs labels: one line, exit 2
        main(["evaluate", "--checkpoint", str(out / "model.pt")])
    assert exc.value.code == 2 and "no labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--dataset", "folder", "--out-dir", str(tmp_path / "run3")])
    assert "data_root" in capsys.readouterr().err
