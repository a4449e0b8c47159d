"""Results carry commit, versions and the initial weights' hash, never an absolute path."""

import hashlib
import json
import subprocess
from pathlib import Path

import torch

from lcr_lightly.experiments.provenance import display_path, provenance
from lcr_lightly.models.pretrained import imagenet_weights_file

ASSET = Path("lcr_lightly/assets/init_small_resnet_w16_64px.pth")


def test_record_names_commit_versions_and_weights_hash(monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    record = provenance(ASSET)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert record["commit"].removesuffix("-dirty") == head.strip()
    assert record["versions"]["torch"] == torch.__version__.split("+")[0]  # no local tag
    assert record["weights"] == {
        "name": str(ASSET),
        "sha256": hashlib.sha256((root / ASSET).read_bytes()).hexdigest(),
    }


def test_imagenet_weights_are_the_published_file():
    """EfficientNet-PyTorch names its files after the first 8 hex digits of their SHA-256."""
    record = provenance("imagenet", backbone="efficientnet_lite0")
    path = imagenet_weights_file("efficientnet_lite0")
    prefix = path.stem.rsplit("-", 1)[-1]
    assert record["weights"]["sha256"].startswith(prefix) and len(prefix) == 8
    assert record["weights"]["name"] == f"imagenet ({path.name})"


def test_no_absolute_path_is_recorded(tmp_path, monkeypatch):
    weights = tmp_path / "elsewhere" / "w.pth"
    weights.parent.mkdir()
    torch.save({}, weights)
    monkeypatch.chdir(Path(__file__).resolve().parent)  # weights outside the working dir
    assert display_path(weights) == "w.pth"
    text = json.dumps(provenance(weights))
    assert str(tmp_path) not in text and "/w.pth" not in text
