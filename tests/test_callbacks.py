"""RationaleMaps and RetrievalMonitor in real Trainers, loggers and checkpoints.

Scores are checked against features computed here by hand (the pool's input, the head's
formula written out) and a brute-force retrieval / kNN loop; TensorBoard files are read
back with tensorboard's EventAccumulator; "training is unchanged" is exact equality of
every parameter and buffer after the same fit with and without the callbacks.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lcr_lightly import RationaleMaps, RetrievalMonitor, with_common_rationale
from lcr_lightly.models import BYOL, MoCoV2
from tests.clients import DINOClient, DINOViTClient, MultiCrop, ViTSiamese, tiny_timm_vit
from tests.conftest import ToySiamese, TwoViews, quiet_trainer, tiny_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def labelled(n: int = 12, seed: int = 1, size: int = 32, classes: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(images, torch.arange(n) % classes), batch_size=6)


def all_images(loader: DataLoader) -> Tuple[Tensor, Tensor]:
    return loader.dataset.tensors  # type: ignore[attr-defined]


# --------------------------------------------------------------- independent references


def features_by_hand(model: nn.Module, images: Tensor) -> Dict[str, Tensor]:
    """GAP, rationale and feature-norm pooling of the pool's input, formulas written out."""
    lcr = model.common_rationale
    pool = lcr.pooler.module
    seen: List[Tensor] = []
    handle = pool.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        model.backbone(images)
    handle.remove()
    fmap = seen[0]
    head = lcr.head
    with torch.no_grad():
        a = F.conv2d(fmap, head.conv.weight)
        a = (a - head.bn.running_mean[:, None, None]) / torch.sqrt(
            head.bn.running_var[:, None, None] + head.bn.eps
        )
        a = torch.relu(a * head.bn.weight[:, None, None] + head.bn.bias[:, None, None]).amax(1)

    def minmax(m: Tensor) -> Tensor:
        low = m.flatten(1).min(1).values[:, None, None]
        high = m.flatten(1).max(1).values[:, None, None]
        return (m - low) / (high - low + 1e-7)

    return {
        "gap": fmap.mean((2, 3)),
        "rationale": (minmax(a)[:, None] * fmap).mean((2, 3)),
        "norm": (minmax(fmap.norm(dim=1))[:, None] * fmap).mean((2, 3)),
        "attention": minmax(a),
        "norm_map": minmax(fmap.norm(dim=1)),
    }


def retrieval_by_hand(x: Tensor, y: Tensor) -> Dict[str, float]:
    """Leave-one-out rank-1/rank-5/mAP by sorting every query's list (no ties here)."""
    x = F.normalize(x.double(), dim=1)
    sims = x @ x.T
    n = len(x)
    r1 = r5 = 0
    aps = []
    for i in range(n):
        order = sorted((j for j in range(n) if j != i), key=lambda j: -float(sims[i, j]))
        relevant = [bool(y[j] == y[i]) for j in order]
        r1 += relevant[0]
        r5 += any(relevant[:5])
        hits, precisions = 0, []
        for rank, rel in enumerate(relevant, 1):
            if rel:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / len(precisions))
    return {"rank1": r1 / n, "rank5": r5 / n, "mAP": sum(aps) / len(aps)}


def knn_by_hand(bank: Tensor, bank_y: Tensor, x: Tensor, y: Tensor, k: int, t: float) -> float:
    """Temperature-weighted kNN vote (Wu et al. 2018), one query at a time."""
    bank, x = F.normalize(bank.double(), dim=1), F.normalize(x.double(), dim=1)
    correct = 0
    for i in range(len(x)):
        sims = bank @ x[i]
        top = sims.topk(min(k, len(bank)))
        votes: Dict[int, float] = {}
        for s, j in zip(top.values.tolist(), top.indices.tolist()):
            votes[int(bank_y[j])] = votes.get(int(bank_y[j]), 0.0) + float(np.exp(s / t))
        correct += max(votes, key=votes.get) == int(y[i])
    return correct / len(x)


# ----------------------------------------------------------------------------- panels


