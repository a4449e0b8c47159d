"""Running a check in a fresh interpreter, so that a native crash fails one test only.

A segfault or abort inside a native backend (oneDNN, OpenMP, a BLAS) kills the process
that hit it. Inside pytest that is the whole suite. :func:`run_isolated` calls a function
of a test module in a subprocess and turns its death by a signal into an ordinary test
failure that names the signal and shows the end of the child's output.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KNOWN_ISSUES = "docs/known-issues.md"


def run_isolated(target: str, *args: Any, timeout: float = 300.0) -> str:
    """Calls ``module:function(*args)`` in a fresh Python process.

    Args:
        target: ``"tests.test_x:function"``; the function raises (e.g. an
            ``AssertionError``) to fail.
        *args: JSON-serialisable arguments.
        timeout: Seconds before the child is killed.

    Returns:
        The child's standard output.
    """
    module, function = target.split(":")
    code = (
        f"import json, sys\nfrom {module} import {function}\n{function}(*json.loads(sys.argv[1]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(
            f"{target}{tuple(args)} crashed the interpreter with {name}: a native backend "
            f"died (see {KNOWN_ISSUES}). Output of the child:\n{tail}",
            pytrace=False,
        )
    if proc.returncode != 0:
        pytest.fail(f"{target}{tuple(args)} failed:\n{tail}", pytrace=False)
    return proc.stdout
