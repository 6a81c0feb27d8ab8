"""Benchmark the convert stage against `mlx_lm.convert --dequantize` on the same input.

For the tiny model and for synthetic checkpoints with gpt-oss-120b's full widths
(hidden 2880, 128 experts, vocab 201088) and 1 and 2 layers, prints throughput (GB/s of
bf16 written) and peak RSS of each, and the ratios ours / mlx-lm, all from one run.

    python bench/convert.py                 # tiny + wide with 1 and 2 layers
    python bench/convert.py --layers 1      # wide with 1 layer only
    python bench/convert.py --no-wide       # tiny only (seconds)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import VENV_BIN, dir_bytes, gb, run_measured, scratch_dir

PY = sys.executable


def synthesize(dest: Path, model: str, layers: int | None) -> None:
    overrides = [f"model={model}"] + (
        [f"model.synthetic.num_hidden_layers={layers}"] if layers else []
    )
    code = (
        "import sys; from tierquant.config import compose, validate; "
        "from tierquant.source.synthetic import write_synthetic_checkpoint; "
        "c = validate(compose(sys.argv[2:])); "
        "import pathlib; p = pathlib.Path(sys.argv[1]); p.mkdir(); "
        "write_synthetic_checkpoint(p, c.model.synthetic)"
    )
    run_measured([PY, "-c", code, str(dest), *overrides])


def bench_one(label: str, model: str, layers: int | None, work: Path) -> dict:
    src = work / f"{label}-original"
    synthesize(src, model, layers)
    ours_out, theirs_out = work / f"{label}-ours", work / f"{label}-mlx"
    ours = run_measured(
        [PY, "stages/convert.py", f"paths.original={src}", f"paths.float={ours_out}"]
    )
    ours_bytes = dir_bytes(ours_out)
    shutil.rmtree(ours_out)
    if layers == 1:
        # mlx-lm's gpt_oss needs both layer types (it looks up the first full-attention
        # and the first sliding-window layer), so it cannot load a 1-layer model.
        shutil.rmtree(src)
        print(
            f"{label:>8}: ours {ours.wall_s:6.1f} s {ours_bytes / ours.wall_s / 1e9:5.2f} GB/s "
            f"peak {gb(ours.peak_rss)} | mlx_lm.convert -d cannot load a 1-layer gpt-oss",
            flush=True,
        )
        return {
            "label": label,
            "ours_s": ours.wall_s,
            "ours_rss": ours.peak_rss,
            "ours_gbps": ours_bytes / ours.wall_s / 1e9,
            "ours_bytes": ours_bytes,
        }
    theirs = run_measured(
        [
            str(VENV_BIN / "mlx_lm.convert"),
            "--hf-path",
            str(src),
            "--mlx-path",
            str(theirs_out),
            "--dequantize",
        ]
    )
    theirs_bytes = dir_bytes(theirs_out)
    shutil.rmtree(theirs_out)
    shutil.rmtree(src)
    row = {
        "label": label,
        "ours_s": ours.wall_s,
        "ours_gbps": ours_bytes / ours.wall_s / 1e9,
        "ours_rss": ours.peak_rss,
        "ours_bytes": ours_bytes,
        "mlx_s": theirs.wall_s,
        "mlx_gbps": theirs_bytes / theirs.wall_s / 1e9,
        "mlx_rss": theirs.peak_rss,
        "mlx_bytes": theirs_bytes,
    }
    print(
        f"{label:>8}: ours {row['ours_s']:6.1f} s {row['ours_gbps']:5.2f} GB/s "
        f"peak {gb(row['ours_rss'])} | mlx_lm.convert -d {row['mlx_s']:6.1f} s "
        f"{row['mlx_gbps']:5.2f} GB/s peak {gb(row['mlx_rss'])} | "
        f"throughput ×{row['ours_gbps'] / row['mlx_gbps']:.2f}, "
        f"peak RSS ×{row['ours_rss'] / row['mlx_rss']:.2f} (ours/mlx-lm)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers",
        type=int,
        nargs="*",
        default=[1, 2],
        help="depths of the full-width synthetic checkpoints (default 1 2)",
    )
    parser.add_argument("--no-wide", action="store_true", help="only the tiny model")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (needs ~25 GB for 2 wide layers)"
    )
    args = parser.parse_args()
    work = scratch_dir("tq-bench-convert-", args.workdir)
    try:
        rows = [bench_one("tiny", "tiny", None, work)]
        if not args.no_wide:
            rows += [bench_one(f"wide-{n}L", "wide", n, work) for n in args.layers]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wide = {r["label"]: r for r in rows}
    if "wide-1L" in wide and "wide-2L" in wide:
        one, two = wide["wide-1L"]["ours_rss"], wide["wide-2L"]["ours_rss"]
        print(
            f"peak RSS, ours: 1 layer {gb(one)}, 2 layers {gb(two)} "
            f"(2L/1L ×{two / one:.2f}; streaming keeps it flat)"
        )
        print(f"peak RSS, mlx_lm.convert -d at 2 layers: {gb(wide['wide-2L']['mlx_rss'])}")


if __name__ == "__main__":
    main()