def test_the_panels_are_the_ssl_gradcam_the_rationale_and_the_feature_norm() -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    frozen = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    frozen.eval()  # kept in eval mode while training: the GradCAM step must keep it so
    panels = RationaleMaps(x, num_images=3).maps(model)
    by_hand = features_by_hand(model, x)  # eval mode: A' and the norm map of the pool input
    torch.testing.assert_close(panels["rationale"], by_hand["attention"])
    torch.testing.assert_close(panels["norm"], by_hand["norm_map"])
    model.train()
    frozen.eval()
    # GradCAM of the unwrapped SSL loss at the hooked layer, first view, by autograd
    maps: List[Tensor] = []
    layer = model.common_rationale.capture.layer
    handle = layer.register_forward_hook(lambda m, a, o: maps.append(o))
    loss = ToySiamese.training_step(model, ([x, x.flip(-1)], torch.zeros(3)), 0)
    handle.remove()
    model.common_rationale.clear()
    (grad,) = torch.autograd.grad(loss, maps[0])
    cam = torch.relu((maps[0] * grad).sum(1)).detach()
    torch.testing.assert_close(panels["gradcam"], cam / cam.flatten(1).amax(1)[:, None, None])
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(panels["image"], (x * std + mean).clamp(0, 1))


# ------------------------------------------------------------------------- TensorBoard


def test_tensorboard_gets_the_figure_and_every_score_of_the_last_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    val, gallery = labelled(seed=1), labelled(seed=2)
    maps = RationaleMaps(val, num_images=4, cell_inches=1.0, dpi=100)
    monitor = RetrievalMonitor(val, gallery=gallery, knn_k=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer(max_epochs=2, max_steps=-1, logger=logger, callbacks=[maps, monitor])
    trainer.fit(model, DataLoader(TwoViews(n=8), batch_size=4))

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert events.Tags()["images"] == ["rationale_maps"]
    images = events.Images("rationale_maps")
    assert len(images) == 2  # one figure per epoch
    # 4 panels of 1 inch + 0.6 inch colour bar wide, 4 rows of 1 inch + 0.35 inch title high
    assert all((im.width, im.height) == (460, 435) for im in images)
    names = [
        f"val/{metric}_{pooling}"
        for pooling in ("gap", "rationale", "norm")
        for metric in ("rank1", "rank5", "mAP", "knn")
    ]
    assert set(names) <= set(events.Tags()["scalars"])
    x, y = all_images(val)
    bank_x, bank_y = all_images(gallery)
    ours, bank = features_by_hand(model, x), features_by_hand(model, bank_x)
    for pooling in ("gap", "rationale", "norm"):
        expected = retrieval_by_hand(ours[pooling], y)
        expected["knn"] = knn_by_hand(bank[pooling], bank_y, ours[pooling], y, k=5, t=0.07)
        for metric, value in expected.items():
            logged = events.Scalars(f"val/{metric}_{pooling}")
            assert len(logged) == 2
            assert logged[-1].value == pytest.approx(value, abs=1e-6), (metric, pooling)
    decoded = np.frombuffer(images[-1].encoded_image_string, dtype=np.uint8)
    assert decoded[:4].tolist() == [0x89, ord("P"), ord("N"), ord("G")]


def test_csv_logger_gets_png_files_and_scores_every_n_epochs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    val = labelled()
    maps = RationaleMaps(all_images(val)[0][:3], every_n_epochs=2)
    monitor = RetrievalMonitor(val, every_n_epochs=2, poolings=("rationale",))
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = quiet_trainer(max_epochs=3, max_steps=-1, logger=logger, callbacks=[maps, monitor])
    trainer.fit(model, DataLoader(TwoViews(n=8), batch_size=4))
    folder = Path(logger.log_dir) / "rationale_maps"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch001.png"]
    assert maps.last_path == folder / "epoch001.png"
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/mAP_rationale")]
    assert [int(r["epoch"]) for r in rows] == [1]
    assert "val/mAP_gap" not in rows[0]  # only the poolings asked for


def test_without_logger_the_figure_goes_to_the_root_dir(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    maps = RationaleMaps(labelled(), num_images=2)
    trainer = quiet_trainer(max_epochs=1, max_steps=-1, callbacks=[maps], default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TwoViews(n=8), batch_size=4))
    assert maps.last_path == tmp_path / "rationale_maps" / "epoch000.png"
    assert maps.last_path.stat().st_size > 1000


# ------------------------------------------------------------ training is not changed


class Client(NamedTuple):
    build: Callable[[], pl.LightningModule]
    train: Callable[[], DataLoader]
    make_batch: Callable[[Tensor, Tensor], Any]


def two_views(x: Tensor, y: Tensor) -> Any:
    return [x, x.flip(-1)], y


def multi_crop(x: Tensor, y: Tensor) -> Any:
    local = [x[..., i : i + 16, j : j + 16] for i in (0, 16) for j in (0, 16)]
    return [x, x.flip(-1), *local], y


class ViTClient(ViTSiamese):
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)


