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


# by hand, for the 48-px synthetic images at image_size 32: Resize(round(32 * 8 / 7) = 37),
# CenterCrop(32) from (37 - 32) / 2 = 2.5, which torchvision rounds to 2 (half to even)
S, OFF = 37 / 48, 2
GRID = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))


def _by_hand(sample, radius=2.0):
    """Mapped part centres, the mapped box mask and the part disks of a synthetic sample."""
    centres = [
        ((round(x, 1) + 0.5) * S - 0.5 - OFF, (round(y, 1) + 0.5) * S - 0.5 - OFF)
        for x, y in sample["part_centers"]
    ]
    x, y, w, h = sample["bbox"]
    pix = torch.arange(32) + 0.5
    cols = (pix >= x * S - OFF) & (pix < (x + w) * S - OFF)
    rows = (pix >= y * S - OFF) & (pix < (y + h) * S - OFF)
    part = torch.zeros(32, 32, dtype=torch.bool)
    for cx, cy in centres:
        part |= (GRID[1] - cx) ** 2 + (GRID[0] - cy) ** 2 <= radius**2
    return centres, rows[:, None] & cols[None, :], part


def test_cub_localization_masks_follow_the_synthetic_set(exported):
    root, synthetic = exported
    ds = CUBLocalization(CUB200(root, "test"), image_size=32)
    assert ds.part_radius == 2.0 and len(ds) == len(synthetic) and ds.targets == synthetic.targets
    for i in range(len(ds)):
        image, label, obj, part = ds[i]
        sample = synthetic.sample(i)
        assert image.shape == (3, 32, 32) and obj.shape == part.shape == (32, 32)
        assert label == sample["label"]
        assert torch.allclose(image, eval_transform(32)(sample["image"]), atol=1e-6)
        centres, box, _ = _by_hand(sample)
        far = torch.ones(32, 32, dtype=torch.bool)
        for cx, cy in centres:
            assert part[round(cy), round(cx)] == 1
            far &= (GRID[1] - cx) ** 2 + (GRID[0] - cy) ** 2 > (2.0 + 1.0) ** 2
        assert part[far].sum() == 0 and part[~far].sum() > 0
        # the object mask is the synthetic object mask's box, mapped and clipped
        assert torch.equal(obj.bool(), box)
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


def test_pipeline_evaluates_cub_localization(exported, tmp_path):
    from lcr_lightly.experiments.build import make_data, make_model
    from lcr_lightly.experiments.config import ExperimentConfig
    from lcr_lightly.experiments.evaluate import evaluate

    root, synthetic = exported
    cfg = ExperimentConfig(
        dataset="cub",
        data_root=str(root),
        image_size=32,
        widths=[8, 8, 16, 16],
        batch_size=4,
        memory_bank_size=8,
        epochs=0,
        progress=False,
        out_dir=str(tmp_path),
    )
    data = make_data(cfg)
    assert data.masks and isinstance(data.test_eval, CUBLocalization)
    results = evaluate(make_model(cfg), data, cfg)
    loc = results["localization"]
    for name in ("norm", "rationale"):
        for mask in ("object", "part"):
            assert 0.0 <= loc[f"{name}_{mask}_pointing"] <= 1.0
            assert 0.0 <= loc[f"{name}_{mask}_energy"] <= 1.0
    hand = [_by_hand(synthetic.sample(i)) for i in range(len(synthetic))]
    assert loc["chance_object"] == pytest.approx(np.mean([b.float().mean() for _, b, _ in hand]))
    assert loc["chance_part"] == pytest.approx(np.mean([p.float().mean() for _, _, p in hand]))
    assert 0 < loc["chance_part"] < loc["chance_object"] < 1
    # without part keypoints (or on a validation split) there is nothing to localise against
    (root / "parts" / "part_locs.txt").rename(root / "parts" / "away.txt")
    try:
        assert not make_data(cfg).masks
    finally:
        (root / "parts" / "away.txt").rename(root / "parts" / "part_locs.txt")
    assert not make_data(ExperimentConfig(**{**cfg.to_dict(), "eval_split": "val"})).masks
