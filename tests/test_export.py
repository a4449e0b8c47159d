"""The hook-free embedder: same output as the hooked model, and it traces, exports, compiles."""

from __future__ import annotations

import copy
from typing import Any, Dict

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lcr_lightly import (
    FeatureCapture,
    attach,
    count_hooks,
    export_embedder,
    load_embedder,
    save_embedder,
    set_pooling,
    with_common_rationale,
)
from lcr_lightly.export import ExportError
from tests.clients import (
    DINOClient,
    DINOViTClient,
    SimSiamClient,
    features_dim,
    multi_crop_batch,
    timm_factory,
    tiny_resnet_backbone,
    tiny_timm_vit,
    torchvision_factory,
    torchvision_vit,
    train_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# name: (backbone factory, input side, pools with a module)
FAMILIES: Dict[str, Any] = {
    "timm/resnet10t": (timm_factory("resnet10t"), 64, True),
    "timm/mobilenetv3_small_050": (timm_factory("mobilenetv3_small_050"), 64, True),
    "timm/efficientnet_lite0": (timm_factory("efficientnet_lite0"), 64, True),
    "timm/convnext_atto": (timm_factory("convnext_atto"), 64, True),
    "torchvision/resnet18": (torchvision_factory("resnet18", "fc"), 64, True),
    "torchvision/mobilenet_v3_small": (
        torchvision_factory("mobilenet_v3_small", "classifier"),
        64,
        True,
    ),
    "timm/vit(avg)": (lambda: tiny_timm_vit(global_pool="avg"), 32, False),
    "timm/vit(token)": (lambda: tiny_timm_vit(global_pool="token"), 32, False),
    "torchvision/vit": (torchvision_vit, 32, False),
}


def _randomise_head(model: nn.Module) -> None:
    """A trained-looking head: the rationale map is far from constant."""
    head = model.common_rationale.head
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.conv.weight.normal_(generator=g)
        head.bn.running_mean.normal_(generator=g)
        head.bn.running_var.uniform_(0.5, 2.0, generator=g)


def _hand_rationale_pool(head: nn.Module, fmap: Tensor) -> Tensor:
    """The paper's pooling written out: A = max_k ReLU(BN(conv(F))); A' min-max; mean(A' F)."""
    z = nn.functional.conv2d(fmap, head.conv.weight)
    bn = head.bn
    z = (z - bn.running_mean[None, :, None, None]) / torch.sqrt(
        bn.running_var[None, :, None, None] + bn.eps
    ) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    a = z.clamp(min=0).amax(dim=1)
    flat = a.flatten(1)
    low, high = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    a = (a - low) / (high - low + 1e-7)
    return (fmap * a[:, None]).sum(dim=(2, 3)) / (fmap.shape[2] * fmap.shape[3])


def _wrapped(name: str) -> Any:
    build, size, pooled = FAMILIES[name]
    torch.manual_seed(0)
    backbone = build()
    model = with_common_rationale(SimSiamClient(backbone, features_dim(backbone, size)), k=4)
    _randomise_head(model)
    return model.eval(), size, pooled


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_equals_the_hooked_model(name: str) -> None:
    model, size, pooled = _wrapped(name)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    rationale = export_embedder(model, "rationale", normalize=False)
    gap = export_embedder(model, "gap", normalize=False)
    normalized = export_embedder(model, "rationale")
    with torch.no_grad():
        got, got_gap, got_norm = rationale(x), gap(x), normalized(x)
        set_pooling(model, "gap")
        want_gap = model(x).flatten(1)
        if pooled:  # the hook replaces the pool: model(x) itself is rationale-pooled
            set_pooling(model, "rationale")
            want = model(x).flatten(1)
            # eager mode runs the same operations in the same order: bit for bit
            assert torch.equal(got, want)
        else:  # token maps: the head's pooling of the tapped block's patch tokens
            lcr = model.common_rationale
            with FeatureCapture(
                lcr.capture.layer, lcr.capture.reshape, training_only=False, require_grad=False
            ) as tap:
                model(x)
                fmap = tap.maps[-1]
            want = _hand_rationale_pool(lcr.head, fmap)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_gap, want_gap)
    # the rationale really weighs positions (relative: untrained features can be tiny)
    assert (got - got_gap).norm() > 1e-3 * got_gap.norm()
    torch.testing.assert_close(got_norm, want / want.norm(dim=1, keepdim=True))
    assert rationale.info.out_dim == want.shape[1] and rationale.info.pooling == "rationale"
    assert (rationale.info.pool is not None) == pooled
    # plain modules: no forward hook anywhere, nothing shared with the training wrapper
    for embedder in (rationale, gap):
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in embedder.modules())
        assert not {id(p) for p in embedder.parameters()} & {id(p) for p in model.parameters()}


