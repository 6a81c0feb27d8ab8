"""The whole pipeline at gpt-oss-120b widths, against doing the same work with mlx-lm.

For each depth N, on a synthetic checkpoint with gpt-oss-120b's full widths (hidden
2880, 128 experts, vocab 201088) in a fresh clone of this repo, in one invocation:

  ours       `dvc repro validate`: download (synthesize) → plan → predict →
             quantize@tiers → assemble → reference → validate (benchmarks off; the seed
             recipe: no measure, no bf16 checkpoint)
  mlx-lm     `mlx_lm.convert --dequantize`, then `mlx_lm.convert -q` with the same
             per-module bits as our seed recipe (a quant predicate built from our plan)
  experts=4  `dvc exp run -S tiers.experts=4 validate` after the full run
  attn=6     `dvc exp run -S tiers.attention=6 validate`
  no-op      `dvc repro validate` with nothing changed

and prints per step: wall time, peak RSS of the whole process tree (sampled every
20 ms) and of each stage (its own ru_maxrss, logged by every stage), bytes written
(kernel write accounting of the process tree) and the share of wall time DVC spends
itself (hashing, checkout, locks: wall time minus the stages' own, which every stage
logs), with ratios and the targets from the issues beside them: the whole run's wall
time against the mlx-lm path's; the same work's (our run less the synthesis of the input
and the evaluation stages measure, reference and validate, DVC's own time kept in)
against `convert -d` + `convert -q`; our quantize stages' own time against `convert -q`
alone; DVC's share of the full run and of each experiment. The mlx-lm path runs after
ours, with only data/original kept (disk). For the streamed stages (reference, validate)
it prints the memory bound they should stay under: the largest layer's resident bytes
(its tensors, every bf16 one counted 3x: the bf16 read plus the float32 copy the CPU
computes with; the original's gate_up 2x: mlx-lm's sanitize splits it into copies) +
the eval set's hidden states (4 copies) + one vocab slice (6 copies of its float32
logits, its head rows in bf16 and float32) + the embedding rows in use + the
interpreter with mlx/mlx-lm imported (measured), and compares each depth's peak with
the first's.

    python bench/pipeline.py --layers 2 3 4 --workdir /big/scratch   # ~60 GB at 4 layers
    python bench/pipeline.py --layers 2 --profile-dvc   # + where an experiment's DVC time goes
    python bench/pipeline.py --layers 2 --profile-dvc tiers.experts=5   # ... of another one
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
from pathlib import Path

from common import VENV_BIN, Measured, copy_checkout, dir_bytes, gb, run_measured, scratch_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PY = sys.executable
STAGE_TIME = re.compile(r"stage (\S+) finished in ([0-9.]+) s(?:, peak RSS ([0-9.]+) MB)?")
# The stages that evaluate (the mlx-lm path does none of this work): everything else is
# the conversion, whose peak and wall time compare with mlx_lm.convert's.
EVAL_STAGES = ("reference", "validate", "measure")
# download synthesizes the checkpoint here; the mlx-lm path starts from it on disk
INPUT_STAGES = ("download",)

MLX_QUANTIZE = """
import sys
from pathlib import Path
from mlx_lm.convert import convert
from tierquant.config import compose, validate
from tierquant.core.gptoss import shape_of_checkpoint
from tierquant.plan.handplan import plan_tiers

float_dir, out = sys.argv[1], sys.argv[2]
config = validate(compose())  # run inside the clone: its conf/ (model=wide, N layers)
precisions = config.precisions()
tiers = plan_tiers(shape_of_checkpoint(Path(float_dir)), config.recipe)
bits = {w.module: precisions[t].quantization() for t, ws in tiers.items() for w in ws
        if w.is_matrix}
convert(float_dir, out, quantize=True, q_group_size=config.quant.group_size,
        quant_predicate=lambda path, module, *rest: bits.get(path) or False)
