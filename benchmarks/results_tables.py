"""Writes the marked tables of ``benchmarks/RESULTS.md`` from the study files ``results/*.json``.

A generated table sits between two HTML comments (invisible once rendered); the first holds
its SPEC in YAML::

    <!-- table:
    study: headline_5seeds         # reads results/headline_5seeds.json
    count: k/n                     # delta cells end in "(k/n)" (the default) or "(k)"
    missing: ""                    # what a missing value shows (default "–")
    defaults: {pool: gap}          # row variables every row starts from (optional)
    align: {K: right}              # optional; by default, columns with numbers align right
    columns:                       # "header: cell", in order
      - variant: "{label}"
      - mAP: "{pool}:mAP"
      - Δ mAP: "delta:{pool}:mAP vs baseline (no LCR)/gap:mAP"
      - GAP rank-1 / mAP: [mean gap:rank1, mean gap:mAP]   # a list is joined with " / "
    rows:                          # the runs, in order
      - baseline (no LCR)          # = {run: baseline (no LCR)}
      - {run: LCR nu=0.01, label: LCR ν = 0.01, pool: rationale}
      - {run: LCR nu=1, cells: {mAP: "–"}}   # a cell of this row only (header or 1-based index)
    -->
    | variant | mAP | Δ mAP | GAP rank-1 / mAP |
    ...
    <!-- /table -->

Every key of a row is a variable, ``{name}`` in a cell; ``label`` defaults to the run's name,
``study`` (a row from another study file) to the table's. A cell, once its variables are
substituted, is

- ``POOL:METRIC``: a pooling's metric for the row's run, mean ± std over its seeds, in %
  (``gap:rank1``, ``rationale:mAP``, ``norm:linear``);
- ``loc:KEY``: the same for a localisation entry (``loc:rationale_object_pointing``);
- ``RUN/POOL:METRIC``, ``RUN/loc:KEY``: the same for another run of the study;
- ``delta:A vs B`` (A and B as above): the per-seed differences A − B, seeds paired by their
  position in the file, in points: ``+m ± s (k/n)``, k the seeds on which A − B > 0. A
  difference of a value with itself is left out (missing);
- ``mean TERM``: the mean alone, without ``± s`` (``mean`` starts the cell as written);
- anything else: text, as written.

Numbers have one decimal, computed as ``results/<study>.md`` computes them (100 × the mean of
the fractions; the differences in points first, then their mean), so that the two agree to the
last digit; std is the sample standard deviation (0 for one seed). A metric or
pooling that a run lacks (no rationale for a baseline) is missing, and so is a localisation key
that no run has (``loc:gap_object_pointing``: GAP has no map); a run, a pooling or a metric
that the study file lacks altogether is an error.

    python benchmarks/results_tables.py            # rewrite every marked table in place
    python benchmarks/results_tables.py --check    # exit 1 if any table differs from the JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
BLOCK = re.compile(
    r"^<!-- table:(?P<spec>.*?)-->\n(?P<body>.*?)^<!-- /table -->$", re.DOTALL | re.MULTILINE
)
VALUE = re.compile(r"^(?:(?P<run>[^/]+)/)?(?P<source>\w+):(?P<key>\w+)$")
DELTA = re.compile(r"^delta:(?P<a>.+?) vs (?P<b>.+)$")
VARIABLE = re.compile(r"\{(\w+)\}")
TABLE_KEYS = {"study", "count", "missing", "defaults", "align", "columns", "rows"}
MINUS = "\u2212"
#: A paired difference counts as above zero beyond this many points (not float noise).
ABOVE_ZERO = 1e-6

Cell = Union[str, List[str]]


class SpecError(ValueError):
    """A table's SPEC is malformed or names something its study file lacks."""


@dataclass(frozen=True)
class Value:
    """One quantity of one run: ``source`` is a pooling or ``"loc"``."""

    run: str
    source: str
    key: str

    def __str__(self) -> str:
        return f"{self.run}/{self.source}:{self.key}"


