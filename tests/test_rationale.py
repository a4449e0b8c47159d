"""The LCR module and ``attach``: explicit arguments, and which encoder pools in training."""

import pytest
import torch
from torch import nn

from lcr_lightly import CommonRationale, GradCAMFitLoss, attach, with_common_rationale
from tests import reference as by_hand
from tests.conftest import ToySiamese, tiny_resnet, two_view_batch


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    backbone = tiny_resnet()  # widths (8, 8, 16, 16): layer3 and layer4 give 16 channels
    backbone.fc = nn.Identity()
    return backbone


def test_attach_defaults_to_k32_the_last_stage_and_its_pool():
    backbone = _backbone()
    lcr = attach(backbone)
    assert lcr.head.k == 32 and lcr.head.in_channels == 16
    assert (lcr.layer_name, lcr.pool_name) == ("layer4", "avgpool")
    assert lcr.capture.layer is backbone.layer4 and lcr.pooler.module is backbone.avgpool


def test_attach_uses_the_layer_pool_loss_and_channels_it_is_given():
    backbone = _backbone()
    loss = GradCAMFitLoss(tau=0.7)
    lcr = attach(backbone, k=5, layer="layer3", loss=loss, in_channels=16)
    assert lcr.head.k == 5 and lcr.loss_fn is loss
    assert (lcr.layer_name, lcr.pool_name) == ("layer3", None)  # avgpool consumes layer4
    assert lcr.capture.layer is backbone.layer3
    x = torch.randn(2, 3, 32, 32)
    backbone(x)
    assert lcr.capture.maps[0].shape == (2, 16, 8, 8)  # layer3's map, not layer4's 4x4
    with pytest.raises(ValueError, match=r"^in_channels=12, but layer 'layer4' gives maps"):
        attach(_backbone(), in_channels=12)
    explicit = _backbone()
    lcr = attach(explicit, layer="layer4", pool="avgpool")
    assert lcr.capture.layer is explicit.layer4 and lcr.pooler.module is explicit.avgpool
    # The dry forward runs 64 px; the small-input stem makes layer4 stride 8: 8x8 maps.
    with pytest.raises(ValueError, match=r"^The pool 'avgpool' consumes \(2, 16, 8, 8\), not"):
        attach(_backbone(), layer="layer3", pool="avgpool")


def test_rationale_pooling_message_names_the_layer_and_what_to_do():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    lcr = attach(backbone, layer="0", in_channels=4)  # an explicit layer, no pool module
    with pytest.raises(ValueError) as err:
        lcr.set_pooling("rationale")
    assert str(err.value) == (
        "Rationale pooling needs a global average pooling module that consumes the output of "
        "'0', and none does (the backbone pools functionally or tokens). Pass pool=<dotted "
        "name or module>, or pool features yourself with common_rationale.head.pool(feature_map)."
    )


@pytest.mark.parametrize("in_training", [False, True])
def test_without_copies_the_online_pool_pools_in_training_from_the_first_call(in_training):
    x = torch.randn(4, 3, 32, 32)
    backbone = _backbone()
    lcr = attach(backbone, k=4, pool_in_training=in_training)
    backbone.train()
    with torch.no_grad():
        pooled, (fmap,) = _outputs_of(backbone.layer4, lambda: backbone(x))
    expected = lcr.head.pool(fmap) if in_training else fmap.mean(dim=(2, 3))
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(lcr.head.pool(fmap), fmap.mean(dim=(2, 3)))


def test_an_unnamed_layer_and_pool_are_named_after_their_class():
    lcr = CommonRationale(nn.Conv2d(3, 4, 3), in_channels=4, pool=nn.AdaptiveAvgPool2d(1))
    assert (lcr.layer_name, lcr.pool_name) == ("Conv2d", "AdaptiveAvgPool2d")
    assert lcr.sites[0].encoder == "" and lcr.sites[0].online  # built on a bare backbone
    assert (lcr.pool_names, lcr.pooling) == (["AdaptiveAvgPool2d"], "rationale")
    lcr = CommonRationale(nn.Conv2d(3, 4, 3), in_channels=4)
    assert (lcr.layer_name, lcr.pool_name, lcr.pooling) == ("Conv2d", None, "gap")


