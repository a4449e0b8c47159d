"""The evaluation protocols: honest (fixed budget, validation-chosen epoch) and official."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lcr_lightly.eval import extract_features
from lcr_lightly.experiments.build import make_model
from lcr_lightly.experiments.checkpointing import read_checkpoint
from lcr_lightly.experiments.config import ExperimentConfig
from lcr_lightly.experiments.protocol import choose_epochs, protocol_data, run_protocols, summarize


def _epoch(val_map, test):
    return {"val": {"gap": {"mAP": val_map}}, "test": {"gap": dict(test)}}


def test_summarize_reads_each_protocol_at_its_epoch():
    epochs = [
        _epoch(0.30, {"rank1": 0.9, "rank5": 0.90, "mAP": 0.20}),
        _epoch(0.50, {"rank1": 0.4, "rank5": 0.95, "mAP": 0.25}),
        _epoch(0.50, {"rank1": 0.5, "rank5": 0.80, "mAP": 0.40}),  # val tie: earlier wins
        _epoch(0.10, {"rank1": 0.6, "rank5": 0.85, "mAP": 0.40}),  # test tie: earlier wins
    ]
    out = summarize(epochs, ["gap"], lambda epoch, pooling: {"linear": epoch / 10})
    budget, chosen, official = (out[k]["gap"] for k in ("fixed_budget", "val_selected", "official"))
    assert budget == {"rank1": 0.6, "rank5": 0.85, "mAP": 0.40, "linear": 0.3, "epoch": 4}
    assert chosen == {"rank1": 0.4, "rank5": 0.95, "mAP": 0.25, "linear": 0.1, "epoch": 2}
    # every retrieval metric at its own best epoch on test, as main_moco.py prints them;
    # the probe at the best-test-mAP epoch
    assert official == {"rank1": 0.9, "rank5": 0.95, "mAP": 0.40, "linear": 0.2, "epoch": 3}
    assert choose_epochs(epochs, "gap") == {"fixed_budget": 3, "val_selected": 1, "official": 2}


TINY = dict(
    backbone="small_resnet",
    widths=[8, 8, 16, 16],
    image_size=32,
    num_classes=3,
    images_per_class=6,
    test_images_per_class=4,
    batch_size=6,
    memory_bank_size=12,
    progress=False,
    label_fractions=[1.0, 0.5],
)


def _brute_force_retrieval(features, labels):
    x = torch.nn.functional.normalize(features.double(), dim=1).numpy()
    y = labels.numpy()
    rank1, aps = [], []
    for i in range(len(y)):
        sims = x @ x[i]
        order = [j for j in np.argsort(-sims, kind="stable") if j != i]
        hits = [y[j] == y[i] for j in order]
        rank1.append(hits[0])
        found = np.flatnonzero(hits)
        aps.append(np.mean([(k + 1) / (pos + 1) for k, pos in enumerate(found)]))
    return float(np.mean(rank1)), float(np.mean(aps))


@pytest.mark.parametrize("lcr", [False, True])
def test_run_protocols_scores_every_saved_epoch(tmp_path, lcr):
    cfg = ExperimentConfig(**TINY, epochs=2, lcr=lcr, out_dir=str(tmp_path))
    out = run_protocols(cfg)
    assert json.loads((tmp_path / "protocols.json").read_text())["protocols"] == out["protocols"]
    assert len(out["epochs"]) == 2
    poolings = ["gap", "rationale", "norm"] if lcr else ["gap", "norm"]
    assert set(out["protocols"]["fixed_budget"]) == set(poolings)
    # recompute epoch 1's test retrieval from its checkpoint, independently of the protocol
    data = protocol_data(cfg)
    model = make_model(cfg)
    model.load_state_dict(read_checkpoint(tmp_path / "checkpoints/epoch000.ckpt").state_dict)
    feats = extract_features(
        model, DataLoader(data["test"], batch_size=64), poolings, progress=False
    )
    for pooling in poolings:
        rank1, mean_ap = _brute_force_retrieval(feats[pooling], feats["labels"])
        assert out["epochs"][0]["test"][pooling]["rank1"] == pytest.approx(rank1)
        assert out["epochs"][0]["test"][pooling]["mAP"] == pytest.approx(mean_ap)
    budget = out["protocols"]["fixed_budget"]["gap"]
    assert budget["mAP"] == out["epochs"][-1]["test"]["gap"]["mAP"] and budget["epoch"] == 2
    assert {"knn", "linear", "linear_top5", "linear_50", "linear_top5_50"} <= set(budget)
    # the validation images are another split than the test images
    assert len(data["val"]) == len(data["test"]) == 12


def test_run_protocols_on_the_initialisation(tmp_path):
    cfg = ExperimentConfig(**TINY, epochs=0, lcr=False, out_dir=str(tmp_path))
    out = run_protocols(cfg)
    assert len(out["epochs"]) == 1
    for name in ("fixed_budget", "val_selected", "official"):
        assert out["protocols"][name]["gap"]["epoch"] == 1