class Study:
    """The per-seed results of one ``results/<study>.json``.

    Args:
        path: The JSON file: ``{"base": ..., "runs": {name: [per-seed results]}}``; newer
            files also carry ``"provenance"`` and ``"command"``, which are not needed here.
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SpecError(f"no study file {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(f"{path} is not JSON: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
            raise SpecError(f"{path} has no 'runs'")
        self.name = path.stem
        self.runs: Dict[str, List[Dict[str, Dict[str, float]]]] = data["runs"]
        self.known: Set[Tuple[str, str]] = {
            ("loc" if source == "localization" else source, key)
            for seeds in self.runs.values()
            for result in seeds
            for source, metrics in result.items()
            for key in metrics
        }

    def values(self, value: Value) -> Optional[List[float]]:
        """Per-seed values of ``value`` (fractions), or None where the run lacks it.

        Raises:
            SpecError: The study has no such run, pooling or metric, or only some seeds
                have it.
        """
        if value.run not in self.runs:
            raise SpecError(f"study {self.name!r} has no run {value.run!r}")
        if value.source != "loc" and (value.source, value.key) not in self.known:
            raise SpecError(f"study {self.name!r} has no {value.source}:{value.key}")
        source = "localization" if value.source == "loc" else value.source
        found = [seed.get(source, {}).get(value.key) for seed in self.runs[value.run]]
        if all(v is None for v in found):
            return None
        if any(v is None for v in found):
            raise SpecError(f"{value} is missing on some seeds of study {self.name!r}")
        return [float(v) for v in found]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def number(x: float, signed: bool = False) -> str:
    """One decimal, with a typographic minus (and a plus sign when ``signed``).

    The sign is that of ``x`` before rounding: a small negative difference reads ``−0.0``.
    """
    return (f"{x:+.1f}" if signed else f"{x:.1f}").replace("-", MINUS)


def format_values(values: Sequence[float], std: bool = True) -> str:
    """``mean ± std`` in % of per-seed fractions (``mean`` alone without ``std``)."""
    m, s = mean_std(values)
    return number(100 * m) + (f" ± {100 * s:.1f}" if std else "")


def format_delta(
    a: Sequence[float], b: Sequence[float], std: bool = True, total: bool = True
) -> str:
    """Paired per-seed differences ``a - b`` in points: ``+m ± s (k/n)``.

    Args:
        a: Per-seed fractions.
        b: The same seeds' fractions to subtract, in the same order.
        std: Show ``± s``.
        total: Show the number of seeds ``n`` after the count ``k`` of positive differences.

    Raises:
        SpecError: ``a`` and ``b`` have different numbers of seeds.
    """
    if len(a) != len(b):
        raise SpecError(f"cannot pair {len(a)} seeds with {len(b)}")
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    m, s = mean_std(diffs)
    above = sum(d > ABOVE_ZERO for d in diffs)
    count = f"({above}/{len(diffs)})" if total else f"({above})"
    return number(m, signed=True) + (f" ± {s:.1f}" if std else "") + " " + count


def parse_value(text: str, run: str) -> Optional[Value]:
    """``[RUN/]SOURCE:KEY`` as a Value (``run`` when none is named), else None."""
    match = VALUE.match(text.strip())
    if match is None:
        return None
    return Value(match["run"] or run, match["source"], match["key"])


class Table:
    """One marked table: its SPEC, and the markdown it gives.

    Args:
        spec: The YAML between ``<!-- table:`` and ``-->``.
        results: The folder of the study files.

    Raises:
        SpecError: The SPEC is malformed.
    """

    def __init__(self, spec: str, results: Path) -> None:
        try:
            data = yaml.safe_load(spec)
        except yaml.YAMLError as err:
            raise SpecError(f"SPEC is not YAML: {err}") from err
        if not isinstance(data, dict):
            raise SpecError("SPEC must be a YAML mapping")
        unknown = set(data) - TABLE_KEYS
        if unknown:
            raise SpecError(f"unknown SPEC keys {sorted(unknown)}; known: {sorted(TABLE_KEYS)}")
        for key in ("study", "columns", "rows"):
            if key not in data:
                raise SpecError(f"SPEC needs {key!r}")
        for key in ("columns", "rows"):
            if not isinstance(data[key], list):
                raise SpecError(f"{key!r} is a list ('- ...' lines)")
        self.results = results
        self.study = str(data["study"]).removesuffix(".json")
        if data.get("count", "k/n") not in ("k", "k/n"):
            raise SpecError("count must be 'k' or 'k/n'")
        self.total = data.get("count", "k/n") == "k/n"
        self.missing = str(data.get("missing", "–"))
        self.defaults: Dict[str, Any] = dict(data.get("defaults") or {})
        self.headers: List[str] = []
        self.cells: List[Cell] = []
        for column in data["columns"]:
            if not (isinstance(column, dict) and len(column) == 1):
                raise SpecError(f"a column is one 'header: cell' pair, not {column!r}")
            ((header, cell),) = column.items()
            self.headers.append(str(header))
            self.cells.append(self._cell(cell, str(header)))
        self.align: Dict[str, str] = dict(data.get("align") or {})
        for header, side in self.align.items():
            if header not in self.headers or side not in ("left", "right"):
                raise SpecError(f"align: {header!r}: {side!r} (a header: left or right)")
        self.rows: List[Dict[str, Any]] = [self._row(row) for row in data["rows"]]
        self._studies: Dict[str, Study] = {}

    @staticmethod
    def _cell(cell: Any, header: str) -> Cell:
        def text(part: Any) -> str:
            if isinstance(part, dict):  # {label} unquoted is a YAML mapping
                raise SpecError(f"{header!r}: quote a cell that starts with '{{': {part!r}")
            return str(part)

        return [text(part) for part in cell] if isinstance(cell, list) else text(cell)

    def _row(self, row: Any) -> Dict[str, Any]:
        row = {"run": row} if isinstance(row, str) else row
        if not isinstance(row, dict) or "run" not in row:
            raise SpecError(f"a row is a run name or a mapping with 'run', not {row!r}")
        out = {"study": self.study, **self.defaults, "label": row["run"], **row}
        overrides = {}
        for key, cell in (row.get("cells") or {}).items():
            if isinstance(key, int):
                index = key - 1
            else:
                index = self.headers.index(key) if key in self.headers else -1
            if not 0 <= index < len(self.headers):
                raise SpecError(f"row {row['run']!r}: no column {key!r}")
            overrides[index] = self._cell(cell, str(key))
        out["cells"] = overrides
        return out

    def _study(self, name: str) -> Study:
        name = str(name).removesuffix(".json")
        if name not in self._studies:
            self._studies[name] = Study(self.results / f"{name}.json")
        return self._studies[name]

    def _part(self, template: str, row: Dict[str, Any]) -> Tuple[Optional[str], bool]:
        """One cell part of one row: its text (None when missing) and whether it is a number."""

        def variable(match: re.Match[str]) -> str:
            if match[1] not in row:
                raise SpecError(f"row {row['run']!r} has no variable {match[1]!r}")
            return str(row[match[1]])

        std = not template.startswith("mean ")
        text = VARIABLE.sub(variable, template if std else template[len("mean ") :])
        study = self._study(row["study"])
        delta = DELTA.match(text)
        if delta:
            a, b = parse_value(delta["a"], row["run"]), parse_value(delta["b"], row["run"])
            if a is None or b is None:
                raise SpecError(f"{text!r}: delta:A vs B with A, B as [RUN/]POOL:METRIC")
            va, vb = study.values(a), study.values(b)
            if a == b or va is None or vb is None:
                return None, True
            return format_delta(va, vb, std=std, total=self.total), True
        value = parse_value(text, row["run"])
        if value is None:
            if not std:
                raise SpecError(f"'mean {text}': not [RUN/]POOL:METRIC")
            return text.replace("|", "\\|"), False
        values = study.values(value)
        return (None if values is None else format_values(values, std=std)), True

    def render(self) -> List[str]:
        """The table's markdown lines: header, alignment and one line per row.

        Raises:
            SpecError: The SPEC names a study, run or quantity that does not exist.
        """
        numeric = [False] * len(self.headers)
        lines = []
        for row in self.rows:
            cells = []
            for i, template in enumerate(self.cells):
                template = row["cells"].get(i, template)
                parts = template if isinstance(template, list) else [template]
                texts = []
                for part in parts:
                    text, is_number = self._part(part, row)
                    texts.append(text)
                    numeric[i] = numeric[i] or is_number
                if all(t is None for t in texts):
                    cells.append(self.missing)
                else:
                    cells.append(" / ".join("–" if t is None else t for t in texts))
            lines.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
        sides = [self.align.get(h, "right" if n else "left") for h, n in zip(self.headers, numeric)]
        return [
            "| " + " | ".join(self.headers) + " |",
            "|" + "|".join("---:" if side == "right" else "---" for side in sides) + "|",
            *lines,
        ]


def _first_difference(old: List[str], new: List[str]) -> str:
    """Where a stale table's lines first differ from the generated ones, in a few words."""
    for i, (a, b) in enumerate(zip(old, new)):
        if a == b:
            continue
        cells_a, cells_b = a.strip("|").split("|"), b.strip("|").split("|")
        if i >= 2 and len(cells_a) == len(cells_b):
            for j, (x, y) in enumerate(zip(cells_a, cells_b)):
                if x.strip() != y.strip():
                    return (
                        f"row {i - 1} ({cells_b[0].strip()}), column {j + 1}: "
                        f"{x.strip()!r} here, {y.strip()!r} from the JSON"
                    )
        return f"line {i + 1} of the table differs"
    return f"{len(old)} lines here, {len(new)} from the JSON"


