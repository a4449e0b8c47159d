import torch

import lcr_lightly.eval
from lcr_lightly.data.masks import box_mask, keypoint_masks


def test_box_mask_holds_the_pixels_whose_centre_is_inside():
    box = (1.2, 0.5, 4.5, 3.0)  # x0, y0, x1, y1 in continuous pixel coordinates
    mask = box_mask(box, 6)
    expected = torch.zeros(6, 6, dtype=torch.uint8)
    for row in range(6):
        for col in range(6):
            cx, cy = col + 0.5, row + 0.5
            expected[row, col] = int(box[0] <= cx < box[2] and box[1] <= cy < box[3])
    assert mask.dtype == torch.uint8 and torch.equal(mask, expected)
    assert int(expected.sum()) == 3 * 3  # columns 1-3, rows 0-2 (centres 0.5, 1.5, 2.5)


def test_box_mask_clips_a_box_beyond_the_image():
    assert torch.equal(box_mask((-3.0, -3.0, 10.0, 10.0), 4), torch.ones(4, 4, dtype=torch.uint8))
    assert not box_mask((4.0, 0.0, 9.0, 4.0), 4).any()


def test_the_evaluation_package_shares_the_data_layer_masks():
    assert lcr_lightly.eval.keypoint_masks is keypoint_masks