def test_a_layer_without_a_map_is_named_by_its_dotted_name_when_it_runs():
    layer = nn.Linear(4, 4)
    lcr = CommonRationale(layer, in_channels=4, layer_name="encoder.fc")
    with pytest.raises(ValueError) as err:
        layer(torch.randn(2, 4))
    assert str(err.value) == (
        "The captured layer 'encoder.fc' produced a 2-D output of shape (2, 4); LCR needs a "
        "4-D map (B, C, H, W). Choose a convolutional stage with layer=..., or pass "
        "reshape=tokens_to_map for ViT tokens."
    )
    assert lcr.capture.outputs == []  # nothing recorded: the next step starts clean


class WholeBackboneIsTheLayer(ToySiamese):
    """The backbone is one conv giving the map; the model pools it functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, x):
        return self.backbone(x).mean(dim=(2, 3))


def test_a_layer_that_is_the_whole_encoder_is_named_after_the_encoder():
    model = with_common_rationale(WholeBackboneIsTheLayer(), k=4, layer="backbone")
    lcr = model.common_rationale
    assert (lcr.layer_name, lcr.pool_name) == ("backbone", None)
    assert lcr.capture.layer is model.backbone


class TwoTrainableCopies(ToySiamese):
    """A teacher copy that requires grad but never reaches the loss (frozen in practice)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = tiny_resnet()
        self.teacher.fc = nn.Identity()

    def training_step(self, batch, batch_idx):
        (x0, _), _ = batch
        with torch.no_grad():
            self.teacher(x0)  # the teacher runs, without gradient
        return super().training_step(batch, batch_idx)


def test_after_the_first_step_only_the_online_encoder_pools_in_training():
    torch.manual_seed(0)
    model = with_common_rationale(TwoTrainableCopies(), k=4, pool_in_training=True)
    lcr = model.common_rationale
    assert not lcr.online_decided  # both encoders could be online at wrap time
    x = torch.randn(4, 3, 32, 32)
    seen = {}
    model.teacher.layer4.register_forward_hook(lambda m, a, out: seen.update(teacher=out))
    with torch.no_grad():  # until then only the first candidate may pool in training
        torch.testing.assert_close(model.teacher(x), seen["teacher"].mean(dim=(2, 3)))
    model.training_step(two_view_batch(), 0)
    assert lcr.online_decided and lcr.layer_name == "backbone.layer4"
    x = torch.randn(4, 3, 32, 32)
    model.train()
    maps = {}
    for name in ("backbone", "teacher"):
        getattr(model, name).layer4.register_forward_hook(
            lambda m, a, out, n=name: maps.update({n: out})
        )
    with torch.no_grad():
        online, teacher = model.backbone(x), model.teacher(x)
    torch.testing.assert_close(online, lcr.head.pool(maps["backbone"]))  # pool_in_training
    torch.testing.assert_close(teacher, maps["teacher"].mean(dim=(2, 3)))  # copies: GAP
    model.eval()
    with torch.no_grad():  # in eval mode every copy pools with the head
        torch.testing.assert_close(model.teacher(x), lcr.head.pool(maps["teacher"]))


def _outputs_of(layer: nn.Module, run):
    """``run()``'s result and every output ``layer`` gave meanwhile (our own hook)."""
    outputs = []
    handle = layer.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        return run(), outputs
    finally:
        handle.remove()


def _reference_kls(lcr, layer: nn.Module, run_loss, reshape=None):
    """Per-view KLs by hand: own hook, autograd GradCAM in float32, head and loss by hand."""
    loss, outputs = _outputs_of(layer, run_loss)
    grads = torch.autograd.grad(loss, outputs, retain_graph=True)
    if reshape is not None:
        outputs, grads = [reshape(t) for t in outputs], [reshape(g) for g in grads]
    cams = [torch.relu((f.float() * g.float()).sum(dim=1)) for f, g in zip(outputs, grads)]
    return loss, [by_hand.kl_term(lcr, f, c) for f, c in zip(outputs, cams)]


def _two_view_loss(encode):
    (x0, x1), _ = two_view_batch(b=4)
    z0, z1 = encode(x0), encode(x1)
    return -nn.functional.cosine_similarity(z0, z1.flip(0)).mean() + z0.pow(2).mean()


