"""The headline of a run: the few numbers `dvc exp show` and `dvc metrics show` compare.

An experiment is summed up by its size (bits per weight, GiB), its quality against the
original (mean KLD, top-1 agreement), its speed at the first benchmark context
(generation and prefill tok/s) and whether it passed the gate. Those are the DVC metrics
(`paths.headline/`, git-tracked, `cache: false`, so `main` shows them too); every other
figure stays in the stages' detailed JSON outputs (metrics/validate.json, metrics/size.json,
data/benchmark/*.json), which are outputs, not metrics.

- `quality.json` is written by the validate stage, also when the gate fails (so a failed
  experiment shows `passed: false` beside its figures); when validate could not measure,
  the measured keys are absent and `passed` is false.
- `<variant>.json` is written by benchmark@<variant>: `gen_tok_s`/`prefill_tok_s` and
  `peak_memory_gib` (the peak over every context) for the model, `orig_gen_tok_s`,
  `orig_prefill_tok_s`, `orig_peak_memory_gib` for the original (distinct names, so the
  table needs no file prefixes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tierquant.core.files import atomic_output, json_bytes, read_json
from tierquant.plan.size import GIB

QUALITY_FILE = "quality.json"
SPEED_PREFIX = {"model": "", "original": "orig_"}
QUALITY_KEYS = ("passed", "bpw", "GiB", "kld_mean", "top1")
# prefixed by SPEED_PREFIX[variant]
SPEED_KEYS = ("gen_tok_s", "prefill_tok_s", "peak_memory_gib")
# The headline columns of an experiment, in order (what `tierquant compare` shows).
COLUMNS = (*QUALITY_KEYS, *SPEED_KEYS)


def quality_headline(validate_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """passed, bpw, GiB, kld_mean, top1 from validate's metrics (None: not measured)."""
    m = validate_metrics or {}
    values = {
        "passed": m.get("passed") is True,
        "bpw": m.get("bits_per_weight"),
        "GiB": m["model_bytes"] / GIB if m.get("model_bytes") is not None else None,
        "kld_mean": m.get("kld_mean"),
        "top1": m.get("top1_agreement"),
    }
    return {
        k: v if isinstance(v, bool) else round(float(v), 4)
        for k in QUALITY_KEYS
        if (v := values[k]) is not None
    }


def speed_headline(bench_metrics: dict[str, Any], variant: str) -> dict[str, Any]:
    """Generation and prefill tok/s (medians) at the first benchmark context, and the
    peak memory over every context (bench.py's `memory.peak_gib`)."""
    prefix = SPEED_PREFIX[variant]
    speed = bench_metrics.get("speed") or {}
    if not speed:
        return {}
    first = speed[min(speed, key=int)]
    gen_tok_s, prefill_tok_s, peak_memory_gib = SPEED_KEYS
    out = {
        prefix + gen_tok_s: round(float(first["generation_tps"]["median"]), 2),
        prefix + prefill_tok_s: round(float(first["prefill_tps"]["median"]), 2),
    }
    peak = (bench_metrics.get("memory") or {}).get("peak_gib")
    if peak is not None:
        out[prefix + peak_memory_gib] = round(float(peak), 4)
    return out


def _write(path: Path, data: dict[str, Any]) -> None:
    with atomic_output(Path(path), is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(data))


def write_quality_headline(*, validate_path: Path, headline_dir: Path) -> dict[str, Any]:
    """`headline_dir/quality.json` from validate's metrics file (absent: passed false)."""
    metrics = read_json(validate_path) if Path(validate_path).is_file() else None
    data = quality_headline(metrics)
    _write(Path(headline_dir) / QUALITY_FILE, data)
    return data


def write_speed_headline(*, bench_path: Path, variant: str, headline_dir: Path) -> dict:
    """`headline_dir/<variant>.json` from benchmark@<variant>'s results file."""
    data = speed_headline(read_json(bench_path), variant)
    _write(Path(headline_dir) / f"{variant}.json", data)
    return data
