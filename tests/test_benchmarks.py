"""The benchmark scripts run end to end on tiny budgets."""

import json
import re
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
    "stem_pool=true",
]


# The paper's protocol from the ImageNet EfficientNet-Lite0 (for users without ResNet-50
# weights): the same configs with two fields changed; 64 px keeps a 2x2 last map.
IMAGENET = ["backbone=efficientnet_lite0", "weights=imagenet", "image_size=64"]


@pytest.mark.parametrize(
    "table,config,extra",
    [
        (2, "table2_mocov2_cub.yaml", []),
        (3, "table3_byol_cub_bs128_official.yaml", []),
        (2, "table2_mocov2_cub.yaml", IMAGENET),
    ],
    ids=["table2", "table3", "table2-imagenet-efficientnet"],
)
def test_paper_tables_on_cub_layout_export(tmp_path, table, config, extra):
    text, _ = _paper_tables(tmp_path, table, config, [*extra, "label_fractions=[1.0]"])
    name = "MoCo v2" if table == 2 else "BYOL"
    for label in (name, f"{name} + Ours", f"{name} + Ours (rationale pooling)"):
        assert f"| {label} | honest: fixed budget (last epoch) |" in text
    assert f"| {name} (feature-norm) |" in text
    assert "official protocol" not in text
    # Table 2's paper numbers hold for any batch; Table 3's are for batch 128 (here 4)
    paper = (
        "| 17.07 |" if table == 2 else "| BYOL + Ours (paper) | paper (best epoch on test) | – |"
    )
    assert paper in text