class RebindingQueue(ToySiamese):
    """Keeps a queue of negatives by rebinding its buffer (``self.queue = cat(...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("queue", torch.zeros(8, 8))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x0, _), _ = batch
        z = F.normalize(self.projection(self(x0)), dim=1)
        loss = super().training_step(batch, batch_idx) + 0.1 * (z @ self.queue.T).mean()
        self.queue = torch.cat([z.detach(), self.queue])[:8]
        return loss


def _two_view_loader() -> DataLoader:
    return DataLoader(TwoViews(n=8), batch_size=4, shuffle=True, drop_last=True)


CLIENTS = {
    # lightly-benchmark-shaped modules: momentum encoder, queue, batch shuffle, BN
    "mocov2": Client(
        lambda: MoCoV2(
            backbone=tiny_resnet(), batch_size=4, memory_bank_size=8, hidden_dim=16, out_dim=8
        ),
        _two_view_loader,
        two_views,
    ),
    "byol": Client(
        lambda: BYOL(backbone=tiny_resnet(), batch_size=4, hidden_dim=16, out_dim=8),
        _two_view_loader,
        two_views,
    ),
    "dino": Client(
        DINOClient,
        lambda: DataLoader(MultiCrop(8), batch_size=4, shuffle=True, drop_last=True),
        multi_crop,
    ),
    "dino-vit": Client(
        DINOViTClient,
        lambda: DataLoader(MultiCrop(8), batch_size=4, shuffle=True, drop_last=True),
        multi_crop,
    ),
    "vit": Client(lambda: ViTClient(tiny_timm_vit("avg")), _two_view_loader, two_views),
    "rebinding-queue": Client(RebindingQueue, _two_view_loader, two_views),
}


def _fit(name: str, watch: bool, root: Path) -> Tuple[nn.Module, pl.Trainer, List[Any]]:
    client = CLIENTS[name]
    pl.seed_everything(0, verbose=False)
    model = with_common_rationale(client.build(), k=4)
    val = labelled(n=8)
    callbacks: List[Any] = []
    if watch:
        callbacks = [
            RationaleMaps(val, num_images=3, make_batch=client.make_batch),
            RetrievalMonitor(val, gallery=labelled(n=8, seed=3), knn_k=3),
        ]
    trainer = quiet_trainer(max_epochs=2, max_steps=-1, callbacks=callbacks, default_root_dir=root)
    trainer.fit(model, client.train())
    return model, trainer, callbacks


@pytest.mark.parametrize("name", list(CLIENTS))
def test_the_callbacks_leave_training_exactly_unchanged(name: str, tmp_path: Path) -> None:
    plain, plain_trainer, _ = _fit(name, False, tmp_path / "plain")
    rng_plain = torch.get_rng_state()
    watched, trainer, (maps, monitor) = _fit(name, True, tmp_path / "watched")
    assert torch.equal(torch.get_rng_state(), rng_plain)
    logged = {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("val/")}
    assert logged.keys() == plain_trainer.callback_metrics.keys()  # the step ran logged nothing
    for key, value in logged.items():
        assert torch.equal(value, plain_trainer.callback_metrics[key]), key
    ours = dict(watched.named_parameters()) | dict(watched.named_buffers())
    theirs = dict(plain.named_parameters()) | dict(plain.named_buffers())
    assert ours.keys() == theirs.keys()  # named_buffers includes the non-persistent queue
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # ... and they did their work
    assert sorted(p.name for p in maps.last_path.parent.iterdir()) == [
        "epoch000.png",
        "epoch001.png",
    ]
    assert {"val/mAP_rationale", "val/rank1_gap", "val/knn_norm"} <= monitor.last_metrics.keys()


class Probe(Callback):
    """Records modes, gradients and generator states at train epoch end."""

    def __init__(self, freeze_bn: bool) -> None:
        self.freeze_bn = freeze_bn
        self.seen: List[Any] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.freeze_bn:  # a module the user keeps in eval mode while training
            next(m for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)).eval()
        self.seen.append(
            (
                [m.training for m in pl_module.modules()],
                [p.grad for p in pl_module.parameters()],
                torch.get_rng_state(),
                np.random.get_state()[1].copy(),
                random.getstate(),
            )
        )


def test_modes_gradients_and_generators_are_restored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_common_rationale(
        MoCoV2(backbone=tiny_resnet(), batch_size=4, memory_bank_size=8, hidden_dim=16, out_dim=8),
        k=4,
    )
    before, after = Probe(freeze_bn=True), Probe(freeze_bn=False)
    val = labelled(n=8)
    callbacks = [before, RationaleMaps(val, num_images=2), RetrievalMonitor(val), after]
    trainer = quiet_trainer(
        max_epochs=1, max_steps=-1, callbacks=callbacks, default_root_dir=tmp_path
    )
    trainer.fit(model, _two_view_loader())
    (modes, grads, torch_rng, np_rng, py_rng), (modes2, grads2, torch_rng2, np_rng2, py_rng2) = (
        before.seen[0],
        after.seen[0],
    )
    assert not all(modes) and modes2 == modes
    assert any(g is not None for g in grads)  # the last step's gradients are still there
    assert all(a is b for a, b in zip(grads, grads2))
    assert torch.equal(torch_rng, torch_rng2) and np.array_equal(np_rng, np_rng2)
    assert py_rng == py_rng2


# ---------------------------------------------------------- checkpoint selection, stopping


class ToyWithValidation(ToySiamese):
    """A module with its own validation loop: checkpoints are then saved on validation end."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


