import numpy as np
import pytest
import torch

from lcr_lightly.eval import (
    energy_inside,
    keypoint_masks,
    localization_report,
    mask_area,
    pointing_game,
)


def test_pointing_game_hand_case():
    maps = torch.zeros(3, 2, 2)
    maps[0, 0, 0] = 1  # inside
    maps[1, 1, 1] = 1  # outside
    maps[2, 0, 1] = 1  # empty mask: left out
    masks = torch.zeros(3, 2, 2)
    masks[0, 0, 0] = masks[1, 0, 0] = 1
    assert pointing_game(maps, masks) == 0.5


def test_maps_are_resized_to_masks():
    maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # top-right quadrant
    masks = torch.zeros(1, 8, 8)
    masks[0, :4, 4:] = 1
    assert pointing_game(maps, masks) == 1.0
    masks2 = torch.zeros(1, 8, 8)
    masks2[0, 4:, :4] = 1
    assert pointing_game(maps, masks2) == 0.0


def test_energy_inside_matches_explicit_sum():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 5, 5)) - 0.2
    masks = (rng.random((4, 5, 5)) > 0.6).astype(np.float32)
    expected = []
    for m, k in zip(np.clip(maps, 0, None), masks):
        expected.append((m * k).sum() / m.sum())
    assert energy_inside(maps, masks) == pytest.approx(float(np.mean(expected)), rel=1e-5)
    assert mask_area(masks) == pytest.approx(float(masks.mean()))


def test_keypoint_masks_and_report():
    masks = keypoint_masks([[(2.0, 3.0)], []], (6, 6), radius=1.0)
    assert masks[0, 3, 2] == 1 and masks[0, 3, 3] == 1 and masks[0, 0, 0] == 0
    assert masks[1].sum() == 0
    report = localization_report(torch.rand(1, 6, 6), masks[:1])
    assert set(report) == {"pointing", "energy", "chance"}
    assert report["chance"] == pytest.approx(float(masks[0].mean()))
    with pytest.raises(ValueError, match="empty"):
        pointing_game(torch.rand(1, 6, 6), masks[1:])


def test_constant_maps_are_misses_wherever_the_mask_is():
    masks = torch.zeros(4, 4, 4)
    masks[0, 0, 0] = 1  # the top-left pixel, where argmax of a constant map lands
    masks[1, 2:, 2:] = 1
    masks[2, :2, :] = 1
    masks[3, 1, 1] = 1
    maps = torch.zeros(4, 4, 4)
    maps[1] = 3.0
    maps[2] = -1.0
    maps[3, 1, 1] = 0.5  # a real peak inside its mask
    assert pointing_game(maps, masks) == 0.25
    full = torch.ones(1, 4, 4)  # even a mask covering the image: a constant map points nowhere
    assert pointing_game(torch.zeros(1, 2, 2), full) == 0.0


def test_nan_maps_are_refused():
    masks = torch.zeros(3, 4, 4)
    masks[:, 0, 0] = 1
    maps = torch.rand(3, 4, 4)
    maps[1, 2, 2] = float("nan")
    maps[2, 0, 1] = float("inf")
    for metric in (pointing_game, energy_inside, localization_report):
        with pytest.raises(
            ValueError, match=r"maps has 2 of 3 images with NaN or inf values \(images 1, 2\)"
        ):
            metric(maps, masks)
    with pytest.raises(ValueError, match="maps has 1 of 1 images"):
        pointing_game(np.full((1, 4, 4), np.nan), masks[:1])
