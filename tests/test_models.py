import pytest
import torch
from lightly.utils.benchmarking import OnlineLinearClassifier

from lcr_lightly import count_hooks, with_common_rationale
from lcr_lightly.models import BYOL, METHODS, MoCoV2, SimCLR, SimSiam, build_backbone, split_views
from lcr_lightly.models.backbones import SmallResNet, load_backbone_weights
from tests.conftest import loader, quiet_trainer, tiny_resnet

SMALL = {
    "mocov2": dict(memory_bank_size=32, hidden_dim=16, out_dim=8),
    "byol": dict(hidden_dim=16, out_dim=8),
    "simsiam": dict(proj_dim=16, pred_hidden_dim=8),
    "simclr": dict(hidden_dim=16, out_dim=8),
}


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_fits_two_steps(name, wrapped):
    torch.manual_seed(0)
    model = METHODS[name](backbone=tiny_resnet(), batch_size=8, num_classes=4, **SMALL[name])
    if wrapped:
        model = with_common_rationale(model, k=4)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, loader())
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"])
    assert ("train_lcr_kl" in metrics) == wrapped
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    assert changed
    model.eval()
    with torch.no_grad():
        feats = model(torch.randn(3, 3, 32, 32))
    assert feats.shape == (3, model.feature_dim)
    # momentum encoders' maps are never captured; their pool is rationale-pooled in eval
    if hasattr(model, "momentum_backbone"):
        momentum = model.momentum_backbone
        assert count_hooks(momentum) == count_hooks(momentum.avgpool) == int(wrapped)


def test_forward_features_work_with_lightly_online_classifier():
    model = SimSiam(backbone=tiny_resnet(), batch_size=4, **SMALL["simsiam"])
    feats = model(torch.randn(4, 3, 32, 32))
    clf = OnlineLinearClassifier(feature_dim=model.feature_dim, num_classes=3, topk=(1,))
    loss, log = clf.training_step((feats, torch.tensor([0, 1, 2, 0])), 0)
    assert torch.isfinite(loss) and "train_online_cls_top1" in log


def test_hyperparameter_defaults_follow_the_paper():
    moco = MoCoV2(backbone=tiny_resnet(), batch_size=32)
    assert moco.criterion.temperature == 0.2 and moco.momentum == 0.999
    assert moco.criterion.memory_bank.size == (65536, 256)
    assert (moco.lr, moco.weight_decay) == (0.03, 1e-4)
    byol = BYOL(backbone=tiny_resnet(), batch_size=32)
    assert (byol.lr, byol.weight_decay, byol.optimizer_name) == (0.3, 1.5e-6, "lars")
    assert (byol.momentum_start, byol.momentum_end) == (0.996, 1.0)
    assert byol.projection_head.layers[0].out_features == 4096
    assert SimCLR(backbone=tiny_resnet()).criterion.temperature == 0.1


def test_torchvision_backbone_by_name():
    model = MoCoV2(backbone="resnet18", batch_size=4, memory_bank_size=8)
    assert model.feature_dim == 512
    assert model.backbone.fc.__class__.__name__ == "Identity"


def test_local_weights_are_loaded(tmp_path):
    torch.manual_seed(0)
    source = SmallResNet(widths=(8, 8, 16, 16))
    path = tmp_path / "init.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(1)
    backbone, dim = build_backbone(SmallResNet(widths=(8, 8, 16, 16)), weights=path)
    assert dim == 16
    for (k, a), b in zip(source.state_dict().items(), backbone.state_dict().values()):
        if not k.startswith("fc."):
            assert torch.equal(a, b), k


def test_weight_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="No parameter"):
        load_backbone_weights(tiny_resnet(), bad)
    with pytest.raises(ValueError, match="Unknown backbone"):
        build_backbone("not_a_backbone")


def test_split_views_error():
    with pytest.raises(ValueError, match="at least two augmented views"):
        split_views((torch.randn(2, 3, 8, 8), torch.tensor([0, 1])))


def _save(module, path, prefix=""):
    torch.save({f"{prefix}{k}": v for k, v in module.state_dict().items()}, path)
    return path


