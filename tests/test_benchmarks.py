"""The benchmark scripts run end to end on tiny budgets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcr_lightly.data import SyntheticFineGrained, export_cub_layout

ROOT = Path(__file__).parent.parent
TINY = [
    "backbone=small_resnet",
    "weights=null",
    "widths=[8,8,16,16]",
    "image_size=32",
    "epochs=1",
    "batch_size=4",
    "memory_bank_size=8",
    "precision=32-true",
    "num_workers=0",
    "progress=false",
]


@pytest.mark.parametrize(
    "table,config", [(2, "table2_mocov2_cub.yaml"), (3, "table3_byol_cub_bs32.yaml")]
)
def test_paper_tables_on_cub_layout_export(tmp_path, table, config):
    kw = dict(num_classes=3, image_size=32, seed=0)
    root = export_cub_layout(
        [
            SyntheticFineGrained(images_per_class=4, **kw),
            SyntheticFineGrained(images_per_class=3, split="test", **kw),
        ],
        tmp_path / "CUB_200_2011",
        progress=False,
    )
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/paper_tables.py"),
            "--table",
            str(table),
            "--config",
            str(ROOT / "benchmarks/configs" / config),
            "--out",
            str(tmp_path / "out"),
            "--set",
            *TINY,
            f"data_root={root}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    text = (tmp_path / "out" / f"table{table}.md").read_text()
    name = "MoCo v2" if table == 2 else "BYOL"
    assert f"| {name} + Ours |" in text and f"| {name} |" in text
    assert ("| 17.07" in text) if table == 2 else ("| 39.27" in text)


def test_retrieval_speed_script_runs():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/retrieval_speed.py"),
            "--n",
            "300",
            "--dim",
            "16",
            "--classes",
            "10",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "N=300" in res.stdout, res.stderr[-2000:]


def test_overhead_script_runs_on_cpu():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/overhead.py"),
            "--device",
            "cpu",
            "--backbone",
            "resnet18",
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--methods",
            "simsiam",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| simsiam |" in res.stdout and "relative to hand-written" in res.stdout


def test_precision_checks_script_on_cpu():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/precision_checks.py"),
            "--device",
            "cpu",
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for precision, dtype in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")):
        assert f"| {precision} | float32 / {dtype} / float32 |" in res.stdout
    assert "all checks passed" in res.stdout


def test_ablation_study_reuses_finished_runs(tmp_path):
    def study(*extra):
        return subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks/synthetic_ablation.py"),
                "--study",
                "main",
                "--out",
                str(tmp_path / "results"),
                "--set",
                *TINY,
                "num_classes=3",
                "images_per_class=4",
                "test_images_per_class=3",
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )

    first = study("--seeds", "0")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "reused" not in first.stdout
    runs = json.loads((tmp_path / "results/main.json").read_text())["runs"]
    assert set(runs) == {"baseline (no LCR)", "LCR default"}
    second = study("--seeds", "0", "1")  # seed 0 of both variants comes from the first call
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("seed 0 (reused") == 2 and "seed 1 (reused" not in second.stdout
    again = json.loads((tmp_path / "results/main.json").read_text())["runs"]
    assert all(again[name][0] == runs[name][0] and len(again[name]) == 2 for name in runs)
    # the paired table subtracts the baseline's GAP metrics seed by seed
    text = (tmp_path / "results/main.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| LCR default | gap | base"))
    diffs = [
        100 * (again["LCR default"][i]["gap"]["mAP"] - again["baseline (no LCR)"][i]["gap"]["mAP"])
        for i in range(2)
    ]
    mean = sum(diffs) / 2
    cell = row.split(" | ")[5]  # variant, pooling, baseline, rank1, rank5, mAP
    assert cell.startswith(f"{mean:+.1f} ± ") and cell.endswith(
        f"({sum(d > 1e-6 for d in diffs)}/2)"
    )
