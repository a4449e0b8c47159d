import numpy as np
import pytest
import torch
from PIL import Image

from lcr_lightly.data import CUB200, DatasetNotFoundError, SyntheticFineGrained, export_cub_layout
from lcr_lightly.data.fgvc import CUBLocalization
from lcr_lightly.data.transforms import eval_geometry, eval_transform


@pytest.mark.parametrize(
    "width, height, size",
    [(50, 37, 32), (37, 50, 32), (123, 77, 48), (60, 91, 40), (45, 45, 32), (300, 200, 64)],
)
def test_eval_geometry_follows_the_transform(width, height, size):
    rng = np.random.default_rng(width * height + size)
    tf = eval_transform(size)
    g = eval_geometry(width, height, size)
    margin = int(np.ceil(max(g.scale_x, g.scale_y, 1.0))) + 1  # the blob's reach
    checked = 0
    while checked < 6:
        x, y = int(rng.integers(width)), int(rng.integers(height))
        mx, my = g.point(x, y)
        col, row = round(mx), round(my)
        if not (margin <= col < size - margin and margin <= row < size - margin):
            continue  # cut off, or too near the edge for a whole blob
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[y, x] = 255
        out = tf(Image.fromarray(pixels))[0]
        assert out.shape == (size, size)
        # the pixel nearest the mapped position holds the peak (halves may tie with a neighbour)
        assert torch.isclose(out[row, col], out.max()), (x, y, mx, my)
        # and the blob (a symmetric resampling filter) is centred on it
        blob = (out - out.min()).double()
        rows, cols = torch.meshgrid(
            torch.arange(size).double(), torch.arange(size).double(), indexing="ij"
        )
        centre = ((blob * cols).sum() / blob.sum(), (blob * rows).sum() / blob.sum())
        assert abs(centre[0] - mx) < 0.05 and abs(centre[1] - my) < 0.05, (centre, mx, my)
        checked += 1


def test_eval_geometry_box_is_clipped_to_the_crop():
    g = eval_geometry(100, 50, 32)  # short side 50 -> 37, long 74; crop from (21, 2)
    assert (g.scale_x, g.scale_y, g.left, g.top) == (0.74, 0.74, 21, 2)
    x0, y0, x1, y1 = g.box(0, 0, 100, 50)
    assert (x0, y0, x1, y1) == (0.0, 0.0, 32.0, 32.0)
    with pytest.raises(ValueError):
        eval_geometry(0, 10, 32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    kw = dict(num_classes=3, images_per_class=2, image_size=48, seed=3)
    train, test = SyntheticFineGrained(**kw), SyntheticFineGrained(split="test", **kw)
    root = export_cub_layout([train, test], tmp_path_factory.mktemp("cub") / "CUB", progress=False)
    return root, test


def test_cub_localization_masks_follow_the_synthetic_set(exported):
    root, synthetic = exported
    ds = CUBLocalization(CUB200(root, "test"), image_size=32)
    assert ds.part_radius == 2.0 and len(ds) == len(synthetic) and ds.targets == synthetic.targets
    # by hand: Resize(round(32 * 8 / 7) = 37) of 48 px, CenterCrop(32) from (37 - 32) / 2
    # = 2.5, which torchvision rounds to 2 (half to even)
    s, off = 37 / 48, 2
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    for i in range(len(ds)):
        image, label, obj, part = ds[i]
        sample = synthetic.sample(i)
        assert image.shape == (3, 32, 32) and obj.shape == part.shape == (32, 32)
        assert label == sample["label"]
        assert torch.allclose(image, eval_transform(32)(sample["image"]), atol=1e-6)
        centres = [
            ((x + 0.5) * s - 0.5 - off, (y + 0.5) * s - 0.5 - off)
            for x, y in sample["part_centers"]
        ]
        far = torch.ones(32, 32, dtype=torch.bool)
        for cx, cy in centres:
            assert part[round(cy), round(cx)] == 1
            far &= (grid[1] - cx) ** 2 + (grid[0] - cy) ** 2 > (2.0 + 1.0) ** 2
        assert part[far].sum() == 0 and part[~far].sum() > 0
        # the object mask is the synthetic object mask's box, mapped and clipped
        x, y, w, h = sample["bbox"]
        cols = (torch.arange(32) + 0.5 >= x * s - off) & (
            torch.arange(32) + 0.5 < (x + w) * s - off
        )
        rows = (torch.arange(32) + 0.5 >= y * s - off) & (
            torch.arange(32) + 0.5 < (y + h) * s - off
        )
        assert torch.equal(obj.bool(), rows[:, None] & cols[None, :])
        # and covers the synthetic object mask put through the same resize and crop
        seg = eval_transform(32).transforms[:2]
        mask = np.asarray(seg[1](seg[0](Image.fromarray(sample["object_mask"] * 255)))) > 160
        assert mask.any() and not (mask & ~obj.numpy().astype(bool)).any()


def test_cub_localization_needs_boxes_and_parts(exported, tmp_path):
    import shutil

    root, _ = exported
    copy = tmp_path / "CUB"
    shutil.copytree(root, copy)
    (copy / "parts" / "part_locs.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="parts/part_locs.txt"):
        CUBLocalization(CUB200(copy, "test"), 32)
    (copy / "bounding_boxes.txt").write_text("")
    with pytest.raises(DatasetNotFoundError, match="bounding_boxes.txt and parts/part_locs.txt"):
        CUBLocalization(CUB200(copy, "test"), 32)
