import pytest
import timm
import torch
import torchvision

from lcr_lightly import FeatureCapture, gradcam, tokens_to_map, with_common_rationale
from lcr_lightly.resolve import find_feature_path
from lcr_lightly.tokens import find_token_layer
from tests.clients import ViTSiamese, tiny_timm_vit
from tests.conftest import loader, quiet_trainer, two_view_batch


def test_detects_timm_lightly_and_torchvision_vits():
    avg = tiny_timm_vit("avg")
    found = find_token_layer(avg)
    assert (found.name, found.width, found.reshape.num_prefix_tokens) == ("blocks.1", 32, 1)
    assert found.reshape.grid == (4, 4)  # timm's patch_embed.grid_size at 32 px, 8 px patches
    token = tiny_timm_vit("token")
    assert find_token_layer(token)[0] == "blocks.0"  # class-token pooling: block before last
    from lightly.models.modules import MaskedVisionTransformerTIMM

    lightly_vit = MaskedVisionTransformerTIMM(vit=tiny_timm_vit("token"))
    assert find_token_layer(lightly_vit)[0] == "vit.blocks.0"
    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    name, layer, width, reshape = find_token_layer(tv)
    assert (name, width, reshape.num_prefix_tokens) == ("encoder.layers.encoder_layer_0", 32, 1)
    assert dict(tv.named_modules())[name] is layer
    assert find_token_layer(torchvision.models.resnet18()) is None


def test_vit_gradcam_on_token_maps_matches_manual():
    torch.manual_seed(0)
    vit = tiny_timm_vit("avg")
    x = torch.randn(2, 3, 32, 32)
    with FeatureCapture(vit.blocks[1], reshape=lambda t: tokens_to_map(t, 1)) as cap:
        loss = vit(x).pow(2).sum()
        (cam,) = gradcam(loss, cap.outputs, reshape=cap.reshape)
        tokens = cap.outputs[0]
    (grad,) = torch.autograd.grad(loss, tokens, retain_graph=True)
    expected = (tokens[:, 1:] * grad[:, 1:]).sum(-1).clamp(min=0).reshape(2, 4, 4)
    torch.testing.assert_close(cam, expected)
    assert cam.shape == (2, 4, 4) and cam.sum() > 0


def test_tiny_vit_trains_two_steps_wrapped():
    torch.manual_seed(0)
    model = with_common_rationale(ViTSiamese(tiny_timm_vit("token")), k=4)
    lcr = model.common_rationale
    assert lcr.capture.layer is model.backbone.blocks[0] and lcr.head.in_channels == 32
    assert lcr.pooler is None and lcr.pooling == "gap"
    out = model.training_step(two_view_batch(), 0)
    assert out.dim() == 0
    trainer = quiet_trainer(max_steps=2)
    before = lcr.head.conv.weight.detach().clone()
    trainer.fit(model, loader())
    assert trainer.global_step == 2 and not torch.equal(before, lcr.head.conv.weight)
    assert torch.isfinite(trainer.callback_metrics["train_lcr_kl"])


@pytest.mark.parametrize(("class_token", "reg_tokens", "prefix"), [(True, 4, 5), (False, 0, 0)])
def test_prefix_tokens_of_the_vit_are_dropped_from_the_map(class_token, reg_tokens, prefix):
    torch.manual_seed(0)
    vit = tiny_timm_vit("avg", class_token=class_token, reg_tokens=reg_tokens)
    path = find_feature_path(vit)
    assert (path.layer_name, path.layout, path.map_shape) == (
        "blocks.1",
        "tokens",
        (2, 32, 4, 4),  # the dry forward runs the declared 32 px: 4x4 patches of 8 px
    )
    tokens = torch.randn(2, prefix + 16, 32)
    expected = tokens[:, prefix:].transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(path.reshape(tokens), expected)


def test_a_conv_layer_inside_a_vit_is_a_map_and_a_flat_output_is_refused():
    vit = tiny_timm_vit("avg")
    path = find_feature_path(vit, layer="patch_embed.proj")  # the patchifying conv
    assert (path.map_shape, path.layout, path.reshape, path.pool) == (
        (2, 32, 4, 4),
        "NCHW",
        None,
        None,
    )
    with pytest.raises(ValueError) as err:
        find_feature_path(vit, layer="fc_norm")  # pooled tokens (B, C)
    assert str(err.value) == (
        "Layer 'fc_norm' of VisionTransformer returns shape (2, 32); LCR needs a (B, C, H, W) "
        "map. Choose a convolutional stage, or pass reshape= for token outputs of a backbone "
        "that is not a recognised ViT."
    )


def test_a_vit_on_a_non_square_grid_is_read_on_its_declared_grid():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(32, 64),
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=0,
        global_pool="avg",
    )
    path = find_feature_path(vit)
    assert (path.layout, path.map_shape) == ("tokens", (2, 32, 4, 8))  # 32/8 x 64/8 patches
    tokens = torch.randn(2, 1 + 32, 32)
    # token i of the patch sequence sits at row i // 8, column i % 8 (timm's raster order)
    expected = torch.stack([tokens[:, 1 + i] for i in range(32)], dim=-1).reshape(2, 32, 4, 8)
    torch.testing.assert_close(path.reshape(tokens), expected)