@pytest.mark.parametrize("views", ["all", "first"])
def test_views_option_fits_every_view_or_only_the_first_on_one_encoder(views):
    torch.manual_seed(0)
    backbone = _backbone()
    lcr = attach(backbone, k=4, views=views)
    loss, kls = _reference_kls(lcr, backbone.layer4, lambda: _two_view_loss(backbone))
    assert len(kls) == 2 and not torch.allclose(kls[0], kls[1])
    expected = kls[0] if views == "first" else (kls[0] + kls[1]) / 2
    torch.testing.assert_close(lcr.kl_term(loss), expected)


@pytest.mark.parametrize("views", ["all", "first"])
def test_views_option_holds_while_the_loss_path_picks_the_online_encoder(views):
    torch.manual_seed(0)
    model = with_common_rationale(TwoTrainableCopies(), k=4, views=views)
    lcr = model.common_rationale
    assert not lcr.online_decided  # kl_term takes the branch that asks the loss path

    def run_loss():
        with torch.no_grad():
            model.teacher(two_view_batch(b=4)[0][0])
        return _two_view_loss(model.backbone)

    loss, kls = _reference_kls(lcr, model.backbone.layer4, run_loss)
    expected = kls[0] if views == "first" else (kls[0] + kls[1]) / 2
    torch.testing.assert_close(lcr.kl_term(loss), expected)
    assert lcr.online_decided and lcr.layer_name == "backbone.layer4"


class BothCopiesInTheLoss(TwoTrainableCopies):
    def training_step(self, batch, batch_idx):
        (x0, x1), _ = batch
        return -nn.functional.cosine_similarity(self.backbone(x0), self.teacher(x1)).mean()


def test_kl_term_messages_name_the_hooked_layers():
    torch.manual_seed(0)
    model = with_common_rationale(BothCopiesInTheLoss(), k=4)
    lcr = model.common_rationale
    with pytest.raises(RuntimeError) as err:
        model.training_step(two_view_batch(b=4), 0)
    assert str(err.value) == (
        "The SSL loss depends on the feature maps of several encoders ('backbone.layer4', "
        "'teacher.layer4'); LCR trains one head on the online encoder. Freeze the "
        "momentum/teacher encoder (requires_grad=False or torch.no_grad) or pass layer=."
    )
    with pytest.raises(RuntimeError) as err:
        lcr.kl_term(torch.ones((), requires_grad=True))  # nothing captured
    assert str(err.value) == (
        "LCR captured no feature map with gradient at 'backbone.layer4' or 'teacher.layer4' "
        "during this training step. The hooked layer must be on the online (gradient) path "
        "of the SSL loss and the model must be in training mode; pass layer=<name> if the "
        "backbone attribute is a momentum encoder."
    )


def test_attach_hands_a_custom_token_reshape_to_the_capture():
    from tests.clients import tiny_timm_vit

    torch.manual_seed(0)
    vit = tiny_timm_vit("avg")

    def two_by_eight(tokens):  # 16 patch tokens as a 2x8 map (not the automatic 4x4)
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, 2, 8)

    lcr = attach(vit, k=4, layer="blocks.1", reshape=two_by_eight)
    x = torch.randn(2, 3, 32, 32)
    loss, (kl,) = _reference_kls(lcr, vit.blocks[1], lambda: vit(x).pow(2).sum(), two_by_eight)
    lcr.record = True
    torch.testing.assert_close(lcr.kl_term(loss), kl)
    assert lcr.last_step.head_maps[0].shape == (2, 2, 8)


def test_the_head_reads_its_channels_off_a_custom_reshape():
    from tests.clients import tiny_timm_vit

    def half_the_channels(tokens):  # 16 patch tokens, the first 16 of 32 dims, as 4x4
        return tokens[:, 1:, :16].transpose(1, 2).reshape(tokens.shape[0], 16, 4, 4)

    lcr = attach(tiny_timm_vit("avg"), k=4, layer="blocks.1", reshape=half_the_channels)
    assert lcr.head.in_channels == 16


