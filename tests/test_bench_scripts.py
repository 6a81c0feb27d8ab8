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


def test_mac_predictions_are_the_ones_benchmarks_md_quotes():
    """bench/mac.py (headers only: seconds) prints the predicted Mac tables that
    BENCHMARKS.md quotes: the seed's size and bytes per token, the 64 GiB fit row and
    the 400 GB/s bounds."""
    done = subprocess.run(
        [sys.executable, "bench/mac.py"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    doc = (REPO / "BENCHMARKS.md").read_text()
    for quoted in (
        "seed recipe: 51,949,344,384 bytes (48.38 GiB), 3.557 bits/weight; 2.805 GB",
        "original: 65,248,815,744 bytes (60.77 GiB), 4.468 bits/weight; 5.003 GB",
        "seed recipe: 9,811,241,088 bytes (9.14 GiB), 3.753 bits/weight; 2.013 GB",
        "| 64 GiB | 48 / 56 GiB | 0 | 131,072 | 0 | 0 |",
        "| M2 Max | 400 | 140 | 135 | 79 | 78 |",
    ):
        assert quoted in out, (quoted, out)
    assert "| 64 GiB | 48 / 56 GiB | 0 | 131,072 | 0 | 0 |" in doc
    assert "| M1 Max, M2 Max, M3 Max (40-core GPU) | 400 | 140 | 135 | 79 | 78 |" in doc


GPTQ_WIDE_FAKE = """
import sys
sys.path.insert(0, "bench")
import gptq_wide as g

def depth(layers):
    tiers = {t: {"matrices": 3, "gflop": 100.0 * layers, "wall_s": 10.0 * layers,
                 "stage_s": 9.0 * layers, "cpu_s": 8.0 * layers, "stage_rss": 1e9,
                 "tree_rss": 1.1e9, "bytes": 1e8 * layers} for t in ("sensitive", "experts")}
    total = {k: sum(r[k] for r in tiers.values()) for k in ("gflop", "wall_s", "stage_s", "cpu_s")}
    return {"layers": layers, "experts": 16, "tiers": tiers, "total": total,
            "resident": (3e8, 2e9), "calibration_bytes": 192}

s = g.compare_depths(depth(2), depth(4))
cases = {"stream_s": 2.0, "stream_cpu": 2.0, "long_s": 6.0, "long_cpu": 6.0,
         "long_tokens": 256, "tokens": 16, "recorded_bytes": 16 * 30016 * 4}
g.estimate_120b(depth(4), s["marginal_gflop_per_cpu"], cases, True)
"""


def test_gptq_wide_arithmetic():
    """bench/gptq_wide.py's comparison and 120B estimate on made-up measurements (the
    runs themselves take half an hour): the ratio, the marginal rate, gptq_flops at 120B,
    and the summary line; and --help."""
    done = subprocess.run(
        [sys.executable, "-c", GPTQ_WIDE_FAKE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "4 vs 2 layers: 1.00 GB / 1.00 GB = ×1.000 (target ≤ 1.10) met" in out
    assert "marginal 12.50 GFLOP per CPU second" in out
    # 36 layers × 128 experts × 3 × gptq_flops(2880, 2880) + attention + lm_head
    assert "experts 550,262 + attention q/k/v/o 6,637 + lm_head 1,683 = 558,582 GFLOP" in out
    assert "GPTQ at gpt-oss-120b: disk 48.4 GiB (as rtn), memory ~" in out
    helped = subprocess.run(
        [sys.executable, "bench/gptq_wide.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "--experts" in helped.stdout
