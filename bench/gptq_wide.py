"""quant.rounding=gptq at gpt-oss-120b widths: the quantize_gptq@<tier> stages at 2 and 4
layers, mlx-lm's GPTQ on the same real Hessians, and the 120B estimate from the figures.

For each depth in --layers, in a fresh clone of this repo (bench/pipeline.prepare_clone)
set to `model=wide` (hidden 2880, intermediate 2880, 64 q heads and 8 kv heads of 64,
vocab 201088), `model.synthetic.num_hidden_layers=N`, `model.synthetic.num_local_experts=E`
(--experts: every matrix keeps gpt-oss-120b's shape, so per-matrix costs are exactly
120B's; only the number of expert matrices per layer is E/128 of it) and
`quant.rounding=gptq` with the seed recipe (control bf16, sensitive 6-bit, attention
4-bit, experts 3-bit):

  `dvc repro plan@rules calibration@windows`    synthesize the checkpoint, plan, windows
  `dvc repro -s quantize_gptq@<tier>`           each tier, one at a time, measured:

wall time (DVC's and the stage's own, which every stage logs), CPU seconds of the process
tree (user + system, from the waited children's rusage), peak RSS (the stage's own
ru_maxrss and the process tree's, sampled every 20 ms), the GPTQ FLOPs the stage did
(tierquant.core.gptq.gptq_flops summed over the matrices of the tier's plan that
GptqRounder takes) and the achieved GFLOP/s per stage second and per CPU second against
numpy's float32 2048² GEMM rate measured by a worker at the start and the end of the run.
Then 4 layers against 2: peak RSS ratio (target ≤ 1.10) and the time per added layer.

mlx-lm: at the first depth the streamed forward of the original records layer 0's inputs
(tierquant.quality.hessian.LayerInputs.stream, timed on the calibration windows and
again on 256 tokens: the forward's fixed and per-token cost) and
saves one expert's down_proj (2880×2880; the expert with the most routed calibration
tokens) and layer 0's q_proj (4096×2880) with their REAL Hessians (`LayerInputs.hessian`).
bench/gptq.py's workers then run rtn, ours and mlx-lm's gptq.py on each at 4 bits, each in
its own process: time ratio ours/mlx-lm (target ≤ 1.0) and the objective
tr((W − Ŵ)H(W − Ŵ)ᵀ).

Last, gpt-oss-120b (36 layers, 128 experts, the seed recipe, 16 × 128 calibration tokens)
extrapolated from these measurements, the arithmetic printed: CPU time (the GPTQ FLOPs
at the measured marginal GFLOP per CPU second, plus the streamed forwards), peak memory
(the measured peak plus the resident layer's growth from E to 128 experts and the
recorded inputs' growth to 2048 tokens) and disk (what the stages write: the same bytes as
rtn; nothing for Hessians; the windows file).

    nice -n 10 python bench/gptq_wide.py --layers 2 4 --experts 16 --workdir /big/scratch
    nice -n 10 python bench/gptq_wide.py --layers 2 --experts 4 --skip-mlx-lm   # smoke test
    # the real 128 experts, the experts tier only (~20 min here), the forward timed:
    nice -n 10 python bench/gptq_wide.py --layers 2 --experts 128 --tiers experts --mlx-lm-matrices

OPENBLAS_NUM_THREADS is 1 in every stage and worker unless --blas-threads says otherwise
(bench/gptq.py: on shared cores one thread was faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import VENV_BIN, dir_bytes, gb, run_measured, scratch_dir
from gptq import measure
from pipeline import STAGE_TIME, _resident_factor, prepare_clone

PY = sys.executable
MODEL = "wide"
SETUP_TARGETS = ("plan@rules", "calibration@windows")
MLX_BITS = 4
LAYERS_120B = 36
EXPERTS_120B = 128
TOKENS_120B = 16 * 128  # calibration's default windows (conf/quality/gpt-oss-120b.yaml keeps them)
HIDDEN, INTERMEDIATE, Q_OUT, KV_OUT, VOCAB = 2880, 2880, 64 * 64, 8 * 64, 201088
LONG_TOKENS = 256  # the layer-0 forward timed again at this many tokens (per-token cost)
SEED_120B_GIB = 48.4  # conf/recipe/seed.yaml: the plan's size of gpt-oss-120b, affine g64


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cpu(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple:
    """run_measured plus the CPU seconds of the (waited-for) process tree."""
    c0 = cpu_children()
    m = run_measured(cmd, cwd=cwd, env=env)
    return m, cpu_children() - c0


def set_depth(repo: Path, experts: int) -> None:
    """The clone (model=wide, its depth set by prepare_clone) at `experts` experts and
    quant.rounding=gptq, params.yaml rewritten and committed."""
    model_conf = repo / "conf" / "model" / f"{MODEL}.yaml"
    model_conf.write_text(
        re.sub(
            r"num_local_experts: \d+",
            f"num_local_experts: {experts}",
            model_conf.read_text(),
            count=1,
        )
    )
    conf = repo / "conf" / "config.yaml"
    conf.write_text(conf.read_text().replace("  rounding: rtn", "  rounding: gptq", 1))
    run_measured([PY, "-m", "tierquant.config", "--write"], cwd=repo)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    run_measured([*git, "commit", "-qam", f"{experts} experts, gptq"], cwd=repo)


def tier_flops(repo: Path) -> dict[str, tuple[int, float]]:
    """tier -> (matrices GPTQ'd, GFLOP by gptq_flops) from the clone's plan files and
    tiers, the matrices chosen exactly as the stage chooses them (GptqRounder.takes)."""
    import yaml

    from tierquant.build.gptq import GptqRounder
    from tierquant.core.gptoss import Weight
    from tierquant.core.gptq import gptq_flops
    from tierquant.core.precision import parse_tiers
    from tierquant.plan.planfile import read_plan

    params = yaml.safe_load((repo / "params.yaml").read_text())
    precisions = parse_tiers(params["tiers"], params["quant"]["group_size"])
    out = {}
    for tier, precision in precisions.items():
        count, flops = 0, 0.0
        for t in read_plan(repo / "data" / "plan", tier)["tensors"]:
            w = Weight(t["name"], t["kind"], t["layer"], None, tuple(t["shape"]))
            if not GptqRounder.takes(None, w, precision):  # type: ignore[arg-type]
                continue
            stack = w.shape[0] if len(w.shape) == 3 else 1
            count += stack
            flops += stack * gptq_flops(w.shape[-2], w.shape[-1])
        out[tier] = (count, flops / 1e9)
    return out


def layer_resident(repo: Path, experts: int) -> tuple[int, int]:
    """(layer 0's resident bytes at `experts` experts, the same at 120B's 128): its
    tensors on disk times bench/pipeline's resident factor, the expert stacks scaled."""
    from tierquant.core.checkpoint import Checkpoint

    here = big = 0
    with Checkpoint(repo / "data" / "original") as ckpt:
        for name, info in ckpt.tensors.items():
            if not name.startswith("model.layers.0."):
                continue
            n = info.nbytes * _resident_factor(name, info.dtype)
            here += n
            big += n * EXPERTS_120B // experts if ".experts." in name else n
    return here, big


def save_cases(repo: Path, out: Path) -> dict:
    """Worker: layer 0's inputs on the calibration windows by the streamed forward
    (timed), then one expert's down_proj and q_proj with their real Hessians into
    out/<name>.npz; prints a RESULT line (JSON)."""
    from tierquant.core.checkpoint import Checkpoint
    from tierquant.core.floatrows import read_expert_bf16
    from tierquant.core.gptoss import Weight
    from tierquant.core.mxfp4 import from_bf16_bits
    from tierquant.plan.planfile import plan_tier_names, read_plan
    from tierquant.quality.hessian import LayerInputs
    from tierquant.quality.windows import read_windows

    def layer0(tokens: np.ndarray) -> tuple[LayerInputs, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        stream = LayerInputs.stream(repo / "data" / "original", tokens, batch_size=1, layers={0})
        inputs = next(stream)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        stream.close()
        return inputs, seconds, cpu

    tokens = read_windows(repo / "data" / "calibration.npy")
    inputs, stream_s, stream_cpu = layer0(tokens)
    # the same forward on LONG_TOKENS (the windows' ids repeated): the per-token cost
    _, long_s, long_cpu = layer0(np.resize(tokens, (LONG_TOKENS // 128, 128)))
    weights = {}
    for tier in plan_tier_names(repo / "data" / "plan"):
        for t in read_plan(repo / "data" / "plan", tier)["tensors"]:
            if t["layer"] == 0 and t["kind"] in ("down_proj", "q_proj"):
                weights[t["kind"]] = Weight(t["name"], t["kind"], 0, None, tuple(t["shape"]))
    n_experts = weights["down_proj"].shape[0]
    routed = [inputs.routed(e) for e in range(n_experts)]
    expert = int(np.argmax(routed))
    cases = {}
    with Checkpoint(repo / "data" / "original") as original:
        down = weights["down_proj"]
        w = from_bf16_bits(read_expert_bf16(original, down, expert, expert + 1)[0])
        np.savez(out / "down.npz", w=w, h=inputs.hessian("down_proj", expert))
        cases["down"] = {"shape": list(w.shape), "routed": routed[expert]}
        q = weights["q_proj"]
        w = from_bf16_bits(original.read_rows(q.name, 0, q.shape[0]))
        np.savez(out / "q.npz", w=w, h=inputs.hessian("q_proj"))
        cases["q"] = {"shape": list(w.shape), "tokens": int(inputs.attention.shape[0])}
    cases["down"]["expert"] = expert
    result = {
        "stream_s": stream_s,
        "stream_cpu": stream_cpu,
        "long_s": long_s,
        "long_cpu": long_cpu,
        "long_tokens": LONG_TOKENS,
        "tokens": int(tokens.size),
        "cases": cases,
        "recorded_bytes": int(
            sum(
                a.nbytes
                for a in (inputs.attention, inputs.o_proj, inputs.experts, inputs.down_proj)
            )
        ),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


def gemm(env: dict[str, str]) -> tuple[float, float]:
    r = measure("gemm", "gemm=0x0", 0, 0, env)["float32"]
    return float(r[0]), float(r[1])


def bench_depth(
    work: Path, layers: int, experts: int, env: dict[str, str], rate: tuple, only: list[str]
) -> dict:
    repo = prepare_clone(work, MODEL, layers)
    set_depth(repo, experts)
    dvc = str(VENV_BIN / "dvc")
    print(
        f"\n== model wide, {layers} layers, {experts} experts, quant.rounding=gptq ==", flush=True
    )
    m, cpu = run_cpu([dvc, "repro", *SETUP_TARGETS], repo, env)
    stages = {x.group(1): float(x.group(2)) for x in STAGE_TIME.finditer(m.output)}
    print(
        f"   setup `dvc repro {' '.join(SETUP_TARGETS)}`: {m.wall_s:.1f} s, CPU {cpu:.1f} s, "
        f"peak RSS {gb(m.peak_rss)} ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
        + f"); data/original {gb(dir_bytes(repo / 'data' / 'original'))}",
        flush=True,
    )
    flops = tier_flops(repo)
    rate32, cpu32 = rate
    head = (
        f"   {'tier':>10} {'mats':>5} {'GFLOP':>7} {'dvc s':>7} {'stage s':>7} {'CPU s':>7} "
        f"{'GFLOP/s':>7} {'/GEMM32':>7} {'/CPU-s':>6} {'/GEMM':>5} {'stage RSS':>9} "
        f"{'tree RSS':>9} {'written':>9}"
    )
    print(head)
    rows = {}
    for tier, (count, gflop) in flops.items():
        if only and tier not in only:
            continue
        m, cpu = run_cpu([dvc, "repro", "-s", f"quantize_gptq@{tier}"], repo, env)
        line = next(x for x in STAGE_TIME.finditer(m.output) if x.group(1).endswith(tier))
        stage_s, stage_rss = float(line.group(2)), float(line.group(3)) * 2**20
        size = dir_bytes(repo / "data" / "quantized" / tier)
        rows[tier] = {
            "matrices": count,
            "gflop": gflop,
            "wall_s": m.wall_s,
            "stage_s": stage_s,
            "cpu_s": cpu,
            "stage_rss": stage_rss,
            "tree_rss": m.peak_rss,
            "bytes": size,
        }
        r, c = gflop / stage_s, gflop / cpu
        print(
            f"   {tier:>10} {count:>5} {gflop:7.0f} {m.wall_s:7.1f} {stage_s:7.1f} {cpu:7.1f} "
            f"{r:7.2f} {r / rate32:7.2f} {c:6.2f} {c / cpu32:5.2f} {gb(stage_rss):>9} "
            f"{gb(m.peak_rss):>9} {gb(size):>9}",
            flush=True,
        )
    total = {k: sum(r[k] for r in rows.values()) for k in ("gflop", "wall_s", "stage_s", "cpu_s")}
    print(
        f"   {'all tiers':>10} {'':>5} {total['gflop']:7.0f} {total['wall_s']:7.1f} "
        f"{total['stage_s']:7.1f} {total['cpu_s']:7.1f}   peak stage RSS "
        f"{gb(max(r['stage_rss'] for r in rows.values()))}",
        flush=True,
    )
    resident = layer_resident(repo, experts)
    calib = (repo / "data" / "calibration.npy").stat().st_size
    return {
        "layers": layers,
        "experts": experts,
        "tiers": rows,
        "total": total,
        "resident": resident,
        "calibration_bytes": calib,
        "repo": repo,
    }


def compare_mlx_lm(cases: Path, env: dict[str, str], names: list[str]) -> dict:
    """bench/gptq.py's workers on the saved real (W, H): rtn, ours, mlx-lm at 4 bits."""
    from tierquant.core.gptq import gptq_flops

    print(
        f"\n== ours vs mlx-lm's gptq.py on layer 0's real Hessians, {MLX_BITS}-bit g64 ==",
        flush=True,
    )
    print(
        f"   {'matrix':>6} {'shape':>10} {'method':>7} {'time s':>7} {'CPU s':>6} "
        f"{'GFLOP/s':>7} {'peak RSS':>9} {'objective':>10} {'vs RTN':>6}"
    )
    out = {}
    for name in names:
        case = cases / f"{name}.npz"
        with np.load(case) as data:
            rows, width = data["w"].shape
        gflop = gptq_flops(rows, width) / 1e9
        res = {
            m: measure(m, f"{name}={rows}x{width}", MLX_BITS, 0, env, case)
            for m in ("rtn", "ours", "mlx-lm")
        }
        for method, r in res.items():
            rate = f"{gflop / r['seconds']:7.2f}" if method != "rtn" else " " * 7
            print(
                f"   {name:>6} {rows:>4}x{width:<5} {method:>7} {r['seconds']:7.2f} "
                f"{r['cpu']:6.1f} {rate} {gb(r['peak_rss']):>9} {r['objective']:10.4g} "
                f"{r['objective'] / res['rtn']['objective']:6.3f}",
                flush=True,
            )
        ours, theirs = res["ours"], res["mlx-lm"]
        print(
            f"   {name:>6} ours/mlx-lm: time {ours['seconds'] / theirs['seconds']:.3f}, CPU "
            f"{ours['cpu'] / theirs['cpu']:.3f} (target ≤ 1.0); objective "
            f"{ours['objective'] / theirs['objective']:.3f} of mlx-lm's",
            flush=True,
        )
        out[name] = res
    return out


def gflop_120b(lm_head: bool) -> dict[str, float]:
    """GPTQ GFLOP of gpt-oss-120b's seed-recipe quantize_gptq stages, by gptq_flops."""
    from tierquant.core.gptq import gptq_flops

    attn = gptq_flops(Q_OUT, HIDDEN) + 2 * gptq_flops(KV_OUT, HIDDEN) + gptq_flops(HIDDEN, Q_OUT)
    parts = {
        "experts": LAYERS_120B * EXPERTS_120B * 3 * gptq_flops(INTERMEDIATE, HIDDEN) / 1e9,
        "attention q/k/v/o": LAYERS_120B * attn / 1e9,
    }
    if lm_head:
        parts["lm_head"] = gptq_flops(VOCAB, HIDDEN) / 1e9
    return parts


def compare_depths(a: dict, b: dict) -> dict:
    """4 layers against 2: peak RSS ratios and the marginal cost of a layer."""
    la, lb = a["layers"], b["layers"]
    if la == lb:
        raise SystemExit("--layers: give two different depths to compare")
    print(f"\n== {lb} layers against {la} ({a['experts']} experts) ==")
    ratios = {}
    for tier in a["tiers"]:
        ra, rb = a["tiers"][tier], b["tiers"][tier]
        ratios[tier] = rb["stage_rss"] / ra["stage_rss"]
        print(
            f"   quantize_gptq@{tier:<10} stage peak RSS {gb(rb['stage_rss'])} / "
            f"{gb(ra['stage_rss'])} = ×{ratios[tier]:.3f}; tree {gb(rb['tree_rss'])} / "
            f"{gb(ra['tree_rss'])} = ×{rb['tree_rss'] / ra['tree_rss']:.3f}; per added layer "
            f"{(rb['stage_s'] - ra['stage_s']) / (lb - la):.1f} s, "
            f"{(rb['cpu_s'] - ra['cpu_s']) / (lb - la):.1f} CPU s"
        )
    pa = max(r["stage_rss"] for r in a["tiers"].values())  # the same tiers at both depths
    pb = max(r["stage_rss"] for r in b["tiers"].values())
    ok = pb / pa <= 1.10
    print(
        f"   peak RSS of the gptq work (largest stage), {lb} vs {la} layers: {gb(pb)} / "
        f"{gb(pa)} = ×{pb / pa:.3f} (target ≤ 1.10) {'met' if ok else 'MISSED'}"
    )
    d_cpu = b["total"]["cpu_s"] - a["total"]["cpu_s"]
    d_s = b["total"]["stage_s"] - a["total"]["stage_s"]
    d_gflop = b["total"]["gflop"] - a["total"]["gflop"]
    print(
        f"   all tiers per added layer: {d_s / (lb - la):.1f} s stage time, "
        f"{d_cpu / (lb - la):.1f} CPU s, {d_gflop / (lb - la):.0f} GFLOP: marginal "
        f"{d_gflop / d_cpu:.2f} GFLOP per CPU second"
    )
    return {"ratio": pb / pa, "marginal_gflop_per_cpu": d_gflop / d_cpu}


def estimate_120b(deep: dict, marginal: float, cases: dict | None, lm_head: bool) -> None:
    """gpt-oss-120b's quantize_gptq stages from the measured figures (docstring)."""
    e = deep["experts"]
    print("\n== estimate: quantize_gptq at gpt-oss-120b (extrapolated, not run) ==")
    parts = gflop_120b(lm_head)
    total = sum(parts.values())
    print(
        "   GPTQ work: "
        + " + ".join(f"{k} {v:,.0f}" for k, v in parts.items())
        + f" = {total:,.0f} GFLOP (gptq_flops; lm_head "
        + ("GPTQ'd" if lm_head else "RTN in this code")
        + ")"
    )
    gptq_h = total / marginal / 3600
    print(
        f"   at the measured marginal {marginal:.2f} GFLOP per CPU second (wide, {e} experts, "
        f"{deep['layers']} vs fewer layers): {total:,.0f} / {marginal:.2f} / 3600 = "
        f"{gptq_h:.1f} CPU-hours"
    )
    fwd_h = 0.0
    if cases:
        # one layer's streamed forward = fixed (embedding, the layer's load) + per token;
        # both measured on layer 0 at two token counts; the fixed part scaled by 128/E
        # (the layer's expert bytes), the per-token part unchanged (top-4 of any E)
        d_tok = cases["long_tokens"] - cases["tokens"]
        per_tok = (cases["long_cpu"] - cases["stream_cpu"]) / d_tok  # CPU seconds
        fixed = max(0.0, cases["stream_cpu"] - per_tok * cases["tokens"])
        layer_s = fixed * EXPERTS_120B / e + per_tok * TOKENS_120B
        # each tier streams the layers it needs: sensitive and experts all 36, attention
        # up to its last middle layer (~30): ~3 × 36 layer runs
        fwd_h = layer_s * LAYERS_120B * 3 / 3600
        print(
            f"   streamed forward of layer 0 (wide, {e} experts): {cases['stream_cpu']:.1f} CPU s "
            f"at {cases['tokens']} tokens, {cases['long_cpu']:.1f} at {cases['long_tokens']}: "
            f"{per_tok * 1000:.1f} ms per token + {fixed:.1f} s fixed (embedding, load); at "
            f"120B: {fixed:.1f} × {EXPERTS_120B}/{e} + {per_tok:.4f} × {TOKENS_120B} = "
            f"{layer_s:.0f} CPU s a layer × {LAYERS_120B} layers × 3 tiers / 3600 = {fwd_h:.1f} "
            "CPU-hours"
        )
    print(
        f"   CPU time on this box: ~{gptq_h + fwd_h:.0f} CPU-hours ({gptq_h:.1f} GPTQ + "
        f"{fwd_h:.1f} forwards; wall time = that over the cores the stage gets)"
    )
    here, big = deep["resident"]
    peak = max(r["stage_rss"] for r in deep["tiers"].values())
    rec_here = cases["recorded_bytes"] if cases else 0
    tokens_here = cases["tokens"] if cases else 16
    rec_big = rec_here * TOKENS_120B // max(tokens_here, 1)
    mem = peak + (big - here) + (rec_big - rec_here)
    print(
        f"   peak memory: measured {gb(peak)} (largest stage, {deep['layers']} layers, {e} "
        f"experts) + resident layer {gb(big)} − {gb(here)} (128 vs {e} experts) + recorded "
        f"inputs {gb(rec_big)} − {gb(rec_here)} ({TOKENS_120B} vs {tokens_here} tokens) = "
        f"{gb(mem)}"
    )
    ex = deep["tiers"]["experts"]["bytes"]
    ex_big = ex / (deep["layers"] * e) * LAYERS_120B * EXPERTS_120B
    calib_big = 128 + TOKENS_120B * 4  # .npy header + int32 ids
    print(
        f"   disk: the same files as rtn (nothing stored for Hessians): experts tier "
        f"{gb(ex)} / ({deep['layers']} × {e}) × {LAYERS_120B} × {EXPERTS_120B} = "
        f"{gb(ex_big)}; all tiers {SEED_120B_GIB} GiB (the plan's size, conf/recipe/"
        f"seed.yaml); data/calibration.npy {deep['calibration_bytes']} B here, ~{calib_big} B "
        f"at {TOKENS_120B} tokens"
    )
    print(
        f"   GPTQ at gpt-oss-120b: disk {SEED_120B_GIB} GiB (as rtn), memory ~{gb(mem)}, "
        f"time ~{gptq_h + fwd_h:.0f} CPU-hours on this box"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="depths (≥ 2)")
    p.add_argument(
        "--experts", type=int, default=16, help="num_local_experts (120B: 128; widths unchanged)"
    )
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (~10 GB)")
    p.add_argument("--blas-threads", type=int, default=1, help="OPENBLAS_NUM_THREADS (default 1)")
    p.add_argument("--skip-mlx-lm", action="store_true", help="no mlx-lm comparison")
    p.add_argument(
        "--mlx-lm-matrices",
        nargs="*",
        default=["down", "q"],
        choices=["down", "q"],
        help="which real matrices mlx-lm runs on (default both; ~5-10 min each here; none: "
        "only the layer-0 forward is timed)",
    )
    p.add_argument("--tiers", nargs="+", default=[], help="only these tiers (default all)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--worker-cases", nargs=2, metavar=("REPO", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_cases:
        save_cases(Path(args.worker_cases[0]), Path(args.worker_cases[1]))
        return
    from tierquant.build.gptq import GPTQ_KINDS

    lm_head = "lm_head" in GPTQ_KINDS
    env = {"OPENBLAS_NUM_THREADS": str(args.blas_threads)}
    work = scratch_dir("tq-bench-gptq-wide-", args.workdir)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    print(
        f"model wide (gpt-oss-120b widths) at {args.experts} experts per layer (120B: 128; "
        f"every matrix at 120B's shape); seed recipe; quant.rounding=gptq; lm_head "
        f"{'GPTQ' if lm_head else 'RTN (not GPTQ in this code)'}; OPENBLAS_NUM_THREADS="
        f"{args.blas_threads}"
    )
    rate = gemm(env)
    print(f"numpy float32 GEMM 2048² (start): {rate[0]:.1f} GFLOP/s, {rate[1]:.1f} per CPU second")
    results, cases = [], None
    try:
        for i, layers in enumerate(args.layers):
            res = bench_depth(work, layers, args.experts, env, rate, args.tiers)
            if i == 0 and not args.skip_mlx_lm:
                m = run_measured(
                    [PY, __file__, "--worker-cases", str(res["repo"]), str(work)], env=env
                )
                cases = json.loads(
                    next(x for x in m.output.splitlines() if x.startswith("RESULT "))[7:]
                )
                print(
                    f"   layer 0 streamed: {cases['tokens']} calibration tokens "
                    f"{cases['stream_s']:.1f} s ({cases['stream_cpu']:.1f} CPU s), "
                    f"{cases['long_tokens']} tokens {cases['long_s']:.1f} s "
                    f"({cases['long_cpu']:.1f} CPU s); saved {cases['cases']}",
                    flush=True,
                )
            shutil.rmtree(res.pop("repo"))
            results.append(res)
        end = gemm(env)
        print(
            f"\nnumpy float32 GEMM 2048² (end): {end[0]:.1f} GFLOP/s, {end[1]:.1f} per CPU second"
        )
        summary = {}
        if len(results) >= 2:
            summary = compare_depths(results[0], results[-1])
        mlx = None
        if cases is not None and args.mlx_lm_matrices:
            mlx = compare_mlx_lm(work, env, args.mlx_lm_matrices)
        marginal = summary.get("marginal_gflop_per_cpu")
        if marginal is None:  # one depth: the whole run's rate (fixed costs included)
            t = results[-1]["total"]
            marginal = t["gflop"] / t["cpu_s"]
        estimate_120b(results[-1], marginal, cases, lm_head)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"depths": results, "cases": cases, "mlx_lm": mlx, "gemm": [rate, end]},
                indent=2,
                default=str,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
