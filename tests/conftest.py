"""Shared fixtures: tiny backbones, two-view data, quiet trainers."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lcr_lightly.models import SmallResNet

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*val_dataloader.*")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny inputs: as fast, and no spinning on a shared CPU.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_resnet() -> SmallResNet:
    """A 4-stage ResNet with few channels; 32 px input gives a 4x4 layer4 map."""
    return SmallResNet(widths=(8, 8, 16, 16))


class TwoViews(Dataset):
    """Deterministic random two-view samples with labels."""

    def __init__(self, n: int = 16, size: int = 32, classes: int = 4) -> None:
        self.n, self.size, self.classes = n, size, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tuple[List[Tensor], int]:
        g = torch.Generator().manual_seed(i)
        base = torch.randn(3, self.size, self.size, generator=g)
        noise = torch.randn(3, self.size, self.size, generator=g)
        return [base + 0.1 * noise, base.flip(-1)], i % self.classes


def two_view_batch(b: int = 8, size: int = 32) -> Tuple[List[Tensor], Tensor]:
    ds = TwoViews(n=b, size=size)
    items = [ds[i] for i in range(b)]
    views = [torch.stack([it[0][v] for it in items]) for v in range(2)]
    return views, torch.tensor([it[1] for it in items])


class ToySiamese(LightningModule):
    """A stateless SimSiam-like model: same loss for the same batch, any number of calls."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_resnet()
        self.backbone.fc = nn.Identity()
        self.projection = nn.Linear(16, 8)
        self.prediction = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x0, x1), _ = batch
        z0, z1 = self.projection(self(x0)), self.projection(self(x1))
        p0, p1 = self.prediction(z0), self.prediction(z1)
        cos = nn.functional.cosine_similarity
        return -0.5 * (cos(p0, z1.detach()).mean() + cos(p1, z0.detach()).mean())

    def configure_optimizers(self) -> Any:
        # Explicit groups from named submodules: the LCR head is not among them.
        return torch.optim.SGD(
            [
                {"params": self.backbone.parameters()},
                {"params": [*self.projection.parameters(), *self.prediction.parameters()]},
            ],
            lr=0.01,
        )


@pytest.fixture
def toy() -> ToySiamese:
    torch.manual_seed(0)
    return ToySiamese()


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=2,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def loader(n: int = 16, batch_size: int = 8, size: int = 32) -> DataLoader:
    return DataLoader(TwoViews(n=n, size=size), batch_size=batch_size)


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, Dict[str, float]]:
    """A generic-set initialisation of the tiny ResNet (path, training summary), made once."""
    from lcr_lightly.experiments.generic_init import INIT_SETTINGS, pretrain_generic_init

    path = str(tmp_path_factory.mktemp("init") / "init.pth")
    tiny = dict(widths=(8, 8, 16, 16), image_size=32, images_per_class=4, epochs=1)
    result = pretrain_generic_init(path, **{**INIT_SETTINGS, **tiny}, progress=False)
    return path, result


def user_error(capsys: Any, argv: List[str]) -> str:
    """Runs the CLI expecting a user error: exit code 2 and one 'error: ...' line."""
    from lcr_lightly.experiments.cli import main  # the runner, only for the CLI tests

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]
