"""Reports of experiments: Markdown tables of metrics, mean and standard deviation over seeds."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np


def format_table(rows: List[Tuple[str, Dict[str, float]]], keys: List[str]) -> str:
    """A Markdown table of metric rows (fractions shown as percentages).

    Args:
        rows: ``(label, metrics)`` pairs.
        keys: Metric names to show.

    Returns:
        The table.
    """
    cells = [[f"{100 * m[k]:.1f}" if k in m else "–" for k in keys] for _, m in rows]
    return aligned_table(["run", *keys], [[label, *c] for (label, _), c in zip(rows, cells)])


def aligned_table(header: List[str], rows: List[List[str]]) -> str:
    """A Markdown table whose columns line up as printed (first column left, others right).

    Args:
        header: Column titles.
        rows: Cells, one list per row.

    Returns:
        The table.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: List[str]) -> str:
        first = cells[0].ljust(widths[0])
        return (
            "| " + " | ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]) + " |"
        )

    rule = "|" + "-" * (widths[0] + 2) + "|" + "".join("-" * (w + 1) + ":|" for w in widths[1:])
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
