"""Mutation score per file from mutmut's results (``make mutate`` prints it).

Reads ``mutants/**/*.py.meta`` (written by ``mutmut run``) and classifies every mutant
with mutmut's own status table. A mutant counts as caught when it was killed by a test,
timed out, or was rejected by the type check; the score is caught / checked.

    python benchmarks/mutation_score.py [--survivors]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List

from mutmut.stats import status_by_exit_code

CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}
UNCHECKED = {"not checked", "skipped", "check was interrupted by user"}


def collect(root: Path) -> Dict[str, Dict[str, str]]:
    """``{source file: {mutant name: status}}`` from mutmut's meta files under ``root``."""
    found: Dict[str, Dict[str, str]] = {}
    for meta in sorted(root.glob("**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        source = str(meta.relative_to(root)).removesuffix(".meta")
        found[source] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", action="store_true", help="list surviving mutants")
    args = parser.parse_args()
    results = collect(args.root)
    if not results:
        raise SystemExit(f"error: no mutmut results under {args.root}/; run `make mutate` first.")
    print("| file | mutants | caught | survived | no tests | score |")
    print("|---|---:|---:|---:|---:|---:|")
    survivors: List[str] = []
    total: Counter = Counter()
    for source, statuses in results.items():
        counts = Counter(statuses.values())
        caught = sum(counts[s] for s in CAUGHT)
        checked = sum(n for s, n in counts.items() if s not in UNCHECKED)
        survivors += [name for name, s in statuses.items() if s == "survived"]
        total.update({"n": len(statuses), "caught": caught, "checked": checked})
        total.update({"survived": counts["survived"], "no tests": counts["no tests"]})
        score = f"{100 * caught / checked:.1f} %" if checked else "–"
        print(
            f"| `{source}` | {len(statuses)} | {caught} | {counts['survived']} | "
            f"{counts['no tests']} | {score} |"
        )
    score = f"{100 * total['caught'] / total['checked']:.1f} %" if total["checked"] else "–"
    print(
        f"| all | {total['n']} | {total['caught']} | {total['survived']} | "
        f"{total['no tests']} | {score} |"
    )
    if args.survivors:
        print("\nSurvivors (`mutmut show NAME` prints the diff):")
        print("\n".join(survivors))


if __name__ == "__main__":
    main()