@pytest.mark.parametrize("validation_loop", [False, True])
def test_model_checkpoint_keeps_the_epoch_with_the_best_validation_map(
    tmp_path: Path, validation_loop: bool
) -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToyWithValidation() if validation_loop else ToySiamese(), k=4)
    val = labelled()
    every = ModelCheckpoint(
        dirpath=tmp_path / "all", filename="e{epoch}", auto_insert_metric_name=False, save_top_k=-1
    )
    best = ModelCheckpoint(
        dirpath=tmp_path / "best",
        filename="best",
        monitor="val/mAP_rationale",
        mode="max",
        save_on_train_epoch_end=not validation_loop,  # True: saved in on_validation_end
    )
    trainer = quiet_trainer(
        max_epochs=4,
        max_steps=-1,
        enable_checkpointing=True,
        callbacks=[every, best, RetrievalMonitor(val)],
    )
    train = DataLoader(TwoViews(n=8), batch_size=4)
    trainer.fit(model, train, val_dataloaders=val if validation_loop else None)

    x, y = all_images(val)
    scores = []
    for epoch in range(4):  # recomputed from each saved epoch, by hand
        state = torch.load(tmp_path / "all" / f"e{epoch}.ckpt", weights_only=False)["state_dict"]
        fresh = with_common_rationale(ToySiamese(), k=4)
        fresh.load_state_dict(state)
        scores.append(retrieval_by_hand(features_by_hand(fresh, x)["rationale"], y)["mAP"])
    winner = int(np.argmax(scores))
    assert sorted(scores)[-1] > sorted(scores)[-2] + 1e-6  # a unique best epoch
    kept = torch.load(best.best_model_path, weights_only=False)
    assert Path(best.best_model_path) == tmp_path / "best" / "best.ckpt"
    assert kept["epoch"] == winner
    assert float(best.best_model_score) == pytest.approx(scores[winner], abs=1e-6)


