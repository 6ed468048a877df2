"""The tests that involve time budgets pass with the machine loaded: two busy processes run beside them.

Slow (a few minutes): `make test-slow`. The budgets of these tests count this process's CPU time or work, not
wall time, so another process's load must not change what they see.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMED = ["tests/test_phase2_pool_auto.py", "tests/test_phase2_pool_fill.py"]
"""The tests whose rounds run on time budgets (the pool sized by timed teacher calls, the fill's deadline)."""


def _spin() -> None:
    while True:
        pass


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_timed_tests_pass_beside_a_cpu_hog() -> None:
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(2)]
    for h in hogs:
        h.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIMED], cwd=ROOT,
                              capture_output=True, text=True, timeout=1200)
    finally:
        for h in hogs:
            h.terminate()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
