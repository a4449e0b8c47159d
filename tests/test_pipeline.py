import json
from pathlib import Path

import pytest
import torch

from lcr_lightly import set_pooling
from lcr_lightly.experiments.build import make_data, make_model
from lcr_lightly.experiments.config import ConfigError, ExperimentConfig
from lcr_lightly.experiments.evaluate import evaluate
from lcr_lightly.experiments.report import format_table, mean_std
from lcr_lightly.experiments.train import run

TINY = dict(
    widths=[8, 8, 16, 16],
    image_size=32,
    num_classes=3,
    images_per_class=4,
    test_images_per_class=3,
    batch_size=4,
    epochs=1,
    memory_bank_size=8,
    progress=False,
)


def test_run_writes_results_for_lcr_and_baseline(tmp_path):
    for lcr in (True, False):
        cfg = ExperimentConfig(lcr=lcr, out_dir=str(tmp_path / str(lcr)), **TINY)
        out = run(cfg)
        saved = json.loads((tmp_path / str(lcr) / "results.json").read_text())
        assert saved["results"] == json.loads(json.dumps(out["results"]))
        assert set(out["results"]) == (
            {"gap", "rationale", "norm", "localization"} if lcr else {"gap", "norm", "localization"}
        )
        for metrics in (out["results"]["gap"],):
            assert all(0.0 <= metrics[k] <= 1.0 for k in ("rank1", "rank5", "mAP", "knn", "linear"))
        loc = out["results"]["localization"]
        assert 0 < loc["chance_part"] < loc["chance_object"] < 1
        assert (tmp_path / str(lcr) / "logs").exists()
        assert saved["provenance"]["versions"]["torch"] == torch.__version__.split("+")[0]
        assert saved["provenance"]["weights"] is None  # random initialisation


def test_eval_split_val_evaluates_the_synthetic_val_split():
    from lcr_lightly.data import SyntheticFineGrained

    data = make_data(ExperimentConfig(eval_split="val", **TINY))
    kw = dict(num_classes=3, images_per_class=3, image_size=32)
    val = SyntheticFineGrained(split="val", **kw)
    test = SyntheticFineGrained(split="test", **kw)
    first = data.test_eval[0][0]
    assert torch.equal(first, data.test_eval.transform(val[0][0]))
    assert not torch.equal(first, data.test_eval.transform(test[0][0]))


def test_same_seed_gives_same_backbone_with_and_without_lcr():
    a = make_model(ExperimentConfig(lcr=False, **TINY))
    b = make_model(ExperimentConfig(lcr=True, **TINY))
    for pa, pb in zip(a.backbone.parameters(), b.backbone.parameters()):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.projection_head.parameters(), b.projection_head.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr"])
def test_other_methods_build_and_step(method):
    cfg = ExperimentConfig(method=method, **TINY)
    model = make_model(cfg)
    data = make_data(cfg)
    views, label = data.ssl_train[0]
    batch = (
        [torch.stack([views[0]] * 4), torch.stack([views[1]] * 4)],
        torch.zeros(4, dtype=torch.long),
    )
    assert torch.isfinite(model.training_step(batch, 0))


def test_init_weights_load_and_bad_config(tiny_init):
    path, result = tiny_init
    assert 0 <= result["test_acc"] <= 1 and Path(path).exists()
    cfg = ExperimentConfig(weights=path, lcr=False, **TINY)
    model = make_model(cfg)
    state = torch.load(path)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    with pytest.raises(ConfigError, match="unknown config key 'epoch'; did you mean 'epochs'"):
        ExperimentConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="dataset: invalid value 'imagenet'; expected one of"):
        ExperimentConfig(dataset="imagenet")
    with pytest.raises(ConfigError, match="method: invalid value 'dino'; expected one of"):
        ExperimentConfig(method="dino")
    with pytest.raises(ConfigError, match="weights: file .*missing.pth does not exist"):
        make_model(ExperimentConfig(weights=str(Path(path).with_name("missing.pth"))))


def test_evaluate_scores_the_models_own_features_and_is_repeatable(tmp_path):
    from lcr_lightly.eval import knn_accuracy, linear_probe, retrieval_metrics

    cfg = ExperimentConfig(
        epochs=0, out_dir=str(tmp_path), **{k: v for k, v in TINY.items() if k != "epochs"}
    )
    model, data = make_model(cfg), make_data(cfg)
    results = evaluate(model, data, cfg)

    def features(dataset, pooling):  # the model's own features, computed here in eval mode
        set_pooling(model, pooling)
        model.eval()
        with torch.no_grad():
            x = torch.stack([dataset[i][0] for i in range(len(dataset))])
            return model(x), torch.tensor([dataset[i][1] for i in range(len(dataset))])

    for pooling in ("gap", "rationale"):
        (xtr, ytr), (xte, yte) = (
            features(data.train_eval, pooling),
            features(data.test_eval, pooling),
        )
        expected = retrieval_metrics(xte, yte)
        expected["knn"] = knn_accuracy(xtr, ytr, xte, yte)
        probe = linear_probe(xtr, ytr, xte, yte)
        expected["linear"], expected["linear_top5"] = probe["top1"], probe["top5"]
        assert results[pooling] == pytest.approx(expected, abs=1e-6), pooling
    assert results["gap"] != results["rationale"]
    assert evaluate(model, data, cfg) == results  # no state or RNG carried between calls


def test_helpers():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([0.5]) == (0.5, 0.0)
    text = format_table([("a", {"rank1": 0.5})], ["rank1", "mAP"])
    assert text.splitlines() == [  # columns aligned as printed
        "| run | rank1 | mAP |",
        "|-----|------:|----:|",
        "| a   |  50.0 |   – |",
    ]
