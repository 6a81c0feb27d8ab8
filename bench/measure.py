"""The measure stage at gpt-oss-120b widths: its wall time and peak RSS at several depths.

For each depth N, in a fresh clone of this repo composed for `model=wide` (hidden 2880,
128 experts in mxfp4, vocab 201088) with N layers: `dvc repro measure` (download →
measure). Prints measure's own wall time and peak RSS (logged by the stage),
the process tree's peak, and each depth's measure peak against the first depth's
(measure keeps one layer resident, so the peak must not grow with depth).

    python bench/measure.py --layers 2 4 --workdir /big/scratch   # ~45 GB at 4 layers
"""

from __future__ import annotations

import argparse
import platform
import shutil
from pathlib import Path

from common import VENV_BIN, gb, run_measured, scratch_dir
from pipeline import prepare_clone, stage_peaks, stage_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--model", default="wide", help="conf/model entry (default wide)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder")
    args = parser.parse_args()
    work = scratch_dir("tq-bench-measure-", args.workdir)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    rows = []
    try:
        for layers in args.layers:
            repo = prepare_clone(work, args.model, layers)
            m = run_measured([str(VENV_BIN / "dvc"), "repro", "measure"], cwd=repo)
            times, peaks = stage_times(m.output), stage_peaks(m.output)
            rows.append((layers, times["measure"], peaks["measure"], m.peak_rss))
            print(
                f"{layers} layers: measure {times['measure']:.1f} s, peak RSS "
                f"{gb(peaks['measure'])}; `dvc repro measure` {m.wall_s:.1f} s, tree peak "
                f"{gb(m.peak_rss)}",
                flush=True,
            )
            shutil.rmtree(repo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = rows[0]
    for layers, seconds, peak, _ in rows[1:]:
        ratio = peak / first[2]
        print(
            f"measure peak RSS, {layers} vs {first[0]} layers: {gb(peak)} / {gb(first[2])} = "
            f"×{ratio:.2f} (target: within 10%) {'met' if abs(ratio - 1) <= 0.10 else 'MISSED'}; "
            f"time ×{seconds / first[1]:.2f}"
        )


if __name__ == "__main__":
    main()
