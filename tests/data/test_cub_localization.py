import numpy as np
import pytest
import torch
from PIL import Image

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
