import pickle

import numpy as np
import pytest
from PIL import Image

from lcr_lightly.data import (
    CUB200,
    DatasetNotFoundError,
    SyntheticFineGrained,
    UnreadableImageError,
    cifar100,
    export_cub_layout,
    fgvc_aircraft,
    image_folder,
    stanford_cars,
)


def _jpg(path, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def _truncate(path):
    """Cuts an image file in half (as an interrupted copy does) and returns its path."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _refuses_by_name(dataset, index, path):
    with pytest.raises(UnreadableImageError) as exc:
        dataset[index]
    message = str(exc.value)
    assert message.startswith(f"unreadable image {path} (") and "\n" not in message, message
    assert message.endswith("; replace or remove the file")


def test_cub_official_format(tmp_path):
    root = tmp_path / "CUB_200_2011"
    _jpg(root / "images/001.Black_footed_Albatross/a.jpg")
    _jpg(root / "images/002.Laysan_Albatross/b.jpg")
    _jpg(root / "images/002.Laysan_Albatross/c.jpg")
    (root / "images.txt").write_text(
        "1 001.Black_footed_Albatross/a.jpg\n"
        "2 002.Laysan_Albatross/b.jpg\n"
        "3 002.Laysan_Albatross/c.jpg\n"
    )
    (root / "image_class_labels.txt").write_text("1 1\n2 2\n3 2\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (root / "bounding_boxes.txt").write_text("1 1.0 2.0 5.0 6.0\n2 0 0 3 3\n3 1 1 2 2\n")
    (root / "parts").mkdir()
    (root / "parts/part_locs.txt").write_text("1 1 3.0 4.0 1\n1 2 0.0 0.0 0\n3 1 5.0 5.0 1\n")
    train = CUB200(root, split="train")
    assert len(train) == 2 and train.targets == [0, 1]
    image, label = train[1]
    assert isinstance(image, Image.Image) and label == 1
    assert train.bbox(0) == (1.0, 2.0, 5.0, 6.0)
    assert train.parts(0) == [(1, 3.0, 4.0)] and len(train.parts(0, visible_only=False)) == 2
    assert train.classes[1] == "002.Laysan_Albatross"
    assert CUB200(root, split="test").targets == [1]
    bad = _truncate(root / "images/002.Laysan_Albatross/c.jpg")
    _refuses_by_name(train, 1, bad)


def test_cub_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LCR_CUB_ROOT", raising=False)
    monkeypatch.delenv("LCR_DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError, match="LCR_CUB_ROOT"):
        CUB200()
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        CUB200(tmp_path / "nowhere")
    root = tmp_path / "cub"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"expected images.txt at .*images.txt"):
        CUB200(root)
    (root / "images.txt").write_text("1\n")
    (root / "image_class_labels.txt").write_text("1 1\n")
    (root / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(DatasetNotFoundError, match="malformed line 1"):
        CUB200(root)
    (root / "images.txt").write_text("1 x/a.jpg\n")
    with pytest.raises(DatasetNotFoundError, match="image files"):
        CUB200(root)
    monkeypatch.setenv("LCR_DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="CUB_200_2011 does not exist"):
        CUB200()


def test_synthetic_export_reads_back_through_cub_loader(tmp_path, monkeypatch):
    kw = dict(num_classes=3, images_per_class=2, image_size=32, seed=1)
    train, test = SyntheticFineGrained(**kw), SyntheticFineGrained(split="test", **kw)
    root = export_cub_layout([train, test], tmp_path / "CUB_200_2011", progress=False)
    monkeypatch.setenv("LCR_CUB_ROOT", str(root))
    cub_train, cub_test = CUB200(split="train"), CUB200(split="test")
    assert cub_train.targets == train.targets and cub_test.targets == test.targets
    image, _ = cub_train[3]
    assert np.array_equal(np.asarray(image), np.asarray(train.sample(3)["image"]))
    expected = [
        (k + 1, round(x, 1), round(y, 1))
        for k, (x, y) in enumerate(train.sample(3)["part_centers"])
    ]
    assert [(p, round(x, 1), round(y, 1)) for p, x, y in cub_train.parts(3)] == expected
    x, y, w, h = cub_train.bbox(3)
    assert (x, y, w, h) == tuple(float(v) for v in train.sample(3)["bbox"])
    seg = np.asarray(Image.open(root / "part_masks" / cub_train.samples[3][1])) > 0
    assert np.array_equal(seg, train.sample(3)["part_mask"].astype(bool))


def test_aircraft_torchvision_layout(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    _jpg(data / "images/0001.jpg")
    _jpg(data / "images/0002.jpg")
    (data / "variants.txt").write_text("707-320\nA300B4\n")
    (data / "images_variant_trainval.txt").write_text("0001 707-320\n0002 A300B4\n")
    ds = fgvc_aircraft(tmp_path, split="trainval")
    assert len(ds) == 2 and ds[1][1] == 1
    _refuses_by_name(ds, 0, _truncate(data / "images/0001.jpg"))
    with pytest.raises(DatasetNotFoundError, match="images_variant"):
        fgvc_aircraft(tmp_path, split="test")


def test_stanford_cars_torchvision_layout(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    _jpg(base / "cars_train/00001.jpg")
    _jpg(base / "cars_train/00002.jpg")
    annos = np.array([("00001.jpg", 1), ("00002.jpg", 2)], dtype=[("fname", "O"), ("class", "O")])
    savemat(base / "devkit/cars_train_annos.mat", {"annotations": annos})
    savemat(
        base / "devkit/cars_meta.mat",
        {"class_names": np.array(["AM General", "Acura"], dtype=object)},
    )
    ds = stanford_cars(tmp_path, split="train")
    assert len(ds) == 2 and ds[0][1] == 0 and ds[1][1] == 1
    _refuses_by_name(ds, 1, _truncate(base / "cars_train/00002.jpg"))
    with pytest.raises(DatasetNotFoundError, match="Stanford Cars"):
        stanford_cars(tmp_path, split="test")


def test_cifar100_python_format(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 5), ("test", 3)):
        batch = {
            "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            "fine_labels": list(range(n)),
            "coarse_labels": [0] * n,
        }
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    ds = cifar100(tmp_path, split="train")
    assert len(ds) == 5 and ds[3][1] == 3 and ds[0][0].size == (32, 32)
    assert len(cifar100(tmp_path, split="test")) == 3
    with pytest.raises(DatasetNotFoundError, match="CIFAR-100"):
        cifar100(tmp_path / "cifar-100-python")


def test_image_folder(tmp_path):
    _jpg(tmp_path / "a/1.jpg")
    _jpg(tmp_path / "b/2.jpg")
    ds = image_folder(tmp_path)
    assert len(ds) == 2 and ds[1][1] == 1
    (tmp_path / "b/3.jpg").write_bytes(b"")  # an empty file
    _refuses_by_name(image_folder(tmp_path), 2, tmp_path / "b/3.jpg")
    shared = image_folder(tmp_path, classes=["a", "b"])
    _refuses_by_name(shared, 0, _truncate(tmp_path / "a/1.jpg"))
    with pytest.raises(DatasetNotFoundError):
        image_folder(tmp_path / "missing")


def _class_folders(root, names):
    for n, name in enumerate(names):
        _jpg(root / name / f"{n}.jpg", color=(n * 40, 0, 0))


def test_image_folder_splits_share_the_training_classes(tmp_path):
    _class_folders(tmp_path / "train", ["ant", "bee", "cat"])
    _class_folders(tmp_path / "test", ["ant", "cat"])  # no bee in the test split
    train = image_folder(tmp_path / "train")
    test = image_folder(tmp_path / "test", classes=train.classes)
    assert train.classes == test.classes == ["ant", "bee", "cat"]
    assert test.class_to_idx == {"ant": 0, "bee": 1, "cat": 2}
    # the cat image keeps label 2 (a split-local class list would give it 1)
    assert [label for _, label in test] == [0, 2]
    assert test.targets == [0, 2]


def test_image_folder_refuses_classes_unknown_to_training(tmp_path):
    _class_folders(tmp_path / "train", ["ant", "bee"])
    _class_folders(tmp_path / "test", ["ant", "dog", "eel"])
    with pytest.raises(ValueError, match="2 class folder.*lack: dog, eel"):
        image_folder(tmp_path / "test", classes=image_folder(tmp_path / "train").classes)
    with pytest.raises(ValueError, match="duplicate"):
        image_folder(tmp_path / "train", classes=["ant", "ant", "bee"])


def test_pipeline_imagefolder_labels_match_across_splits(tmp_path):
    from lcr_lightly.experiments.build import make_data
    from lcr_lightly.experiments.config import ExperimentConfig

    _class_folders(tmp_path / "train", ["ant", "bee", "cat"])
    _class_folders(tmp_path / "test", ["ant", "cat"])
    data = make_data(ExperimentConfig(dataset="imagefolder", data_root=str(tmp_path)))
    assert data.num_classes == 3
    assert [data.test_eval[i][1] for i in range(len(data.test_eval))] == [0, 2]
    _class_folders(tmp_path / "test", ["ant", "dog"])
    with pytest.raises(ValueError, match="lack: dog"):
        make_data(ExperimentConfig(dataset="imagefolder", data_root=str(tmp_path)))


def test_val_split_of_real_data_is_carved_from_train_and_held_out_of_ssl(tmp_path):
    from lcr_lightly.experiments.build import make_data
    from lcr_lightly.experiments.config import ExperimentConfig

    for n in range(10):  # 10 images of each of 2 classes, all distinct
        _jpg(tmp_path / "train/ant" / f"{n}.jpg", color=(n * 20, 0, 0))
        _jpg(tmp_path / "train/bee" / f"{n}.jpg", color=(0, n * 20, 0))
    _class_folders(tmp_path / "test", ["ant", "bee"])
    data = make_data(
        ExperimentConfig(dataset="imagefolder", data_root=str(tmp_path), eval_split="val")
    )
    files = lambda ds: {ds.dataset.samples[i][0] for i in ds.indices}  # noqa: E731
    val, ssl, train = files(data.test_eval), files(data.ssl_train), files(data.train_eval)
    assert len(val) == 2 and len(ssl) == len(train) == 18  # one image per class held out
    assert not val & ssl and ssl == train
    assert all("/train/" in path for path in val)  # the test split is not used
    assert sorted(data.test_eval[i][1] for i in range(2)) == [0, 1]