"""


def stage_seconds(output: str) -> float:
    return sum(float(m.group(2)) for m in STAGE_TIME.finditer(output))


def stage_times(output: str) -> dict[str, float]:
    """Each stage's own wall time in seconds, from the line every stage logs."""
    return {m.group(1): float(m.group(2)) for m in STAGE_TIME.finditer(output)}


def stage_peaks(output: str) -> dict[str, float]:
    """Each stage's own peak RSS in bytes, from the line every stage logs."""
    return {
        m.group(1): float(m.group(3)) * 2**20 for m in STAGE_TIME.finditer(output) if m.group(3)
    }


def step_row(name: str, m: Measured) -> dict:
    stages = stage_seconds(m.output)
    return {
        "step": name,
        "wall_s": m.wall_s,
        "peak_rss": m.peak_rss,
        "bytes_written": m.bytes_written,
        "stage_s": stages,
        "dvc_share": max(0.0, 1 - stages / m.wall_s) if stages else None,
        "ran": sorted({m.group(1) for m in STAGE_TIME.finditer(m.output)}),
        "stage_peak_rss": stage_peaks(m.output),
        "stage_times": stage_times(m.output),
    }


def stream_bound(repo: Path, checkpoint: str, baseline: int) -> dict:
    """The memory bound of a streamed evaluation of data/<checkpoint> (see the docstring)."""
    from tierquant.core.checkpoint import Checkpoint
    from tierquant.quality.stream import vocab_chunk_for

    with Checkpoint(repo / "data" / checkpoint) as ckpt:
        layers: dict[int, int] = {}
        for name, info in ckpt.tensors.items():
            if name.startswith("model.layers."):
                i = int(name.split(".")[2])
                layers[i] = layers.get(i, 0) + info.nbytes * _resident_factor(name, info.dtype)
        hidden = ckpt.config["hidden_size"]
        vocab = ckpt.config["vocab_size"]
    ev = _eval_params(repo)
    tokens = ev["num_windows"] * ev["window_length"]
    activations = 4 * tokens * hidden * 4
    cols = min(vocab, vocab_chunk_for(tokens, hidden))
    vocab_chunk = 6 * tokens * cols * 4 + cols * hidden * 6  # logits copies + head rows
    embed_rows = min(tokens, vocab) * hidden * 3 * 2
    largest = max(layers.values())
    total = largest + activations + vocab_chunk + embed_rows + baseline
    return {
        "largest_layer": largest,
        "activations": activations,
        "vocab_chunk": vocab_chunk,
        "embed_rows": embed_rows,
        "baseline": baseline,
        "bound": total,
    }


def _resident_factor(name: str, dtype: str) -> int:
    """Bytes resident per byte on disk while a layer runs: a bf16 tensor is read and cast
    to float32 (x3); the original's interleaved gate_up is read and split into gate and
    up copies by mlx-lm's sanitize (x2)."""
    if dtype == "BF16":
        return 3
    return 2 if "gate_up_proj" in name else 1


def _eval_params(repo: Path) -> dict:
    import yaml

    return yaml.safe_load((repo / "params.yaml").read_text())["eval"]


def import_baseline() -> int:
    """Peak RSS of an interpreter that imports what the evaluation stages import."""
    code = "import mlx.core, mlx_lm.utils, mlx_lm.models.gpt_oss, tierquant.quality.evaluate"
    return run_measured([PY, "-c", code]).peak_rss


def prepare_clone(work: Path, model: str, layers: int) -> Path:
    repo = copy_checkout(work / f"repo-{layers}L")
    conf = repo / "conf" / "config.yaml"
    conf.write_text(conf.read_text().replace("- model: tiny", f"- model: {model}", 1))
    model_conf = repo / "conf" / "model" / f"{model}.yaml"
    model_conf.write_text(
        re.sub(
            r"num_hidden_layers: \d+",
            f"num_hidden_layers: {layers}",
            model_conf.read_text(),
            count=1,
        )
    )
    run_measured([PY, "-m", "tierquant.config", "--write"], cwd=repo)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    run_measured([*git, "commit", "-qam", f"{model}, {layers} layers", "--allow-empty"], cwd=repo)
    return repo