def _paper_tables(tmp_path, table, config, sets, protocol=()):
    kw = dict(num_classes=3, image_size=32, seed=0)
    root = export_cub_layout(
        [
            SyntheticFineGrained(images_per_class=6, **kw),
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
            str(ROOT / "lcr_lightly/experiments/configs" / config),
            "--out",
            str(tmp_path / "out"),
            *protocol,
            "--set",
            *TINY,
            *sets,
            f"data_root={root}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    text = (tmp_path / "out" / f"table{table}.md").read_text()
    assert res.stdout.strip().endswith(text.strip().splitlines()[-1])
    return text, json.loads((tmp_path / "out" / f"table{table}.json").read_text())


def test_paper_tables_official_moco_both_protocols(tmp_path):
    """The official MoCo recipe, both protocols, every Table 2 column, on the CUB export."""
    text, rows = _paper_tables(
        tmp_path,
        2,
        "table2_mocov2_cub_official.yaml",
        ["epochs=2", "label_fractions=[1.0,0.5,0.2]"],
        ("--protocol", "both"),
    )
    head = next(line for line in text.splitlines() if line.startswith("| method |"))
    for column in ("rank-1", "rank-5", "mAP", "linear top-1 (100 %)", "linear top-5 (20 %)"):
        assert f"| {column} |" in head
    assert "| MoCo v2 + Ours (paper) | paper (best epoch on test) | 49.69 |" in text
    for pooling in ("gap", "rationale", "norm"):
        res = rows["MoCo v2 + Ours"]
        budget, official = res["fixed_budget"][pooling], res["official"][pooling]
        chosen = res["val_selected"][pooling]
        assert 1 <= chosen["epoch"] <= 2 and 1 <= official["epoch"] <= 2
        for key in ("rank1", "rank5", "mAP"):  # a maximum over epochs that include the last
            assert official[key] >= budget[key]
    line = next(
        row
        for row in text.splitlines()
        if row.startswith("| MoCo v2 + Ours (rationale pooling) | official protocol")
    )
    mine = rows["MoCo v2 + Ours"]["official"]["rationale"]
    assert line.split("|")[3].strip() == f"{100 * mine['rank1']:.2f}"


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


def _results_tables(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/results_tables.py"), *args],
        capture_output=True,
        text=True,
    )


def test_results_md_tables_are_what_the_json_gives():
    res = _results_tables("--check")
    assert res.returncode == 0, res.stdout + res.stderr


def test_results_tables_check_fails_on_a_hand_edited_number(tmp_path):
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    lines = text.splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if line.startswith("<!-- /table -->"))
    row = lines[end - 1]  # the last row of the first generated table
    digit = [m for m in re.finditer(r"\d+\.(\d)", row)][-1].start(1)
    edited_row = row[:digit] + str((int(row[digit]) + 1) % 10) + row[digit + 1 :]
    lines[end - 1] = edited_row
    md = tmp_path / "RESULTS.md"
    md.write_text("".join(lines))
    results = str(ROOT / "benchmarks/results")

    res = _results_tables(str(md), "--results", results, "--check")
    assert res.returncode == 1
    assert len(res.stdout.splitlines()) == 1 and "stale table" in res.stdout
    assert md.read_text() != text  # --check leaves the file alone
    assert _results_tables(str(md), "--results", results).returncode == 0
    assert md.read_text() == text


def _seeds(**metrics):
    """Per-seed results from {"pool__metric": [seed values]} (localization as loc__key)."""
    n = len(next(iter(metrics.values())))
    out = [{} for _ in range(n)]
    for name, values in metrics.items():
        pool, key = name.split("__")
        for seed, value in zip(out, values):
            seed.setdefault("localization" if pool == "loc" else pool, {})[key] = value
    return out


def test_results_tables_formatting_on_a_hand_computed_example(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results/toy.json").write_text(
        json.dumps(
            {
                "base": {},
                "runs": {
                    "base": _seeds(gap__rank1=[0.10, 0.12, 0.14], gap__mAP=[0.2, 0.2, 0.2]),
                    "lcr": _seeds(
                        gap__rank1=[0.09, 0.12, 0.12],
                        gap__mAP=[0.2, 0.2, 0.199],
                        rationale__rank1=[0.11, 0.15, 0.13],
                        rationale__mAP=[0.21, 0.22, 0.2],
                        loc__rationale_object_pointing=[0.5, 0.6, 0.7],
                    ),
                },
            }
        )
    )
    # a newer file: provenance and command, one seed
    (tmp_path / "results/one.json").write_text(
        json.dumps(
            {
                "base": {},
                "provenance": {"git": "abc"},
                "command": "python x.py",
                "runs": {"solo": _seeds(gap__rank1=[0.255], gap__mAP=[0.3])},
            }
        )
    )
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "Text before.\n\n"
        "<!-- table:\n"
        "study: toy\n"
        "columns:\n"
        '  - run: "{label}"\n'
        '  - rank-1: "{pool}:rank1"\n'
        '  - rank-1 / mAP: ["{pool}:rank1", "mean {pool}:mAP"]\n'
        '  - Δ rank-1: "delta:{pool}:rank1 vs base/gap:rank1"\n'
        '  - Δ mAP: "delta:{pool}:mAP vs base/gap:mAP"\n'
        '  - object: "loc:{pool}_object_pointing"\n'
        "rows:\n"
        "  - {run: base, pool: gap}\n"
        "  - {run: lcr, label: LCR, pool: gap}\n"
        "  - {run: lcr, label: LCR, pool: rationale}\n"
        "  - {run: base, label: base (rationale), pool: rationale}\n"
        "  - {run: solo, study: one, pool: gap, cells: {4: n/a, Δ mAP: n/a}}\n"
        "-->\n"
        "<!-- /table -->\n\n"
        "Text between.\n\n"
        "<!-- table:\n"
        "study: toy\n"
        "count: k\n"
        'missing: ""\n'
        "align: {run: right}\n"
        "columns:\n"
        '  - run: "{label}"\n'
        "  - Δ rank-1: mean delta:gap:rank1 vs base/gap:rank1\n"
        "  - object: loc:rationale_object_pointing\n"
        "rows: [{run: lcr, label: LCR}, base]\n"
        "-->\n"
        "| stale |\n"
        "<!-- /table -->\n"
    )
    res = _results_tables(str(md))
    assert res.returncode == 0, res.stdout + res.stderr
    # By hand, in %: base gap rank-1 10, 12, 14 -> 12.0 ± 2.0 (sample std); lcr gap rank-1
    # 9, 12, 12 -> 11.0 ± sqrt(3); paired differences -1, 0, -2 -> -1.0 ± 1.0, none above
    # zero; rationale rank-1 11, 15, 13 (13.0 ± 2.0) minus base: 1, 3, -1 -> +1.0 ± 2.0 (2/3);
    # gap mAP differences 0, 0, -0.1 -> -0.033 ± 0.058; rationale mAP 21, 22, 20 (mean 21.0)
    # minus 20: 1, 2, 0 -> +1.0 ± 1.0 (2/3); pointing 50, 60, 70 -> 60.0 ± 10.0.
    expected_first = [
        "| run | rank-1 | rank-1 / mAP | Δ rank-1 | Δ mAP | object |",
        "|---|---:|---:|---:|---:|---:|",
        "| base | 12.0 ± 2.0 | 12.0 ± 2.0 / 20.0 | – | – | – |",
        "| LCR | 11.0 ± 1.7 | 11.0 ± 1.7 / 20.0 | −1.0 ± 1.0 (0/3) | −0.0 ± 0.1 (0/3) | – |",
        "| LCR | 13.0 ± 2.0 | 13.0 ± 2.0 / 21.0 | +1.0 ± 2.0 (2/3) | +1.0 ± 1.0 (2/3) "
        "| 60.0 ± 10.0 |",
        "| base (rationale) | – | – | – | – | – |",
        "| solo | 25.5 ± 0.0 | 25.5 ± 0.0 / 30.0 | n/a | n/a | – |",
    ]
    expected_second = [
        "| run | Δ rank-1 | object |",
        "|---:|---:|---:|",
        "| LCR | −1.0 (0) | 60.0 ± 10.0 |",
        "| base | | |",
    ]
    text = md.read_text()
    assert text.startswith("Text before.\n\n<!-- table:\nstudy: toy\n")
    first, second = [
        block.split("-->\n", 1)[1].splitlines() for block in text.split("<!-- /table -->")[:2]
    ]
    assert first == expected_first
    assert second == expected_second
    assert "\n<!-- /table -->\n\nText between.\n\n" in text
    assert _results_tables(str(md), "--check").returncode == 0

    md.write_text(text.replace("{run: base, pool: gap}", "{run: bsae, pool: gap}"))
    res = _results_tables(str(md), "--check")
    assert res.returncode == 2 and "no run 'bsae'" in res.stderr