class ImagesAndMask(nn.Module):
    """A backbone whose forward takes images and a mask: the dry forward cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _backbone()

    def forward(self, x, mask):
        return self.net(x * mask)


def test_without_a_dry_forward_an_explicit_layer_pool_and_channels_are_enough():
    from lcr_lightly.trace import DryForwardError

    backbone = ImagesAndMask()
    lcr = attach(backbone, k=4, layer="net.layer4", pool="net.avgpool", in_channels=16)
    assert (lcr.layer_name, lcr.pool_name, lcr.head.in_channels) == (
        "net.layer4",
        "net.avgpool",
        16,
    )
    assert lcr.capture.layer is backbone.net.layer4 and lcr.pooler.module is backbone.net.avgpool
    x = torch.randn(2, 3, 32, 32)
    loss, (kl,) = _reference_kls(
        lcr, backbone.net.layer4, lambda: backbone(x, torch.ones_like(x)).pow(2).sum()
    )
    torch.testing.assert_close(lcr.kl_term(loss), kl)
    lcr = attach(ImagesAndMask(), k=4, layer="net.layer4", in_channels=16)
    assert (lcr.pool_name, lcr.pooling) == (None, "gap")  # no pool inferred
    for missing in (dict(layer="net.layer4"), dict(in_channels=16)):
        with pytest.raises(DryForwardError, match=r"^The dry forward of ImagesAndMask "):
            attach(ImagesAndMask(), k=4, **missing)


def test_attach_puts_the_head_on_the_backbone_device():
    lcr = attach(_backbone().to("meta"), layer="layer4", pool="avgpool", in_channels=16)
    assert {p.device.type for p in lcr.parameters()} == {"meta"}


def test_a_bfloat16_backbone_gets_a_bfloat16_head_and_trains_it():
    torch.manual_seed(0)
    backbone = _backbone().to(torch.bfloat16)
    lcr = attach(backbone, k=4)
    assert {p.dtype for p in lcr.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    loss, (kl,) = _reference_kls(lcr, backbone.layer4, lambda: backbone(x).float().pow(2).sum())
    # the hand head rounds in bfloat16 at other steps than nn.BatchNorm2d (8 bits: ~0.4 %)
    torch.testing.assert_close(lcr.kl_term(loss), kl, rtol=2e-2, atol=0)
    model = with_common_rationale(ToySiamese().to(torch.bfloat16), k=4)
    assert {p.dtype for p in model.common_rationale.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("channels", [1, 16])
def test_one_image_and_a_one_channel_map_give_the_hand_kl(channels):
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, channels, 3, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    lcr = attach(backbone, k=4)
    assert (lcr.layer_name, lcr.head.in_channels) == ("1", channels)
    x = torch.randn(1, 3, 32, 32)  # batch size 1
    loss, (kl,) = _reference_kls(lcr, backbone[1], lambda: backbone(x).pow(2).sum())
    torch.testing.assert_close(lcr.kl_term(loss), kl)


class IntegerTableFirst(nn.Module):
    """A backbone whose first parameter is a frozen integer lookup table."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.arange(4), requires_grad=False)
        self.net = _backbone()

    def forward(self, x):
        return self.net(x)


def test_an_integer_first_parameter_leaves_the_head_in_float32():
    lcr = attach(IntegerTableFirst(), k=4)
    assert {p.dtype for p in lcr.parameters()} == {torch.float32}


def test_common_rationale_defaults_are_the_papers():
    backbone = _backbone()
    lcr = CommonRationale(backbone.layer4, in_channels=16)
    # K = 32, nu = 0.01, gradient of the KL into the backbone, every view (paper, Sec. 3)
    assert (lcr.head.k, lcr.weight, lcr.detach_features, lcr.views) == (32, 0.01, False, "all")
    assert (lcr.gradcam_mode, lcr.nonfinite) == ("elementwise", "error")
    assert not lcr.pool_in_training


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [
        ("gradcam_mode", "pixel", "('elementwise', 'channel')"),
        ("views", "second", "('all', 'first')"),
        ("nonfinite", "ignore", "('error', 'skip')"),
    ],
)
def test_unknown_choices_are_named(option, value, choices):
    with pytest.raises(ValueError) as err:
        attach(_backbone(), **{option: value})
    assert str(err.value) == f"Unknown {option}={value!r}; expected one of {choices}."


