import numpy as np
import pytest
import torch

from lcr_lightly.data import SyntheticFineGrained, fine_grained_classes


def test_deterministic_per_seed_and_split():
    a = SyntheticFineGrained(num_classes=3, images_per_class=2, image_size=48, seed=3)
    b = SyntheticFineGrained(num_classes=3, images_per_class=2, image_size=48, seed=3, cache=False)
    c = SyntheticFineGrained(num_classes=3, images_per_class=2, image_size=48, seed=4)
    t = SyntheticFineGrained(num_classes=3, images_per_class=2, image_size=48, seed=3, split="test")
    for i in range(6):
        sa, sb = a.sample(i), b.sample(i)
        assert np.array_equal(np.asarray(sa["image"]), np.asarray(sb["image"]))
        assert np.array_equal(sa["part_mask"], sb["part_mask"])
        assert not np.array_equal(np.asarray(sa["image"]), np.asarray(c.sample(i)["image"]))
        assert not np.array_equal(np.asarray(sa["image"]), np.asarray(t.sample(i)["image"]))
    assert a.targets == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("size", [32, 96])
def test_masks_align_with_drawn_parts(size):
    ds = SyntheticFineGrained(num_classes=5, images_per_class=4, image_size=size, seed=0)
    for i in range(len(ds)):
        s = ds.sample(i)
        image = np.asarray(s["image"]).astype(np.float32)
        part, obj = s["part_mask"].astype(bool), s["object_mask"].astype(bool)
        assert part.any() and obj.any()
        assert not (part & ~obj).any()  # parts lie on the object
        assert part.mean() < 0.10  # both parts together under 10 % of the image
        for x, y in s["part_centers"]:  # keypoints fall on the part mask
            yy, xx = int(round(y - 0.5)), int(round(x - 0.5))
            window = part[max(yy - 1, 0) : yy + 2, max(xx - 1, 0) : xx + 2]
            assert window.any()
        close = np.linalg.norm(image - np.array(s["part_color"], dtype=np.float32), axis=2) < 60
        body_only = obj & ~part
        # the part colour is drawn inside the part mask, not on the rest of the body
        assert close[part].mean() > 0.1
        assert close[body_only].mean() < 0.05


def _colour_features(ds):
    feats = []
    for i in range(len(ds)):
        img = np.asarray(ds.sample(i)["image"]).astype(np.float32) / 255
        hist = [
            np.histogram(img[..., c], bins=8, range=(0, 1))[0] / img[..., c].size for c in range(3)
        ]
        feats.append(np.concatenate([img.mean((0, 1)), img.std((0, 1)), *hist]))
    return np.array(feats)


def test_classes_are_not_separable_from_colour_statistics():
    kw = dict(num_classes=5, images_per_class=40, image_size=32, seed=0)
    train, test = SyntheticFineGrained(**kw), SyntheticFineGrained(split="test", **kw)
    xtr, xte = _colour_features(train), _colour_features(test)
    ytr, yte = np.array(train.targets), np.array(test.targets)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(5)])
    pred = ((xte[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = (pred == yte).mean()
    # chance is 0.2; 200 test images give a standard error of about 0.03
    assert accuracy < 0.32, accuracy


def test_generic_variant_and_classes():
    g = SyntheticFineGrained(num_classes=8, images_per_class=1, image_size=32, variant="generic")
    assert g.classes[0] == "star" and g.sample(0)["part_centers"] == []
    assert g.sample(3)["object_mask"].any()
    pairs = fine_grained_classes(25)
    assert len(set(pairs)) == 25
    assert len({m for m, _ in pairs[:5]}) == 5 and len({t for _, t in pairs[:5]}) == 5


def test_getitem_and_errors():
    ds = SyntheticFineGrained(num_classes=2, images_per_class=1, image_size=32, return_masks=True)
    image, label, obj, part = ds[1]
    assert label == 1 and obj.shape == part.shape == (32, 32)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticFineGrained(image_size=16)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticFineGrained(num_classes=30)
    with pytest.raises(ValueError, match="variant"):
        SyntheticFineGrained(variant="coarse")
    with pytest.raises(IndexError):
        ds.sample(5)


def test_with_transform_gives_the_same_samples_under_another_transform():
    from torchvision.transforms import functional as TF

    plain = SyntheticFineGrained(num_classes=2, images_per_class=2, image_size=32)
    tensors = plain.with_transform(TF.to_tensor)
    assert len(tensors) == len(plain) and tensors.targets == plain.targets
    for i in range(len(plain)):
        image, label = plain[i]
        assert torch.equal(tensors[i][0], TF.to_tensor(image)) and tensors[i][1] == label
    assert plain.transform is None  # the original keeps its own transform