DVC_PROFILE_ROWS = {
    "the stages' processes": "posix.waitpid",
    "dvc.lock updated after each stage (read + write)": "dvcfile.py:283(_dump_lockfile)",
    "  of which reading it (round-trip YAML)": "_yaml.py:33(parse_yaml_for_update)",
    "dvc.yaml validated (strictyaml)": "strictyaml.py:281(load)",
    "hashing (build a tree's hashes)": "build.py",
    "outputs committed / linked": "output.py",
    "git (scmrepo)": "scmrepo",
}


def print_dvc_profile(prof: Path, override: str) -> None:
    """Where an experiment's wall time went, from DVC's own cProfile dump: the total, and
    the cumulative time of the functions that matter (stages, lock file, hashing, git)."""
    import pstats

    stats = pstats.Stats(str(prof))
    total = max(v[3] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"   profile of `dvc exp run -S {override}` (cProfile on): {total:.1f} s")
    for label, needle in DVC_PROFILE_ROWS.items():
        matches = [
            (func, v[3])
            for func, v in stats.stats.items()  # type: ignore[attr-defined]
            if needle in f"{func[0]}:{func[1]}({func[2]})"
        ]
        # The outermost match only: cumulative times of nested matches overlap.
        best = max((t for _, t in matches), default=0.0)
        print(f"     {label}: {best:.1f} s ({100 * best / total:.0f}%)")


def bench_depth(work: Path, model: str, layers: int, profile_dvc: str | None = None) -> dict:
    repo = prepare_clone(work, model, layers)
    dvc = str(VENV_BIN / "dvc")
    rows = []
    print(f"\n== model {model}, {layers} layer(s) ==", flush=True)
    steps = [
        ("ours: dvc repro", [dvc, "repro", "validate"]),
        ("experts=4", [dvc, "exp", "run", "-S", "tiers.experts=4", "validate"]),
        ("attention=6", [dvc, "exp", "run", "-S", "tiers.attention=6", "validate"]),
        ("no-op repro", [dvc, "repro", "validate"]),
    ]
    for name, cmd in steps:
        m = run_measured(cmd, cwd=repo)
        rows.append(step_row(name, m))
        print(_fmt(rows[-1]), flush=True)
        times = ", ".join(
            f"{x.group(1)} {float(x.group(2)):.1f} s"
            + (f"/{float(x.group(3)):.0f} MB" if x.group(3) else "")
            for x in STAGE_TIME.finditer(m.output)
        )
        print(f"   stages (time/peak RSS): {times or 'none ran'}", flush=True)
        if name == "ours: dvc repro":
            sizes = {p: dir_bytes(repo / "data" / p) for p in ("original", "float", "model")}
            sizes["quantized"] = dir_bytes(repo / "data" / "quantized")
            sizes["dvc cache"] = dir_bytes(repo / ".dvc" / "cache")
            print(
                "   disk (apparent sizes; links counted once per path): "
                + ", ".join(f"{k} {gb(v)}" for k, v in sizes.items()),
                flush=True,
            )
            baseline = import_baseline()
            bounds = {
                "reference": stream_bound(repo, "original", baseline),
                "validate": stream_bound(repo, "model", baseline),
            }
            for stage, b in bounds.items():
                peak = rows[-1]["stage_peak_rss"].get(stage, 0)
                print(
                    f"   {stage} peak RSS {gb(peak)} vs bound {gb(b['bound'])} = largest layer "
                    f"{gb(b['largest_layer'])} + activations {gb(b['activations'])} + vocab "
                    f"slice {gb(b['vocab_chunk'])} + embedding rows {gb(b['embed_rows'])} + "
                    f"interpreter {gb(b['baseline'])}: "
                    f"{'within' if peak <= b['bound'] else 'OVER'}",
                    flush=True,
                )
            rows[-1]["bounds"] = bounds
            links = _shared_inodes(repo)
            print(
                f"   data/model shards sharing an inode with a data/quantized shard: "
                f"{links[0]}/{links[1]}",
                flush=True,
            )
    if profile_dvc:
        prof = work / f"dvc-{profile_dvc.replace('=', '-')}-{layers}L.prof"
        run_measured(
            [
                dvc,
                "exp",
                "run",
                "-S",
                profile_dvc,
                "validate",
                "--cprofile-dump",
                str(prof),
            ],
            cwd=repo,
        )
        print_dvc_profile(prof, profile_dvc)
    # Only the original (and the clone's conf, which MLX_QUANTIZE composes) is needed
    # from here on: free the rest of our run's disk first.
    shutil.copytree(repo / "conf", work / f"conf-{layers}L" / "conf")
    shutil.copy2(repo / "dvc.yaml", work / f"conf-{layers}L" / "dvc.yaml")
    original = work / f"original-{layers}L"
    (repo / "data" / "original").rename(original)
    shutil.rmtree(repo)
    mlx_float, mlx_model = work / f"mlx-float-{layers}L", work / f"mlx-model-{layers}L"
    m1 = run_measured(
        [
            str(VENV_BIN / "mlx_lm.convert"),
            "--hf-path",
            str(original),
            "--mlx-path",
            str(mlx_float),
            "--dequantize",
        ],
        cwd=work,
    )
    m2 = run_measured(
        [PY, "-c", MLX_QUANTIZE, str(mlx_float), str(mlx_model)], cwd=work / f"conf-{layers}L"
    )
    mlx = Measured(
        m1.wall_s + m2.wall_s,
        max(m1.peak_rss, m2.peak_rss),
        0,
        "",
        m1.bytes_written + m2.bytes_written,
    )
    rows.append(step_row("mlx-lm: convert -d, -q", mlx))
    rows[-1]["dvc_share"] = None
    print(_fmt(rows[-1]), flush=True)
    print(
        f"   mlx-lm: convert -d {m1.wall_s:.1f} s (peak {gb(m1.peak_rss)}), "
        f"convert -q {m2.wall_s:.1f} s (peak {gb(m2.peak_rss)})",
        flush=True,
    )
    rows[-1]["convert_q_s"] = m2.wall_s
    for path in (mlx_float, mlx_model, original, work / f"conf-{layers}L"):
        shutil.rmtree(path)
    return {"layers": layers, "steps": rows}


