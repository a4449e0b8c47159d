"""Distributed training, mixed precision, checkpoints, hook hygiene and bad input."""

import gc
import pickle
import weakref

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from lcr_lightly import GradCAMFitLoss, count_hooks, with_common_rationale
from lcr_lightly.data import CUB200
from lcr_lightly.models import MoCoV2
from tests.conftest import ToySiamese, TwoViews, loader, quiet_trainer, tiny_resnet, two_view_batch
from tests.isolated import run_isolated


class ParamsAtEnd(pl.Callback):
    """Gathers the flattened parameters of every rank at the end of training."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        if trainer.is_global_zero:
            torch.save(gathered.reshape(trainer.world_size, -1), self.path)

    def teardown(self, trainer, pl_module, stage):
        # Lightning leaves the gloo group to an atexit hook, so each rank destroys it when its
        # process ends: rank 1 first, alone, which at times aborts the process (SIGABRT,
        # "terminate called without an active exception"). Destroy it here, on all ranks
        # together, once Lightning has finished with it (callbacks' teardown runs last).
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _no_batchnorm(module: nn.Module) -> nn.Module:
    """Per-sample GroupNorm instead of BatchNorm: no dependence on the per-rank batch."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            _no_batchnorm(child)
    return module


# The default (official MoCo) loss sums over the local batch and fits the raw GradCAM, so
# under DDP its weight is divided by the world size; this loss is mean-reduced and fits a
# max-scaled GradCAM, so one process and two are the same computation.
SCALE_FREE = dict(
    tau=0.4, target="max", head="raw", detach_target=True, reduction="batchmean", softmax="map"
)


def _ddp_model():
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4, loss=GradCAMFitLoss(**SCALE_FREE))
    return _no_batchnorm(model)


class HalvesOfGlobalBatches(pl.LightningDataModule):
    """Rank r gets half r of every global batch of 8 (what one process sees whole)."""

    def train_dataloader(self):
        rank = self.trainer.global_rank
        idx = [i for b in range(0, 16, 8) for i in range(b + 4 * rank, b + 4 * rank + 4)]
        return DataLoader(torch.utils.data.Subset(TwoViews(n=16), idx), batch_size=4)


def test_ddp_two_processes_match_one_process(tmp_path):
    data = TwoViews(n=16)
    ddp_path, single_path = tmp_path / "ddp.pt", tmp_path / "single.pt"
    trainer = quiet_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_steps=2,
        callbacks=[ParamsAtEnd(ddp_path)],
        use_distributed_sampler=False,
    )
    trainer.fit(_ddp_model(), datamodule=HalvesOfGlobalBatches())
    per_rank = torch.load(ddp_path)
    assert per_rank.shape[0] == 2
    torch.testing.assert_close(per_rank[0], per_rank[1], rtol=0, atol=0)  # ranks identical

    single = _ddp_model()
    quiet_trainer(max_steps=2, callbacks=[ParamsAtEnd(single_path)]).fit(
        single, DataLoader(data, batch_size=8, shuffle=False)
    )
    one = torch.load(single_path)[0]
    # Same global batch, no batch-dependent normalisation: equal up to float reduction
    # order. (With BatchNorm each rank normalises its own half, as in any DDP run
    # without SyncBatchNorm; GradCAM targets are max-scaled, so the world-size factor in
    # dL/dF cancels.)
    torch.testing.assert_close(per_rank[0], one, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_conversion_keeps_the_wrapper_working():
    model = with_common_rationale(ToySiamese(), k=4)
    layer = model.common_rationale.capture.layer
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model and model.common_rationale.capture.layer is layer
    assert isinstance(model.common_rationale.head.bn, nn.SyncBatchNorm)
    assert isinstance(model.backbone.layer4[0].bn1, nn.SyncBatchNorm)
    assert count_hooks(model) == 3  # capture, pooling, pooling check on the model


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4, weight=1.0)
    batch = two_view_batch()
    kls = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        model.common_rationale.record = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            total = model.training_step(batch, 0)
        assert torch.isfinite(total)
        step = model.common_rationale.last_step
        kls[name] = step.kl
        assert kls[name].dtype == torch.float32
        assert all(g.dtype == torch.float32 for g in step.gradcams)  # GradCAM in float32
        expected = torch.bfloat16 if enabled else torch.float32  # the head runs in autocast
        assert all(a.dtype == expected for a in step.head_maps)
    assert kls["bf16"].item() == pytest.approx(kls["fp32"].item(), rel=0.05, abs=1e-3)
    trainer = quiet_trainer(precision="bf16-mixed", max_steps=2)
    trainer.fit(model, loader())
    assert torch.isfinite(trainer.callback_metrics["train_lcr_kl"])


