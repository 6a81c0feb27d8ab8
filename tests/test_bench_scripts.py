"""The bench/ scripts run as their docs say (not their timings: those are measurements)."""

from __future__ import annotations

import subprocess
import sys

from bench.common import REPO, scratch_dir


def test_scratch_dir_creates_a_missing_workdir(tmp_path):
    workdir = tmp_path / "not" / "yet"
    first, second = scratch_dir("tq-x-", workdir), scratch_dir("tq-x-", workdir)
    assert first.is_dir() and second.is_dir() and first != second
    assert first.parent == workdir and first.name.startswith("tq-x-")


def test_quantize_bench_end_to_end(tmp_path):
    """bench/quantize.py on a 2-expert stack, into a workdir that does not exist yet: it
    checks that our stage's bytes are the same on 1 and on every stream and equal
    mlx-lm's own (an assert in the script), then removes its files."""
    workdir = tmp_path / "scratch" / "bench"
    done = subprocess.run(
        [sys.executable, "bench/quantize.py", "--experts", "2", "--workdir", str(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outputs identical, and identical to mlx-lm's" in done.stdout
    assert workdir.is_dir() and not any(workdir.iterdir())