def test_export_of_a_conv_backbone_matches_the_hand_formula() -> None:
    model, size, _ = _wrapped("timm/resnet10t")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)
        want = _hand_rationale_pool(model.common_rationale.head, fmap)
        got = export_embedder(model, "rationale", normalize=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dino_teacher_is_exported_with_the_head_trained_on_the_student() -> None:
    torch.manual_seed(0)
    model = with_common_rationale(DINOClient(), k=4)
    model.on_train_start()
    batch = multi_crop_batch()
    train_steps(model, batch)
    _randomise_head(model)
    with torch.no_grad():  # teacher and student differ, as after EMA updates
        for p in model.student_backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    embedder = export_embedder(model, "rationale", normalize=False)
    assert embedder.info.encoder == "backbone" and embedder.info.pool == "backbone.avgpool"
    x = batch[0][0]
    model.eval()
    set_pooling(model, "rationale")
    with torch.no_grad():
        assert torch.equal(embedder(x), model(x).flatten(1))
        student = _hand_rationale_pool(
            model.common_rationale.head, _layer4(model.student_backbone, x)
        )
        teacher = _hand_rationale_pool(model.common_rationale.head, _layer4(model.backbone, x))
    torch.testing.assert_close(embedder(x), teacher, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(embedder(x), student, atol=1e-3)


def _layer4(resnet: nn.Module, x: Tensor) -> Tensor:
    with FeatureCapture(resnet.layer4, training_only=False, require_grad=False) as tap:
        resnet(x)
        return tap.maps[-1]


def test_functional_attach_backbone_is_exported_with_its_rationale() -> None:
    torch.manual_seed(0)
    backbone = tiny_resnet_backbone().eval()
    lcr = attach(backbone, k=4)
    _randomise_head(nn.ModuleDict({"common_rationale": lcr}))
    lcr.eval()  # the reference below runs the head's BN on running statistics
    embedder = export_embedder(backbone, "rationale", normalize=False, rationale=lcr, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _hand_rationale_pool(lcr.head, _layer4(backbone, x))
        torch.testing.assert_close(embedder(x), want, rtol=1e-5, atol=1e-6)


def _small_model() -> nn.Module:
    model = with_common_rationale(SimSiamClient(tiny_resnet_backbone(), 16), k=4)
    _randomise_head(model)
    return model.eval()


def test_trace_export_and_compile_keep_the_output_and_a_dynamic_batch() -> None:
    model = _small_model()
    embedder = export_embedder(model, "rationale", input_size=32)
    x2, x5 = torch.randn(2, 3, 32, 32), torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = embedder(x5)
        traced = torch.jit.trace(embedder, x2)
        torch.testing.assert_close(traced(x5), want)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(embedder, (x2,), dynamic_shapes={"images": {0: batch}})
        torch.testing.assert_close(program.module()(x5), want)
        # fullgraph: no graph break, i.e. nothing hidden in hooks or Python side effects
        compiled = torch.compile(embedder, backend="aot_eager", fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(x5), want)


@pytest.mark.parametrize("name", ["timm/vit(token)", "torchvision/vit"])
def test_vit_token_export_traces_exports_and_runs_on_onnxruntime(tmp_path, name: str) -> None:
    model, size, _ = _wrapped(name)
    embedder = export_embedder(model, "rationale")
    x, x3 = torch.randn(2, 3, size, size), torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = embedder(x3)
        program = torch.export.export(embedder, (x,))
        torch.testing.assert_close(program.module()(x3[:2]), want[:2])
        torch.testing.assert_close(torch.jit.trace(embedder, x)(x3), want)
    save_embedder(embedder, tmp_path / "vit.onnx", "onnx")
    torch.testing.assert_close(load_embedder(tmp_path / "vit.onnx")(x3), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt"])
def test_saved_files_give_the_same_features(tmp_path, fmt: str) -> None:
    model = _small_model()
    embedder = export_embedder(model, "rationale", input_size=32)
    path = tmp_path / f"embedder.{fmt}"
    save_embedder(embedder, path, fmt, meta={"transform": {"image_size": 32, "crop": False}})
    loaded = load_embedder(path)
    assert loaded.meta["pooling"] == "rationale" and loaded.meta["out_dim"] == 16
    assert loaded.meta["transform"] == {"image_size": 32, "crop": False}
    x = torch.randn(7, 3, 32, 32)  # another batch size than the export's example
    set_pooling(model, "rationale")
    with torch.no_grad():
        want = nn.functional.normalize(model(x).flatten(1), dim=1)
    got = loaded(x)
    assert got.shape == (7, 16)
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    if fmt == "onnx":  # really onnxruntime, not torch
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(out, want.numpy(), rtol=1e-4, atol=1e-5)


def test_refusals_name_the_problem() -> None:
    plain = SimSiamClient(tiny_resnet_backbone(), 16)
    with pytest.raises(ExportError, match="not wrapped"):
        export_embedder(plain, "rationale")
    gap = export_embedder(plain, "gap", input_size=32)  # an unwrapped model exports GAP
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gap(x), nn.functional.normalize(plain.eval()(x), dim=1))
    backbone = (
        tiny_resnet_backbone().eval()
    )  # a plain backbone (no training step) is its own encoder
    with torch.no_grad():
        want = backbone(x)
        assert torch.equal(export_embedder(backbone, "gap", normalize=False)(x), want)

    class Projected(SimSiamClient):
        def forward(self, x: Tensor) -> Tensor:
            return self.projection(self.backbone(x).flatten(1))

    projected = with_common_rationale(Projected(tiny_resnet_backbone(), 16), k=4)
    with pytest.raises(ExportError, match="projection head"):
        export_embedder(projected, "rationale", input_size=32)
    with pytest.raises(ValueError, match="pooling"):
        export_embedder(projected, "max")


def test_export_leaves_the_model_as_it_was() -> None:
    model = _small_model().train()
    hooks = count_hooks(model)
    state = copy.deepcopy(model.state_dict())
    export_embedder(model, "rationale", input_size=32)
    assert model.training and count_hooks(model) == hooks
    assert model.common_rationale.pooling == "rationale"
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_vit_fx_cannot_cut_is_refused_for_rationale_and_exports_gap() -> None:
    torch.manual_seed(0)
    model = with_common_rationale(DINOViTClient(), k=4)  # lightly's ViT, dynamic_img_size
    with pytest.raises(ExportError, match="torch.fx cannot trace"):
        export_embedder(model, "rationale")
    gap = export_embedder(model, "gap", normalize=False)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(gap(x), model(x).flatten(1))


def test_missing_onnx_extra_is_one_line(monkeypatch):
    import sys

    from lcr_lightly.export import require_onnx

    for name in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
        with pytest.raises(ExportError, match=rf"^ONNX files need the package '{name}', from the"):
            require_onnx(name)