def process(path: Path, results: Path) -> Tuple[str, List[str]]:
    """Regenerates every marked table of a markdown file.

    Args:
        path: The markdown file.
        results: The folder of the study files.

    Returns:
        The regenerated text, and one message per stale table.

    Raises:
        SpecError: A SPEC is malformed (the message names its line).
    """
    text = path.read_text()
    stale: List[str] = []

    def regenerate(match: re.Match[str]) -> str:
        line = text.count("\n", 0, match.start()) + 1
        try:
            table = Table(match["spec"], results)
            new = table.render()
        except SpecError as err:
            raise SpecError(f"{path}:{line}: {err}") from err
        old = match["body"].splitlines()
        if old != new:
            stale.append(
                f"{path}:{line}: stale table ({table.study}.json): {_first_difference(old, new)}"
            )
        return f"<!-- table:{match['spec']}-->\n" + "\n".join(new) + "\n<!-- /table -->"

    return BLOCK.sub(regenerate, text), stale


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Rewrites (or with ``--check`` compares) the marked tables; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("markdown", nargs="?", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--results", type=Path, help="folder of the study files (default: results/ beside it)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    args = parser.parse_args(argv)
    results = args.results or args.markdown.parent / "results"
    try:
        text, stale = process(args.markdown, results)
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    count = len(BLOCK.findall(args.markdown.read_text()))
    if args.check:
        for message in stale:
            print(message)
        if stale:
            return 1
        print(f"{args.markdown}: {count} tables match the JSON")
        return 0
    if stale:
        args.markdown.write_text(text)
    print(f"{args.markdown}: {count} tables, {len(stale)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
