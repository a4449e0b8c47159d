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