def test_weights_of_another_width_or_depth_are_refused(tmp_path):
    from importlib import resources

    shipped = resources.files("lcr_lightly") / "assets" / "init_small_resnet_w16_64px.pth"
    narrow = SmallResNet(widths=(8, 8, 16, 16))
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    # only the BatchNorm counters match: nothing to load
    with pytest.raises(ValueError, match="No parameter"):
        load_backbone_weights(narrow, str(shipped))
    wide = SmallResNet(widths=(16, 32, 64, 96))  # the shipped init but for layer4
    with pytest.raises(
        ValueError,
        match=r"45 of 60 tensors match.*Shape mismatches \(15\): layer4\.0\.conv1\.weight "
        r"\(file \(128, 64, 3, 3\), backbone \(96, 64, 3, 3\)\)",
    ):
        load_backbone_weights(wide, str(shipped))
    shallow, deep = SmallResNet(blocks=(1, 1, 1, 1)), SmallResNet(blocks=(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"Missing from the file \(10\): layer1\.1\.conv1\.weight"):
        load_backbone_weights(deep, _save(shallow, tmp_path / "shallow.pth"))
    with pytest.raises(ValueError, match=r"modules that it lacks \(12\): layer1\.1\.conv1\.weight"):
        load_backbone_weights(shallow, _save(deep, tmp_path / "deep.pth"))
    for k, v in narrow.state_dict().items():
        assert torch.equal(v, before[k]), k  # a refused file changes nothing


def test_resnet50_weights_do_not_load_into_resnet18(tmp_path):
    import torchvision

    path = _save(torchvision.models.resnet50(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"does not fit the backbone ResNet: \d+ of 100 tensors"):
        build_backbone("resnet18", weights=path)


def test_non_strict_loading_loads_the_matching_part_and_logs_counts(tmp_path, caplog):
    import logging

    torch.manual_seed(0)
    source = SmallResNet(widths=(8, 8, 16, 16), blocks=(2, 1, 1, 1))
    path = _save(source, tmp_path / "ckpt.pth", prefix="backbone.")
    torch.save(
        {"state_dict": {**torch.load(path), "projection_head.layers.0.weight": torch.zeros(3)}},
        path,
    )
    target = SmallResNet(widths=(8, 8, 16, 32))  # layer4 wider, layer1 shallower
    init_fc = target.fc.weight.clone()
    with caplog.at_level(logging.INFO, logger="lcr_lightly.models.backbones"):
        loaded, left = load_backbone_weights(target, path, strict=False)
    own = [k for k in target.state_dict() if not k.startswith("fc.")]
    expected = [
        k for k in own if not k.startswith("layer4.") and not k.endswith("num_batches_tracked")
    ]
    assert (loaded, left) == (len(expected), 15)  # layer4: two convs, a downsample conv, three BNs
    for k in expected:
        assert torch.equal(target.state_dict()[k], source.state_dict()[k]), k
    assert torch.equal(target.fc.weight, init_fc)
    assert f"Loaded {loaded} of {loaded + 15} backbone tensors" in caplog.text
    assert "13 file keys unused, 12 of them in the backbone's modules" in caplog.text


@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_stem_pool_false_drops_only_the_stem_max_pool(name):
    """The official BYOL backbone: same weights, no max-pool after the stem, so the last
    map has twice the resolution; the forward equals a hand-written one without the pool."""
    torch.manual_seed(0)
    plain, _ = build_backbone(name)
    torch.manual_seed(0)
    no_pool, dim = build_backbone(name, stem_pool=False)
    state = plain.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in no_pool.state_dict().items())
    assert isinstance(no_pool.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    no_pool.eval()
    with torch.no_grad():
        stem = no_pool.conv1(x)
        stem = (
            no_pool.act1(no_pool.bn1(stem))
            if hasattr(no_pool, "act1")
            else no_pool.relu(no_pool.bn1(stem))
        )
        maps = no_pool.layer4(no_pool.layer3(no_pool.layer2(no_pool.layer1(stem))))
        assert maps.shape[-2:] == (4, 4)  # 2x2 with the stem pool at 64 px
        torch.testing.assert_close(no_pool(x), maps.mean(dim=(2, 3)))
    assert dim == maps.shape[1]
    lcr = with_common_rationale(MoCoV2(backbone=no_pool, batch_size=4, **SMALL["mocov2"]))
    assert lcr.common_rationale.layer_name == "backbone.layer4"


def test_stem_pool_false_is_refused_without_a_stem_max_pool():
    with pytest.raises(ValueError, match=r"^SmallResNet has no stem max-pool to drop \("):
        build_backbone(SmallResNet(small_input=True), stem_pool=False)


@pytest.mark.parametrize(
    "prefix", ["module.", "module.backbone.", "encoder_q.", "online_encoder.0.", "backbone.module."]
)
def test_wrapper_prefixes_are_stripped_in_order(tmp_path, prefix):
    torch.manual_seed(0)
    source = SmallResNet(widths=(8, 8, 16, 16))
    path = _save(source, tmp_path / "ckpt.pth", prefix=prefix)
    target = SmallResNet(widths=(8, 8, 16, 16))
    if prefix == "backbone.module.":  # "module." is only stripped before "backbone."
        with pytest.raises(ValueError, match="No parameter|does not fit"):
            load_backbone_weights(target, path)
        return
    load_backbone_weights(target, path)
    for name, value in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(target.state_dict()[name], value), name
