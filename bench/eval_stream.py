"""Streamed vs whole-model evaluation: wall time and peak RSS, same run, same inputs.

Synthesizes the original checkpoint of `--model` (tiny, or wide: gpt-oss-120b widths)
at `--layers` depth, takes its eval set from conf/ (conf/quality/<model>.yaml), and runs
the two evaluations both ways, each in its own process, alternating, `--trials` times:

  reference  the reference (top-k log-probs of every eval token) of the original
  validate   the per-token comparison of a model with that reference (the model is the
             original itself: the mxfp4 checkpoint, the largest layers a model has)

  streamed   tierquant.quality.evaluate (streamed_reference / streamed_token_stats): one
             decoder layer resident
  whole      tests/oracle.py: stock mlx_lm.load, one forward per batch, full logits

It prints each run's wall time (model load + evaluation, measured inside the process)
and peak RSS of the process, and per evaluation the ratios streamed / whole.

    python bench/eval_stream.py --model tiny
    python bench/eval_stream.py --model wide --layers 2 --workdir /big/scratch
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import sys
from pathlib import Path

from common import gb, run_measured, scratch_dir

PY = sys.executable
TESTS = Path(__file__).resolve().parent.parent / "tests"

CHILD = """
import sys, time
from pathlib import Path
import numpy as np
from tierquant.quality import evaluate
sys.path.insert(0, sys.argv[8])  # tests/: the whole-model oracle lives with the tests
import oracle
from tierquant.quality.stream import compute_dtype
original, tokens_file, task, path, top_k, batch, ref_dir = sys.argv[1:8]
tokens = np.load(tokens_file)
top_k, batch = int(top_k), int(batch)
start = time.perf_counter()
if task == "reference" and path == "streamed":
    ref = evaluate.streamed_reference(Path(original), tokens, top_k=top_k, batch_size=batch)
    evaluate.save_reference(ref, Path(ref_dir))
    value = ref.meta["ppl"]
elif task == "reference":
    model = oracle.load_whole(Path(original))
    chunks = oracle.whole_chunks(model, tokens, batch)
    ref = evaluate.compute_reference(
        chunks, tokens, top_k=top_k, vocab_size=model.args.vocab_size, dtype=compute_dtype()
    )
    value = ref.meta["ppl"]
else:
    ref = evaluate.load_reference(Path(ref_dir))
    if path == "streamed":
        stats = evaluate.streamed_token_stats(Path(original), ref, batch_size=batch)
    else:
        model = oracle.load_whole(Path(original))
        stats = evaluate.token_stats(oracle.whole_chunks(model, ref.tokens, batch), ref)
    value = float(np.exp(stats.nll.astype(np.float64).mean()))
print(f"EVAL_SECONDS {time.perf_counter() - start:.4f} PPL {value:.7g}")
"""


def synthesize(work: Path, model: str, layers: int | None):
    from tierquant.config import compose, validate
    from tierquant.quality.evalset import eval_windows
    from tierquant.source.synthetic import write_synthetic_checkpoint

    overrides = [f"model={model}"]
    if layers is not None:
        overrides.append(f"model.synthetic.num_hidden_layers={layers}")
    config = validate(compose(overrides))
    out = work / "original"
    out.mkdir()
    write_synthetic_checkpoint(out, config.model.synthetic)
    tokens = eval_windows(config.eval, out)
    return out, tokens, config.eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="conf/model entry: tiny or wide")
    parser.add_argument("--layers", type=int, default=None, help="depth (default: conf's)")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--streamed-only",
        action="store_true",
        help="skip the whole-model runs (e.g. to compare the streamed peak across depths)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    work = scratch_dir("tq-bench-eval-", args.workdir)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    try:
        import numpy as np

        original, tokens, ev = synthesize(work, args.model, args.layers)
        tokens_file = work / "tokens.npy"
        np.save(tokens_file, tokens)
        print(
            f"{args.model}: {tokens.shape[0]} window(s) x {tokens.shape[1]} tokens, top-{ev.top_k}"
        )
        ref_dir = work / "reference"
        for task in ("reference", "validate"):
            best: dict[str, tuple[float, int, str]] = {}
            for trial in range(args.trials):
                order = ("streamed", "whole") if trial % 2 == 0 else ("whole", "streamed")
                order = ("streamed",) if args.streamed_only else order
                for path in order:  # the streamed reference first: validate reads it
                    argv = [str(original), str(tokens_file), task, path]
                    argv += [str(ev.top_k), str(ev.batch_size), str(ref_dir), str(TESTS)]
                    if task == "reference" and path == "streamed" and ref_dir.exists():
                        shutil.rmtree(ref_dir)
                    m = run_measured([PY, "-c", CHILD, *argv])
                    found = re.search(r"EVAL_SECONDS ([0-9.]+) PPL (\S+)", m.output)
                    assert found, m.output[-2000:]
                    seconds, ppl = float(found.group(1)), found.group(2)
                    print(
                        f"  {task} trial {trial} {path:>8}: {seconds:8.2f} s  "
                        f"peak RSS {gb(m.peak_rss)}  PPL {ppl}",
                        flush=True,
                    )
                    prev = best.get(path)
                    best[path] = (
                        min(seconds, prev[0]) if prev else seconds,
                        max(m.peak_rss, prev[1]) if prev else m.peak_rss,
                        ppl,
                    )
            ss, sr, sp = best["streamed"]
            if "whole" not in best:
                print(f"{task}: streamed {ss:.2f} s, peak RSS {gb(sr)}, PPL {sp}", flush=True)
                continue
            ws, wr, wp = best["whole"]
            print(
                f"{task}: best wall whole {ws:.2f} s, streamed {ss:.2f} s; streamed / whole "
                f"= {ss / ws:.2f} (target <= 1.0) {'met' if ss <= ws else 'MISSED'}; "
                f"peak RSS whole {gb(wr)}, streamed {gb(sr)} (x{sr / wr:.2f}); "
                f"PPL whole {wp}, streamed {sp}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
