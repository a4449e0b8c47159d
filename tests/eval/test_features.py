import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lcr_lightly import set_pooling, with_common_rationale
from lcr_lightly.eval import extract_features
from tests.conftest import ToySiamese


def test_both_poolings_in_one_pass_match_model_outputs():
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    x = torch.randn(10, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.arange(10)), batch_size=4)
    out = extract_features(model, loader, return_maps=True, progress=False)
    model.eval()
    with torch.no_grad():
        set_pooling(model, "gap")
        gap = model(x)
        set_pooling(model, "rationale")
        rat = model(x)
    torch.testing.assert_close(out["gap"], gap)
    torch.testing.assert_close(out["rationale"], rat)
    assert out["labels"].tolist() == list(range(10))
    assert out["rationale_map"].shape == (10, 4, 4) and out["norm_map"].shape == (10, 4, 4)
    assert (
        model.common_rationale.pooling == "rationale" and model.common_rationale.capture.maps == []
    )


def test_unwrapped_model_gives_gap_only():
    model = ToySiamese()
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4)), batch_size=2)
    assert extract_features(model, loader, poolings=("gap",), progress=False)["gap"].shape == (
        4,
        16,
    )
    with pytest.raises(ValueError, match="not wrapped"):
        extract_features(model, loader, progress=False)
    with pytest.raises(ValueError, match="Unknown pooling"):
        extract_features(model, loader, poolings=("max",), progress=False)


def test_features_are_extracted_without_autograd():
    from torch.utils.data import DataLoader, TensorDataset

    from lcr_lightly import with_common_rationale
    from tests.conftest import ToySiamese

    model = with_common_rationale(ToySiamese(), k=4)
    x = torch.randn(4, 3, 32, 32)
    feats = extract_features(
        model, DataLoader(TensorDataset(x, torch.arange(4))), ("gap", "rationale"), progress=False
    )
    assert not feats["gap"].requires_grad and not feats["rationale"].requires_grad


def test_a_vit_dino_forward_runs_the_teacher_whose_tokens_are_pooled():
    from tests.clients import DINOViTClient, multi_crop_batch, train_steps

    torch.manual_seed(0)
    model = with_common_rationale(DINOViTClient(), k=4)
    batch = multi_crop_batch()
    train_steps(model, batch, steps=1)  # the step decides: the student is online
    lcr = model.common_rationale
    assert lcr.layer_name == "student_backbone.vit.blocks.0"
    x = batch[0][0]
    feats = extract_features(
        model,
        DataLoader(TensorDataset(x, torch.arange(len(x))), batch_size=len(x)),
        ("gap", "rationale", "norm"),
        return_maps=True,
        progress=False,
    )
    tokens = []  # the teacher's tokens at the same block, by the test's own hook
    handle = model.backbone.vit.blocks[0].register_forward_hook(lambda m, a, o: tokens.append(o))
    model.eval()
    with torch.no_grad():
        gap = model(x)
    handle.remove()
    assert len(tokens) == 1
    t = tokens[0][:, 1:]  # drop the class token: 4x4 patches of 32 channels
    fmap = t.transpose(1, 2).reshape(len(x), 32, 4, 4)
    torch.testing.assert_close(feats["gap"], gap)
    torch.testing.assert_close(feats["rationale"], lcr.head.pool(fmap))
    torch.testing.assert_close(feats["norm_map"], fmap.norm(dim=1))