def test_kl_term_messages_for_maps_off_the_loss_path_and_single_positions():
    torch.manual_seed(0)
    backbone = _backbone()
    lcr = attach(backbone, k=4)
    backbone(torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError) as err:
        lcr.kl_term(torch.ones((), requires_grad=True) * 2)  # a loss without the map
    assert str(err.value) == (
        "The SSL loss does not depend on any feature map captured at 'layer4': the hooked "
        "layer is not on the path from the online views to the loss. Pass layer=<name> of the "
        "online encoder."
    )
    small = torch.randn(3, 3, 4, 4)  # 4 px: layer4 gives a 1x1 map
    loss = backbone(small).pow(2).sum()
    with pytest.warns(RuntimeWarning) as record:
        kl = lcr.kl_term(loss)
    assert kl == 0 and lcr.batch_size == 3
    assert [str(w.message) for w in record] == [
        "LCR: the feature map at 'layer4' is 1x1 (shape (3, 16, 1, 1)): with one position both "
        "softmaxes are 1, the KL is exactly 0 and the head learns nothing. Use larger inputs "
        "(a stride-32 backbone needs >= 64 px)."
    ]


def test_non_finite_gradcam_message_names_what_to_do():
    backbone = _backbone()
    lcr = attach(backbone, k=4, nonfinite="skip")
    loss = backbone(torch.randn(2, 3, 32, 32)).sum() * float("inf")
    with pytest.warns(RuntimeWarning) as record:
        kl = lcr.kl_term(loss)
    assert kl == 0 and [str(w.message) for w in record] == [
        "LCR: the GradCAM of the SSL loss is not finite (NaN or inf). Lower the learning rate, "
        "check the inputs, or pass nonfinite='skip' to drop such terms with a warning. Skipped."
    ]


@pytest.mark.parametrize("copies", [False, True])
def test_channel_gradcam_mode_reaches_the_kl_on_one_or_several_encoders(copies):
    torch.manual_seed(0)
    model = with_common_rationale(TwoTrainableCopies() if copies else ToySiamese(), k=4)
    lcr = model.common_rationale
    lcr.gradcam_mode = "channel"
    assert lcr.online_decided is not copies
    x = two_view_batch(b=4)[0][0]
    _, feats = _outputs_of(model.backbone.layer4, lambda: model.backbone(x))
    # a loss on the map itself, weighted by position: there the two GradCAM modes differ
    weights = torch.linspace(-1.0, 2.0, feats[0][0, 0].numel()).reshape(feats[0].shape[-2:])
    loss = (feats[0] * weights).sum()
    (grad,) = torch.autograd.grad(loss, feats, retain_graph=True)
    channel = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feats[0]).sum(dim=1))
    elementwise = torch.relu((grad * feats[0]).sum(dim=1))
    assert not torch.allclose(channel, elementwise)
    expected = by_hand.kl_term(lcr, feats[0], channel)
    torch.testing.assert_close(lcr.kl_term(loss), expected)


def test_a_copy_that_runs_with_gradient_outside_the_loss_is_ignored():
    torch.manual_seed(0)
    model = with_common_rationale(TwoTrainableCopies(), k=4)
    lcr = model.common_rationale
    (x0, x1), _ = two_view_batch(b=4)
    model.teacher(x1)  # with gradient, but the loss never sees it
    loss, kls = _reference_kls(lcr, model.backbone.layer4, lambda: _two_view_loss(model.backbone))
    torch.testing.assert_close(lcr.kl_term(loss), (kls[0] + kls[1]) / 2)
    assert lcr.layer_name == "backbone.layer4"


@pytest.mark.parametrize("detach_features", [False, True])
def test_the_kl_reaches_the_backbone_unless_features_are_detached(detach_features):
    torch.manual_seed(0)
    backbone = _backbone()
    lcr = attach(backbone, k=4, detach_features=detach_features)
    loss = _two_view_loss(backbone)
    kl = lcr.kl_term(loss)
    grads = torch.autograd.grad(kl, list(backbone.layer4.parameters()), allow_unused=True)
    reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert reached is not detach_features


def test_the_step_record_times_the_kl_term_and_names_the_head_width():
    import time

    backbone = _backbone()
    lcr = attach(backbone, k=4, head_hidden=6)
    lcr.record = True
    loss = _two_view_loss(backbone)
    before = time.perf_counter()
    lcr.kl_term(loss)
    elapsed = time.perf_counter() - before
    assert 0 < lcr.last_step.seconds <= elapsed
    assert lcr.head.extra_repr() == "in_channels=16, k=4, normalize='image', hidden_channels=6"


def test_attach_passes_the_head_options_and_checks_the_loss():
    assert attach(_backbone(), k=4, normalize="batch").head.normalize == "batch"
    with pytest.raises(TypeError) as err:
        attach(_backbone(), loss=nn.MSELoss())
    assert str(err.value) == "loss must be a GradCAMFitLoss, not MSELoss."


