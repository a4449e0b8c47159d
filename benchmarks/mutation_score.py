"""Mutation score per file from mutmut's results (``make mutate`` runs it).

Reads ``mutants/**/*.py.meta`` (written by ``mutmut run``) and classifies every mutant
with mutmut's own status table. A mutant counts as caught when it was killed by a test,
timed out, or was rejected by the type check; the score is caught / checked.

Prints the table; ``--survivors`` also lists the surviving mutants, and ``--out FILE``
writes both to a generated markdown file (``make mutate``: ``docs/mutation.md``) headed
by the command, the date, the mutmut version and the git commit of the working tree::

    python benchmarks/mutation_score.py [--survivors] [--out docs/mutation.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional

from mutmut.stats import status_by_exit_code

CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}
UNCHECKED = {"not checked", "skipped", "check was interrupted by user"}
COMMAND = "python benchmarks/mutation_score.py --out docs/mutation.md"


def collect(root: Path) -> Dict[str, Dict[str, str]]:
    """``{source file: {mutant name: status}}`` from mutmut's meta files under ``root``."""
    found: Dict[str, Dict[str, str]] = {}
    for meta in sorted(root.glob("**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        source = str(meta.relative_to(root)).removesuffix(".meta")
        found[source] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return found


def score_table(results: Dict[str, Dict[str, str]]) -> List[str]:
    """The markdown table: one row per file and a total row."""
    rows = [
        "| file | mutants | caught | survived | no tests | score |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total: Counter = Counter()
    for source, statuses in results.items():
        counts = Counter(statuses.values())
        caught = sum(counts[s] for s in CAUGHT)
        checked = sum(n for s, n in counts.items() if s not in UNCHECKED)
        total.update({"n": len(statuses), "caught": caught, "checked": checked})
        total.update({"survived": counts["survived"], "no tests": counts["no tests"]})
        score = f"{100 * caught / checked:.1f} %" if checked else "–"
        rows.append(
            f"| `{source}` | {len(statuses)} | {caught} | {counts['survived']} | "
            f"{counts['no tests']} | {score} |"
        )
    score = f"{100 * total['caught'] / total['checked']:.1f} %" if total["checked"] else "–"
    rows.append(
        f"| all | {total['n']} | {total['caught']} | {total['survived']} | "
        f"{total['no tests']} | {score} |"
    )
    return rows


def survivors(results: Dict[str, Dict[str, str]]) -> Dict[str, List[str]]:
    """``{source file: [surviving mutant names]}``, files without survivors left out."""
    found = {
        source: [name for name, status in statuses.items() if status == "survived"]
        for source, statuses in results.items()
    }
    return {source: names for source, names in found.items() if names}


def git_commit(cwd: Path) -> str:
    """The short commit of ``cwd``'s checkout, ``-dirty`` with uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "--short=7", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


def report(results: Dict[str, Dict[str, str]], commit: str, date: str, mutmut_version: str) -> str:
    """The generated markdown file: provenance, the score table, every survivor."""
    statuses = Counter(s for file in results.values() for s in file.values())
    lines = [
        "# Mutation score",
        "",
        "<!-- Generated: do not edit. `make mutate` rewrites this file. -->",
        "",
        f"Written by `{COMMAND}` on {date} from mutmut {mutmut_version}'s results in",
        f"`mutants/`, in a checkout at commit `{commit}`. mutmut re-tests only the",
        "functions that changed since its last run, so every mutant was checked against the",
        "tests of that commit or of the earlier one its function last changed in. Caught:",
        "killed, timed out or rejected by the type check; the score is caught over checked.",
        "",
        *score_table(results),
        "",
    ]
    others = {s: n for s, n in statuses.items() if s not in CAUGHT | {"survived", "no tests"}}
    if others:
        shown = ", ".join(f"{n} {s}" for s, n in sorted(others.items()))
        lines += [f"Neither caught nor survived: {shown}.", ""]
    found = survivors(results)
    lines += ["## Survivors", ""]
    if not found:
        lines += ["None.", ""]
    else:
        lines += [
            "`mutmut show NAME` prints one; the reasons those judged equivalent survive are",
            "in [mutation-review.md](mutation-review.md).",
            "",
        ]
        for source, names in found.items():
            lines += [f"### `{source}` ({len(names)})", ""]
            lines += [f"- `{name}`" for name in names]
            lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", action="store_true", help="list surviving mutants")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    results = collect(args.root)
    if not results:
        raise SystemExit(f"error: no mutmut results under {args.root}/; run `make mutate` first.")
    print("\n".join(score_table(results)))
    if args.survivors:
        print("\nSurvivors (`mutmut show NAME` prints the diff):")
        print("\n".join(name for names in survivors(results).values() for name in names))
    if args.out is not None:
        text = report(
            results,
            commit=git_commit(Path.cwd()),
            date=datetime.date.today().isoformat(),
            mutmut_version=version("mutmut"),
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