class LossLog(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _moco():
    torch.manual_seed(0)
    model = MoCoV2(
        backbone=tiny_resnet(), batch_size=8, memory_bank_size=16, hidden_dim=16, out_dim=8
    )
    return with_common_rationale(model, k=4)


def test_checkpoint_resume_continues_the_same_trajectory(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    data = DataLoader(TwoViews(n=16), batch_size=8, shuffle=False)
    full_log = LossLog()
    pl.seed_everything(0)
    full = _moco()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=2, max_steps=-1, callbacks=[full_log, saver], enable_checkpointing=True
    )
    trainer.fit(full, data)
    ckpt = tmp_path / "epoch=0-step=2.ckpt"  # written after the first of two epochs
    saved = torch.load(ckpt, weights_only=False)
    assert any(k.startswith("common_rationale.head.") for k in saved["state_dict"])
    assert saved["moco_queue"]["bank"].shape == full.criterion.memory_bank.bank.shape

    resumed_log = LossLog()
    pl.seed_everything(0)
    resumed = _moco()
    quiet_trainer(max_epochs=2, max_steps=-1, callbacks=[resumed_log]).fit(
        resumed, data, ckpt_path=ckpt
    )
    # same second-epoch losses (float tolerance: MoCo's key batch is shuffled with the
    # global RNG, which Lightning does not checkpoint; BN sums then differ in order)
    assert resumed_log.losses == pytest.approx(full_log.losses[2:], rel=1e-5, abs=1e-6)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # the queue (a non-persistent buffer in lightly) was restored, not re-randomised
    torch.testing.assert_close(full.criterion.memory_bank.bank, resumed.criterion.memory_bank.bank)


def test_lcr_and_plain_checkpoints_cross_load_only_with_strict_false():
    wrapped, plain = (
        _moco(),
        MoCoV2(backbone=tiny_resnet(), batch_size=8, memory_bank_size=16, hidden_dim=16, out_dim=8),
    )
    with pytest.raises(RuntimeError, match="Unexpected key.*common_rationale.head"):
        plain.load_state_dict(wrapped.state_dict())
    with pytest.raises(RuntimeError, match="Missing key.*common_rationale.head"):
        _moco().load_state_dict(plain.state_dict())
    result = plain.load_state_dict(wrapped.state_dict(), strict=False)  # documented path
    assert all(k.startswith("common_rationale.") for k in result.unexpected_keys)
    assert torch.equal(plain.backbone.conv1.weight, wrapped.backbone.conv1.weight)


def test_captured_maps_are_freed_every_step():
    model = with_common_rationale(ToySiamese(), k=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    refs = []  # every map layer4 produced, watched by a hook of the test's own
    model.backbone.layer4.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    for _ in range(200):
        batch = two_view_batch(4)
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        del loss, batch
        assert model.common_rationale.capture.outputs == []
    gc.collect()
    assert len(refs) == 400 and all(r() is None for r in refs)  # nothing keeps a map alive


def test_hooks_after_pickle_and_release():
    model = with_common_rationale(ToySiamese(), k=4)
    clone = pickle.loads(pickle.dumps(model))
    assert count_hooks(clone) == 3 and clone.training_step(two_view_batch(), 0).dim() == 0
    from lcr_lightly import release

    release(clone)
    assert sum(len(m._forward_hooks) for m in clone.modules()) == 0


MAP_SIZES = [(8, (1, 1)), (56, (7, 7)), (112, (14, 14)), ((48, 80), (6, 10))]


def _check_channels_last(size, expected) -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4).to(memory_format=torch.channels_last)
    h, w = (size, size) if isinstance(size, int) else size
    b = 2 if expected == (1, 1) else 1  # BN needs more than one value per channel
    views = [
        torch.randn(b, 3, h, w).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]
    lcr = model.common_rationale
    lcr.record = True
    out = model.training_step((views, torch.zeros(b)), 0)
    assert torch.isfinite(out), size
    seen = lcr.last_step.maps[0]
    assert tuple(seen.shape[-2:]) == expected, (size, tuple(seen.shape))
    assert seen.is_contiguous(memory_format=torch.channels_last), f"{size}: not channels_last"
    out.backward()
    if expected != (1, 1):  # one position: both softmaxes are 1, the KL is constant
        assert lcr.head.conv.weight.grad.abs().sum() > 0, size


def check_map_sizes_channels_last() -> None:
    """Every input size gives the expected map, a finite loss and a backward (batch 1).

    Runs with oneDNN off: on some x86 CPUs its channels_last backward of a 1x1 stride-2
    convolution corrupts the heap (upstream bug, docs/known-issues.md); the native CPU
    kernels still run every LCR operation in channels_last.
    """
    with torch.backends.mkldnn.flags(enabled=False):
        for size, expected in MAP_SIZES:
            _check_channels_last(size, expected)


def test_map_sizes_batch_size_one_and_channels_last():
    run_isolated("tests.test_reliability:check_map_sizes_channels_last")


def test_gradient_checkpointed_backbone():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(ToySiamese):
        def forward(self, x):
            return checkpoint(self.backbone, x, use_reentrant=False)

    torch.manual_seed(0)
    model = with_common_rationale(Checkpointed(), k=4)
    out = model.training_step(two_view_batch(), 0)
    out.backward()
    assert model.common_rationale.capture.outputs == []
    assert model.common_rationale.head.conv.weight.grad is not None


def test_corrupt_image_error_names_the_file(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images/001.a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images/001.a/ok.jpg")
    (root / "images/001.a/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "images.txt").write_text("1 001.a/ok.jpg\n2 001.a/bad.jpg\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n")
    (root / "train_test_split.txt").write_text("1 1\n2 1\n")
    ds = CUB200(root)
    assert ds[0][1] == 0
    with pytest.raises(OSError, match="bad.jpg"):
        ds[1]


def test_layer_with_non_map_output_is_rejected():
    class FlatOut(ToySiamese):
        pass

    model = with_common_rationale(FlatOut(), k=4, layer="backbone.avgpool", in_channels=16)
    # avgpool gives (B, 16, 1, 1): a map; the flattening fc is not
    with pytest.raises(ValueError, match="4-D map"):
        bad = with_common_rationale(ToySiamese(), k=4, layer="projection", in_channels=8)
        bad.training_step(two_view_batch(), 0)
    assert model.training_step(two_view_batch(), 0).dim() == 0


def test_torch_compile_of_the_backbone_is_refused_clearly():
    model = with_common_rationale(ToySiamese(), k=4)
    model.backbone = torch.compile(model.backbone)
    with pytest.raises(RuntimeError, match="torch.compile'd module.*eager mode"):
        model.training_step(two_view_batch(), 0)
    assert model.common_rationale.capture.outputs == []