class TeacherInBackbone(ToySiamese):
    """DINO's layout: ``backbone`` runs without gradient, the loss goes through ``student``."""

    def __init__(self) -> None:
        super().__init__()
        self.student = tiny_resnet()
        self.student.fc = nn.Identity()

    def forward(self, x):
        return self.student(x)

    def training_step(self, batch, batch_idx):
        (x0, _), _ = batch
        with torch.no_grad():
            self.backbone(x0)
        return super().training_step(batch, batch_idx)


def test_the_first_step_moves_the_encoder_on_the_loss_path_first_and_stops_the_other():
    torch.manual_seed(0)
    model = with_common_rationale(TeacherInBackbone(), k=4)
    lcr = model.common_rationale
    assert [(s.encoder, s.online) for s in lcr.sites] == [("backbone", True), ("student", True)]
    hooks_before = len(model.backbone.layer4._forward_hooks)
    model.training_step(two_view_batch(), 0)
    assert [(s.encoder, s.online) for s in lcr.sites] == [("student", True), ("backbone", False)]
    assert lcr.layer is model.student.layer4 and lcr.capture.layer is model.student.layer4
    assert len(lcr.captures) == 2 and lcr.captures[1] is None
    assert len(model.backbone.layer4._forward_hooks) == hooks_before - 1  # its capture removed
    assert lcr.pool_names == ["student.avgpool", "backbone.avgpool"]
    # the next steps read the student's maps only
    lcr.record = True
    model.training_step(two_view_batch(), 0)
    assert len(lcr.last_step.maps) == 2  # the student's two views


def test_of_finds_the_module_of_a_wrapped_model_and_names_an_unwrapped_one():
    model = with_common_rationale(ToySiamese(), k=4)
    lcr = model.common_rationale
    assert CommonRationale.of(model) is lcr and CommonRationale.of(lcr) is lcr
    assert CommonRationale.find(ToySiamese()) is None
    unrelated = nn.Module()
    unrelated.common_rationale = nn.Linear(1, 1)  # the name alone does not make it LCR's
    assert CommonRationale.find(unrelated) is None
    with pytest.raises(ValueError) as err:
        CommonRationale.of(nn.Linear(1, 1))
    assert str(err.value) == (
        "Linear is not wrapped with with_common_rationale (no 'common_rationale' submodule)."
    )


def test_a_loss_of_several_elements_is_named_in_the_message():
    backbone = _backbone()
    lcr = attach(backbone, k=4)
    losses = torch.stack([_two_view_loss(backbone), _two_view_loss(backbone)])
    with pytest.raises(TypeError) as err:
        lcr.kl_term(losses)
    assert str(err.value) == (
        "kl_term's ssl_loss returned a loss of shape (2,); LCR needs a scalar (or one element)."
    )


def test_the_step_is_timed_only_when_recording(monkeypatch):
    # `clock` waits for the device (CUDA sync); an unrecorded step must not pay for it.
    import lcr_lightly.rationale as rationale_module

    calls = []
    monkeypatch.setattr(rationale_module, "clock", lambda t: calls.append(t) or 0.0)
    backbone = _backbone()
    lcr = attach(backbone, k=4)
    lcr.kl_term(_two_view_loss(backbone))
    assert calls == []
    lcr.record = True
    lcr.kl_term(_two_view_loss(backbone))
    assert len(calls) == 2


def test_with_views_first_gradcam_runs_on_the_first_view_only(monkeypatch):
    # The official BYOL script computes GradCAM of view 1 only: view 2's backward is saved.
    import lcr_lightly.rationale as rationale_module

    sizes, original = [], rationale_module.gradcam

    def counting_gradcam(loss, outputs, **kwargs):
        sizes.append(len(outputs))
        return original(loss, outputs, **kwargs)

    monkeypatch.setattr(rationale_module, "gradcam", counting_gradcam)
    backbone = _backbone()
    lcr = attach(backbone, k=4, views="first")
    assert lcr.online_decided  # one encoder: nothing to decide
    lcr.kl_term(_two_view_loss(backbone))
    assert sizes == [1]


def test_place_like_a_parameter_free_backbone_leaves_the_head_as_it_is():
    lcr = attach(_backbone(), k=4)
    lcr.place_like(nn.Identity())
    assert lcr.head.conv.weight.dtype == torch.float32