def _shared_inodes(repo: Path) -> tuple[int, int]:
    tier_inodes = {p.stat().st_ino for p in (repo / "data" / "quantized").rglob("*.safetensors")}
    model = list((repo / "data" / "model").glob("*.safetensors"))
    return sum(p.stat().st_ino in tier_inodes for p in model), len(model)


def _fmt(row: dict) -> str:
    share = f"{100 * row['dvc_share']:4.0f}%" if row["dvc_share"] is not None else "   -"
    return (
        f"{row['step']:>24}: {row['wall_s']:7.1f} s  peak RSS {gb(row['peak_rss']):>9}  "
        f"written {gb(row['bytes_written']):>9}  DVC share {share}"
    )


def summary(result: dict) -> None:
    steps = {r["step"]: r for r in result["steps"]}
    ours, mlx = steps["ours: dvc repro"], steps["mlx-lm: convert -d, -q"]
    print(f"\n-- {result['layers']} layer(s): ratios and targets --")
    stage_s = ours["stage_times"]
    # the same work as the mlx-lm path: our wall time less the synthesis of the input and
    # the evaluation stages (DVC's own time for all of them stays in)
    same_work = ours["wall_s"] - sum(
        v for k, v in stage_s.items() if k.startswith((*INPUT_STAGES, *EVAL_STAGES))
    )
    quantize_s = sum(v for k, v in stage_s.items() if k.startswith("quantize"))
    print(
        f"   same work: {same_work:.1f} s (full run {ours['wall_s']:.1f} s less "
        + ", ".join(
            f"{k} {v:.1f} s"
            for k, v in stage_s.items()
            if k.startswith((*INPUT_STAGES, *EVAL_STAGES))
        )
        + f"); quantize stages {quantize_s:.1f} s vs convert -q {mlx['convert_q_s']:.1f} s"
    )
    download_s = sum(v for k, v in stage_s.items() if k.startswith(INPUT_STAGES))
    checks = [
        # the seed run, the synthesis of the input excluded, the evaluation included
        ("seed run less download / mlx-lm", (ours["wall_s"] - download_s) / mlx["wall_s"], 0.9),
        ("full pipeline wall / mlx-lm path", ours["wall_s"] / mlx["wall_s"], 1.0),
        ("same work wall / mlx-lm path", same_work / mlx["wall_s"], 0.7),
        ("quantize stages / convert -q", quantize_s / mlx["convert_q_s"], 0.8),
        ("peak RSS / mlx-lm path", ours["peak_rss"] / mlx["peak_rss"], 0.25),
        ("experts=4 wall / full run", steps["experts=4"]["wall_s"] / ours["wall_s"], 0.7),
        ("attention=6 wall / full run", steps["attention=6"]["wall_s"] / ours["wall_s"], 0.2),
        ("DVC share of the full run", ours["dvc_share"] or 0.0, 0.10),
        ("DVC share of experts=4", steps["experts=4"]["dvc_share"] or 0.0, 0.15),
        ("DVC share of attention=6", steps["attention=6"]["dvc_share"] or 0.0, 0.15),
    ]
    work_peak = max(
        (v for k, v in ours["stage_peak_rss"].items() if not k.startswith(EVAL_STAGES)), default=0
    )
    if work_peak:
        checks.insert(4, ("conversion stages' peak RSS / mlx", work_peak / mlx["peak_rss"], 0.25))
    for label, value, target in checks:
        verdict = "met" if value <= target else "MISSED"
        print(f"   {label:<34} {value:6.2f}  (target ≤ {target})  {verdict}")
    noop = steps["no-op repro"]["wall_s"]
    print(
        f"   {'no-op dvc repro':<34} {noop:6.1f} s (target ≤ 5 s)  "
        f"{'met' if noop <= 5 else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[2, 4],
        help="depths to run (≥ 2: mlx-lm's gpt_oss needs both layer types)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch folder on the disk to measure (needs ~60 GB at 3 layers)",
    )
    parser.add_argument(
        "--model",
        default="wide",
        help="conf/model entry: wide (120b widths, default) or tiny (smoke test)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--profile-dvc",
        nargs="?",
        const="tiers.attention=8",
        default=None,
        metavar="OVERRIDE",
        help="after the measured steps, one more experiment (-S OVERRIDE, default "
        "tiers.attention=8) under DVC's --cprofile-dump, and where its time went (not in "
        "the ratios)",
    )
    args = parser.parse_args()
    work = scratch_dir("tq-bench-pipeline-", args.workdir)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    results = []
    try:
        for layers in args.layers:
            results.append(bench_depth(work, args.model, layers, args.profile_dvc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in results:
        summary(result)
    if len(results) >= 2:
        a, b = results[0], results[-1]
        ra, rb = (next(r for r in x["steps"] if r["step"] == "ours: dvc repro") for x in (a, b))
        ratio = rb["peak_rss"] / ra["peak_rss"]
        print(
            f"\npeak RSS of ours, {b['layers']} vs {a['layers']} layers: ×{ratio:.2f} "
            f"(target: within 10%) {'met' if abs(ratio - 1) <= 0.10 else 'MISSED'}"
        )
        for stage in EVAL_STAGES:
            pa, pb = ra["stage_peak_rss"].get(stage), rb["stage_peak_rss"].get(stage)
            if pa and pb:
                print(
                    f"peak RSS of {stage}, {b['layers']} vs {a['layers']} layers: "
                    f"{gb(pb)} / {gb(pa)} = ×{pb / pa:.2f} (target: within 10%) "
                    f"{'met' if abs(pb / pa - 1) <= 0.10 else 'MISSED'}"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