def test_mutation_score_writes_the_table_and_every_survivor(tmp_path):
    """Fake mutmut results: the report's counts are those computed here by hand."""
    pytest.importorskip("mutmut")
    mutants = tmp_path / "mutants" / "lcr_lightly"
    (mutants / "eval").mkdir(parents=True)
    # mutmut's exit codes: 1 killed, 0 survived, 36 timeout, 33 no tests, None not checked
    codes_a = {"a.f__mutmut_1": 1, "a.f__mutmut_2": 0, "a.f__mutmut_3": 36, "a.g__mutmut_1": None}
    codes_b = {"b.h__mutmut_1": 1, "b.h__mutmut_2": 1, "b.h__mutmut_3": 33}
    (mutants / "a.py.meta").write_text(json.dumps({"exit_code_by_key": codes_a}))
    (mutants / "eval" / "b.py.meta").write_text(json.dumps({"exit_code_by_key": codes_b}))
    out = tmp_path / "docs" / "mutation.md"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/mutation_score.py"),
            "--root",
            str(tmp_path / "mutants"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = out.read_text()
    # a: 4 mutants, 2 caught (killed, timeout) of 3 checked; b: 3 mutants, 2 of 3
    assert "| `lcr_lightly/a.py` | 4 | 2 | 1 | 0 | 66.7 % |" in text
    assert "| `lcr_lightly/eval/b.py` | 3 | 2 | 0 | 1 | 66.7 % |" in text
    assert "| all | 7 | 4 | 1 | 1 | 66.7 % |" in text
    assert "### `lcr_lightly/a.py` (1)\n\n- `a.f__mutmut_2`\n" in text
    assert "eval/b.py` (" not in text  # no survivor there
    assert "Neither caught nor survived: 1 not checked." in text
    from importlib.metadata import version

    commit = subprocess.run(
        ["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    assert f"mutmut {version('mutmut')}'s results" in text
    assert f"at commit `{commit}" in text
    assert res.stdout.splitlines()[0] == "| file | mutants | caught | survived | no tests | score |"