def test_early_stopping_reads_the_monitored_score(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    stop = EarlyStopping(monitor="val/mAP_rationale", mode="max", stopping_threshold=0.0)
    trainer = quiet_trainer(
        max_epochs=5, max_steps=-1, callbacks=[RetrievalMonitor(labelled()), stop]
    )
    trainer.fit(model, DataLoader(TwoViews(n=8), batch_size=4))
    assert stop.stopped_epoch == 0 and trainer.current_epoch == 1  # mAP > 0 after epoch 0


# ------------------------------------------------------------------ one pass, bad input


def test_the_three_poolings_come_from_one_forward_pass_per_batch() -> None:
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    calls: List[int] = []
    model.backbone.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    val = labelled(n=12)  # two batches of 6
    monitor = RetrievalMonitor(val)
    metrics = monitor.compute(model)
    assert calls == [6, 6]
    assert len(metrics) == 9 and monitor.seconds > 0


def test_bad_input_is_refused_with_one_clear_message() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer, got 0"):
        RetrievalMonitor(labelled(), every_n_epochs=0)
    with pytest.raises(ValueError, match="Unknown pooling 'max'"):
        RetrievalMonitor(labelled(), poolings=("max",))
    with pytest.raises(ValueError, match="at least 2 images"):
        RationaleMaps(torch.randn(1, 3, 32, 32))
    plain = ToySiamese()
    trainer = quiet_trainer(max_epochs=1, callbacks=[RationaleMaps(torch.randn(2, 3, 32, 32))])
    with pytest.raises(ValueError, match="RationaleMaps needs a model wrapped with"):
        trainer.fit(plain, DataLoader(TwoViews(n=8), batch_size=4))
    unlabelled = DataLoader(torch.randn(4, 3, 32, 32), batch_size=2)
    trainer = quiet_trainer(max_epochs=1, callbacks=[RetrievalMonitor(unlabelled)])
    with pytest.raises(ValueError, match=r"dataloader must yield \(images, labels, ...\)"):
        trainer.fit(
            with_common_rationale(ToySiamese(), k=4), DataLoader(TwoViews(n=8), batch_size=4)
        )
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[RetrievalMonitor(labelled(), poolings=("rationale",))]
    )
    with pytest.raises(ValueError, match="rationale pooling needs a model wrapped"):
        trainer.fit(ToySiamese(), DataLoader(TwoViews(n=8), batch_size=4))


# -------------------------------------------------------------------------------- CLI


def test_cli_selects_the_checkpoint_on_validation_retrieval(tmp_path: Path) -> None:
    from lcr_lightly.experiments.checkpointing import read_checkpoint
    from lcr_lightly.experiments.cli import main
    from tests.test_cli import TINY_FLAGS

    out = tmp_path / "run"
    flags = ["--eval-split", "val", "--logger", "tensorboard", "--epochs", "3"]
    main(["pretrain", *TINY_FLAGS, *flags, "--out-dir", str(out)])
    events = EventAccumulator(str(out / "logs" / "version_0"), {"images": 0, "scalars": 0})
    events.Reload()
    logged = [s.value for s in events.Scalars("val/mAP_rationale")]
    assert len(logged) == 3 and len(events.Images("rationale_maps")) == 3
    winner = int(np.argmax(logged))
    assert sorted(logged)[-1] > sorted(logged)[-2]  # a unique best epoch
    best = read_checkpoint(out / "checkpoints" / "best.ckpt")
    assert best.epoch == winner
    final = read_checkpoint(out / "model.pt").state_dict  # the run ends with the best epoch
    assert final.keys() == best.state_dict.keys()
    assert all(torch.equal(final[k], best.state_dict[k]) for k in final)


def test_cli_csv_logger_writes_the_map_figures_and_bad_logger_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lcr_lightly.experiments.cli import main
    from tests.test_cli import TINY_FLAGS

    out = tmp_path / "run"
    main(["pretrain", *TINY_FLAGS, "--eval-split", "val", "--epochs", "1", "--out-dir", str(out)])
    figure = out / "logs" / "version_0" / "rationale_maps" / "epoch000.png"
    assert figure.stat().st_size > 1000
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *TINY_FLAGS, "--logger", "wandb", "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: logger: invalid value 'wandb'; expected one of csv, tensorboard")


def test_the_readme_snippet_runs(tmp_path: Path) -> None:
    import re

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Watching LCR train\n.*?```python\n(.*?)```", text, re.S).group(1)
    code = block.replace("max_epochs=8,", "max_epochs=2, enable_progress_bar=False,")
    code = code.replace('"runs"', repr(str(tmp_path)))
    torch.manual_seed(0)
    namespace = {
        "pl": pl,
        "model": with_common_rationale(ToySiamese(), k=4),
        "val_images": all_images(labelled())[0][:3],
        "val_loader": labelled(),
        "train_plain": labelled(seed=2),
        "train_dataloader": DataLoader(TwoViews(n=8), batch_size=4),
    }
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert {"val/mAP_rationale", "val/knn_gap"} <= trainer.callback_metrics.keys()
    best = trainer.checkpoint_callback.best_model_path
    assert Path(best).is_file() and Path(best).is_relative_to(tmp_path)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("rationale_maps")) == 2
