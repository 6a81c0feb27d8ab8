"""card stage: the model card (data/card/README.md) from this run's measurements.

Every number comes from the run's own files: assemble's size metrics
(`paths.size_metrics`) and the plan files (which modules form each tier), validate's
metrics (`paths.validate`), the two benchmarks (`paths.benchmark/{model,original}.json`:
speed, fit and bandwidth tables) and the machine (`paths.machine`). A file that is
missing leaves its section saying "not measured"; a failed validation is stated at the
top (and tierquant.report.publish refuses to push it). The card decides nothing about the
gate: it shows `passed` and the `gate` entries validate wrote. The layout lives in
`tierquant/templates/card.md.j2`, rendered with huggingface_hub's
`ModelCard.from_template`; the metadata is a `ModelCardData`, whose `tierquant:` entry
records the repo id, the digest of the model's files and the sha256 of validate's
metrics the card was made from (tierquant.report.publish refuses a card that no longer
matches). The tok/s chart is rendered offline with matplotlib into `speed.png` beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from tierquant.core.files import atomic_output, read_json
from tierquant.errors import TierquantError
from tierquant.plan.planfile import read_plan
from tierquant.plan.size import GIB
from tierquant.report.pareto import curve_chart, curve_position
from tierquant.report.provenance import describe_revision, repro_command
from tierquant.report.release import CARD_NAME, made_from

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent.parent / "templates" / "card.md.j2"
OPS = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}
# Below this many bytes read per generated token, per-token overhead (dispatch, Python),
# not memory bandwidth, limits generation: bandwidth bounds are not quoted.
BANDWIDTH_MIN_BYTES = 100 * 2**20
SPEED_CHART = "speed.png"
CURVE_CHART = "curve.png"  # the sweep's KLD vs bits per weight, this model starred


def _maybe_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _int(n: int | float | None) -> str:
    return "–" if n is None else f"{int(n):,}"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}%"


def layer_ranges(layers: list[int], num_layers: int | None) -> str:
    """`all 36 layers`, or compact ranges such as `layers 0–5, 7, 9, 30–35`."""
    layers = sorted(set(layers))
    if num_layers and layers == list(range(num_layers)):
        return f"all {num_layers} layers"
    parts: list[str] = []
    start = prev = layers[0]
    for n in [*layers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if n is not None:
            start = prev = n
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(parts)


def module_summary(tensors: list[dict[str, Any]], num_layers: int | None) -> str:
    """A tier's members in words: global modules by name, per-layer kinds by layer set."""
    global_modules = sorted({t["module"] for t in tensors if t.get("layer") is None})
    by_kind: dict[str, set[int]] = {}
    for t in tensors:
        if t.get("layer") is not None:
            by_kind.setdefault(t["kind"], set()).add(int(t["layer"]))
    groups: dict[str, list[str]] = {}
    for kind in sorted(by_kind):
        groups.setdefault(layer_ranges(sorted(by_kind[kind]), num_layers), []).append(kind)
    parts = [", ".join(global_modules)] if global_modules else []
    parts += [f"{', '.join(kinds)} ({where})" for where, kinds in groups.items()]
    return "; ".join(parts) or "–"


def _percentile_rows(prefix: str, label: str, keys: tuple[str, ...]) -> tuple:
    """Rows of percentiles `p99_9` → "<label> 99.9%" (no error)."""
    return tuple((f"{prefix}_{k}", f"{label} {k[1:].replace('_', '.')}%", None) for k in keys)


# The quality table, as llama.cpp's `--kl-divergence` prints it: metric key of
# metrics/validate.json, label, key of its standard error (or None).
QUALITY_TABLE = (
    ("kld_mean", "KLD mean", "kld_mean_stderr"),
    ("kld_median", "KLD median", None),
    *_percentile_rows("kld", "KLD", ("p99_9", "p99", "p95", "p90", "p10", "p5", "p1", "p0_1")),
    ("kld_max", "KLD max", None),
    ("kld_min", "KLD min", None),
    ("top1_agreement", "Same top token (top-1 agreement)", "top1_agreement_stderr"),
    ("dp_mean", "Δp mean (p of the next token, this − original)", "dp_mean_stderr"),
    ("dp_rms", "RMS Δp", "dp_rms_stderr"),
    *_percentile_rows("dp", "Δp", ("p99", "p95", "p5", "p1")),
    ("ppl_reference", "PPL (original)", "ppl_reference_stderr"),
    ("ppl_model", "PPL (this model)", "ppl_model_stderr"),
    ("ppl_ratio", "PPL ratio (this / original)", "ppl_ratio_stderr"),
    ("ln_ppl_ratio", "ln PPL ratio", "ln_ppl_ratio_stderr"),
    ("ln_ppl_correlation", "Correlation of ln PPL", None),
)


def _verdicts(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """validate.json's gate entries with a threshold, by metric (the card decides nothing)."""
    return {
        g["metric"]: g
        for g in metrics.get("gate") or []
        if g.get("threshold") is not None and g.get("metric")
    }


def _label(metric: str) -> str:
    return {key: label for key, label, _ in QUALITY_TABLE}.get(metric, metric)


def _validation(metrics: dict[str, Any] | None) -> dict[str, str]:
    """The verdict validate wrote (`passed`), and its failed gate entries in words."""
    if metrics is None:
        return {"status": "not run", "summary": ""}
    if metrics.get("passed") is True:
        summary = ", ".join(
            f"{label} {metrics[key]:.4g}"
            for key, label, _ in QUALITY_TABLE
            if key in ("kld_mean", "top1_agreement", "ppl_ratio") and key in metrics
        )
        return {"status": "passed", "summary": summary}
    failures = [
        f"{_label(g['metric'])} {g['value']:.4g} vs limit {OPS.get(g['op'], g['op'])} "
        f"{g['threshold']:g} ({g['param']})"
        for g in _verdicts(metrics).values()
        if g.get("passed") is False and g.get("value") is not None
    ]
    if metrics.get("structure_problems"):
        failures.append(f"{metrics['structure_problems']} structural problems")
    return {"status": "failed", "summary": "; ".join(failures) or "validate reported a failure"}


def _quality(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The quality table: validate's values ± their errors, and its own verdicts (the
    "gate" list of metrics/validate.json; the card decides nothing)."""
    if metrics is None or "kld_mean" not in metrics:
        return None
    verdicts = _verdicts(metrics)
    rows = []
    for key, label, err_key in QUALITY_TABLE:
        if metrics.get(key) is None:
            continue
        value = f"{metrics[key]:.4f}"
        if err_key and metrics.get(err_key) is not None:
            value += f" ± {metrics[err_key]:.4f}"
        g = verdicts.get(key)
        verdict = ""
        if g is not None:
            mark = {True: "✓", False: "✗ FAILED"}.get(g.get("passed"), "")
            verdict = f"{OPS.get(g['op'], g['op'])} {g['threshold']:g} {mark}".strip()
        rows.append({"name": label, "value": value, "gate": verdict})
    return {
        "rows": rows,
        "tokens": _int(metrics.get("tokens")),
        "windows": metrics.get("windows", "–"),
        "top_k": metrics.get("top_k", "–"),
    }


def _does_not_fit(bench: dict[str, Any] | None) -> str | None:
    """benchmark's "does not fit: X GiB > Y GiB" when the model was not loaded."""
    check = (bench or {}).get("memory_check") or {}
    return None if check.get("fits", True) else check.get("verdict")


def _speed(model: dict[str, Any] | None, original: dict[str, Any] | None) -> dict | None:
    if model is None:
        return None
    original = original or {}
    notes = [
        f"{who}: {verdict} ({check}; not loaded)"
        for who, bench in (("This model", model), ("The original", original))
        if (verdict := _does_not_fit(bench))
        for check in [bench["memory_check"].get("available_from", "")]
    ]
    rows = []
    for context, m in model.get("speed", {}).items():
        o = original.get("speed", {}).get(context, {})
        rows.append(
            {
                "context": _int(int(context)),
                "prefill": _num(m["prefill_tps"]["median"], 1),
                "prefill_original": _num(o.get("prefill_tps", {}).get("median"), 1),
                "generation": _num(m["generation_tps"]["median"], 1),
                "generation_original": _num(o.get("generation_tps", {}).get("median"), 1),
                "memory": _num(m.get("peak_memory_gib"), 3),
                "memory_original": _does_not_fit(original) or _num(o.get("peak_memory_gib"), 3),
            }
        )
    settings = model.get("settings", {})
    return {
        "notes": notes,
        "rows": rows,
        "generate_tokens": settings.get("generate_tokens", "–"),
        "trials": settings.get("trials", "–"),
        "warmup": settings.get("warmup", "–"),
    }


def _fit(model: dict[str, Any] | None) -> dict[str, Any] | None:
    if model is None or "fit" not in model:
        return None
    fit = model["fit"]

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    rows = [
        {
            "memory": row["memory_gib"],
            "limit_default": _num(row["gpu_limit_gib_default"], 1),
            "fits_default": yes(row["fits_default"]),
            "context_default": _int(row["max_context_default"]) if row["fits_default"] else "–",
            "limit_raised": _num(row["gpu_limit_gib_raised"], 1),
            "fits_raised": yes(row["fits_raised"]),
            "context_raised": _int(row["max_context_raised"]) if row["fits_raised"] else "–",
        }
        for row in fit["sizes"].values()
    ]
    rule = f"Weights {fit['weights_gib']} GiB. " + fit["rule"][0].upper() + fit["rule"][1:]
    return {"rows": rows, "rule": rule}


def _bandwidth(
    model: dict[str, Any] | None, original: dict[str, Any] | None, chips: dict[str, float]
) -> dict[str, Any] | None:
    if model is None or "bandwidth" not in model:
        return None
    bw, obw = model["bandwidth"], (original or {}).get("bandwidth", {})
    per_token = bw["bytes_per_token"].get("total") or 0
    if per_token < BANDWIDTH_MIN_BYTES:
        return {
            "meaningful": False,
            "weights_bytes": _int(per_token),
            "min_bytes": _int(BANDWIDTH_MIN_BYTES),
        }
    contexts = list(bw["contexts"])
    gbps = dict(chips)
    machine = bw.get("machine", {})
    if machine.get("gbps"):
        gbps["this machine"] = machine["gbps"]

    def bound(table: dict[str, Any], context: str, chip: str) -> str:
        return _num(table.get("contexts", {}).get(context, {}).get("bound_tps", {}).get(chip), 1)

    rows = []
    for chip, rate in gbps.items():
        cells = []
        for c in contexts:
            cells += [bound(bw, c, chip), bound(obw, c, chip)]
        rows.append({"chip": chip, "gbps": _num(rate, 0), "cells": cells})
    measured = []
    for c in contexts:
        for table in (bw, obw):
            entry = table.get("contexts", {}).get(c, {})
            tps, eff = entry.get("measured_tps"), entry.get("efficiency")
            cell = f"{tps:.1f} tok/s" if tps is not None else "–"
            if eff is not None:
                cell += f" ({100 * eff:.1f}% of bound)"
            measured.append(cell)
    return {
        "meaningful": True,
        "contexts": [_int(int(c)) for c in contexts],
        "rows": rows,
        "measured": measured,
        "weights_bytes": _int(bw["bytes_per_token"].get("total")),
        "weights_bytes_original": _int(obw.get("bytes_per_token", {}).get("total")),
    }


def _machine(machine: dict[str, Any] | None, bench: dict[str, Any] | None) -> str:
    m = machine or (bench or {}).get("machine") or {}
    if not m:
        return "an unrecorded machine"
    parts = [m.get("device", {}).get("device_name") or m.get("cpu") or "unknown chip"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB")
    if m.get("os"):
        parts.append(m["os"])
    versions = ", ".join(f"{k} {m[k]}" for k in ("mlx", "mlx_lm") if m.get(k))
    backend = f"{m['backend']} backend" if m.get("backend") else ""
    return ", ".join(parts) + (f" ({', '.join(filter(None, [backend, versions]))})")


def _backend(machine: dict[str, Any] | None, bench: dict[str, Any] | None) -> str | None:
    """The MLX backend the benchmark ran on ("metal", "cuda", "cpu"), if recorded."""
    m = machine or (bench or {}).get("machine") or {}
    return m.get("backend")


def made_with(machine: dict[str, Any] | None, tierquant_version: str | None = None) -> str:
    """`tierquant X, mlx-lm Y (mlx Z)`: tierquant's version (the stage passes its
    `__version__`; else the installed one), and the MLX stack the machine stage recorded
    (the one that ran the benchmark), else the installed one."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "?"

    m = machine or {}
    mlx_lm = m.get("mlx_lm") or installed("mlx-lm")
    mlx = m.get("mlx") or installed("mlx")
    return f"tierquant {tierquant_version or installed('tierquant')}, mlx-lm {mlx_lm} (mlx {mlx})"


@dataclass(frozen=True)
class TextSource:
    """A text the run read (params `eval` or `calibration`), as the card names it."""

    source: str  # "text" | "hub"
    path: str | None = None  # text: a file; None = the bundled corpus
    repo_id: str | None = None  # hub: dataset repo
    revision: str | None = None
    files: str | None = None
    text_column: str | None = None

    def describe(self) -> str:
        """The text in words, with where to get it."""
        if self.source == "hub":
            rev = f" at revision `{self.revision}`" if self.revision else " (no revision pinned)"
            files = f", files `{self.files}`" if self.files else ""
            column = f", column `{self.text_column}`" if self.text_column else ""
            return f"the Hub dataset `{self.repo_id}`{rev}{files}{column}"
        if self.path:
            return f"the text file `{self.path}`"
        return "tierquant's bundled `tierquant/assets/corpus.txt` (public-domain English prose)"


def _tags(precisions: list[str]) -> list[str]:
    bits = []
    for p in precisions:
        label = p.split(" ")[0]  # "3-bit g64" -> "3-bit"
        if label not in bits:
            bits.append(label)
    quantized = [b for b in bits if b != "bf16"]
    extra = ["mixed-precision"] if len(quantized) > 1 else []
    return ["mlx", "gpt_oss", "quantized", *extra, *bits, "tierquant"]


def speed_chart(model: dict[str, Any] | None, original: dict[str, Any] | None, out: Path) -> bool:
    """tok/s against prompt length (prefill and generation; this model and the original)
    as a PNG, rendered offline with matplotlib (no metadata: same data, same bytes).
    False (nothing written) when there is no benchmark."""
    if not model or not model.get("speed"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, key, title in (
        (axes[0], "prefill_tps", "Prefill"),
        (axes[1], "generation_tps", "Generation"),
    ):
        for label, bench, style in (("this model", model, "o-"), ("original", original, "s--")):
            speed = (bench or {}).get("speed") or {}
            contexts = sorted(speed, key=int)
            if contexts:
                values = [speed[c][key]["median"] for c in contexts]
                ax.plot([int(c) for c in contexts], values, style, label=label)
        ax.set_title(f"{title} tok/s vs prompt tokens")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("tok/s (median)")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)
    return True


@dataclass(frozen=True)
class CardInputs:
    """The run's files the card is made from."""

    size_metrics: Path  # assemble's metrics/size.json (required)
    plan_dir: Path
    model_dir: Path
    validate: Path  # validate's metrics (missing: "not run")
    benchmark_dir: Path  # <dir>/model.json and original.json (missing: "not measured")
    machine: Path
    predicted: Path | None = None  # predict's metrics: the budget, for recipe=auto
    sweep: Path | None = None  # the sweep's points.json (missing or empty: no sweep)


@dataclass(frozen=True)
class SourceModel:
    """What the card says the model is a quantization of."""

    name: str  # params' model.name
    base_model: str | None  # Hub repo id; None for the synthetic model
    revision: str | None
    license: str
    trained: bool = False  # the synthetic model is the committed trained tiny one


@dataclass
class Rounding:
    """How the affine tiers were rounded (quant.rounding), and for gptq on what: the
    calibration text (a description) and its windows."""

    method: str = "rtn"  # rtn | gptq
    calibration_text: str = ""
    calibration_windows: int = 0
    window_length: int = 0

    def sentence(self) -> str:
        """One sentence for the card's Quantization section."""
        if self.method != "gptq":
            return "Rounding: round to nearest (mlx's own `mx.quantize`)."
        tokens = self.calibration_windows * self.window_length
        return (
            "Rounding: GPTQ (error feedback through the inverse Hessian of each matrix's "
            "inputs, in MLX's affine format: same bytes' layout and size) for the attention, "
            "expert and lm_head matrices, each expert on the tokens the router sends it; "
            f"Hessians from the original model on {_int(tokens)} calibration tokens "
            f"({self.calibration_windows} windows of {self.window_length}) of "
            f"{self.calibration_text}, disjoint from the eval text. Embeddings: round to "
            "nearest (their input is one-hot, where GPTQ is round to nearest)."
        )


def card_context(
    *,
    inputs: CardInputs,
    repo_id: str,
    source: SourceModel,
    recipe_name: str,
    group_size: int,
    chips: dict[str, float],
    provenance: dict[str, Any],
    rounding: Rounding | None = None,
    eval_text: TextSource | None = None,
    tierquant_version: str | None = None,
) -> tuple[ModelCardData, dict[str, Any]]:
    """The card's metadata and template variables, from this run's files.

    `provenance` is tierquant.report.provenance.build_provenance's record (with its diff).
    """
    size = read_json(inputs.size_metrics)  # assemble always runs before the card
    model_config = _maybe_json(inputs.model_dir / "config.json") or {}
    num_layers = model_config.get("num_hidden_layers")
    model_bench = _maybe_json(inputs.benchmark_dir / "model.json")
    original_bench = _maybe_json(inputs.benchmark_dir / "original.json")
    validate_metrics = _maybe_json(inputs.validate)

    tiers = []
    for name, t in size["tiers"].items():
        plan = read_plan(inputs.plan_dir, name)
        tiers.append(
            {
                "name": name,
                "precision": t["precision"],
                "modules": module_summary(plan["tensors"], num_layers),
                "params": _int(t["params"]),
                "params_pct": _pct(t["params_pct"]),
                "bytes": _int(t["bytes"]),
                "bytes_pct": _pct(t["bytes_pct"]),
                "bpw": _num(t["bits_per_weight"], 3),
            }
        )
    total, orig = size["total"], size.get("original", {})
    ratio = total["bytes"] / orig["bytes"] if orig.get("bytes") else None
    size_view = {
        "params": _int(total["params"]),
        "bytes": _int(total["bytes"]),
        "gib": _num(total["bytes"] / GIB, 3),
        "bpw": _num(total["bits_per_weight"], 3),
        "original_bytes": _int(orig.get("bytes")),
        "original_gib": _num(orig["bytes"] / GIB, 3) if orig.get("bytes") else "–",
        "original_bpw": _num(orig.get("bits_per_weight"), 3) if orig.get("bytes") else "",
        "ratio": f"{100 * ratio:.1f}%" if ratio else "–",
    }

    rev, diff = provenance["revision"], provenance["diff"]
    base_model = source.base_model
    precisions = [t["precision"] for t in size["tiers"].values()]
    sources = {"repo_id": repo_id, **made_from(inputs.model_dir, inputs.validate)}
    card_data = ModelCardData(
        license=source.license,
        base_model=base_model,
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=_tags(precisions),
        model_name=repo_id.split("/")[-1],
        tierquant=sources,
        **({"base_model_relation": "quantized"} if base_model else {}),
    )
    context = {
        "repo_id": repo_id,
        "model_label": f"`{base_model}`" if base_model else f"The `{source.name}` model",
        "base_model": base_model,
        "base_revision": source.revision,
        "source_note": (
            f"tierquant's trained `{source.name}` gpt-oss (made by tierquant.source.train on "
            "~4 MB of public-domain English, in the exact layout of openai/gpt-oss-120b; "
            "for testing the pipeline, not a useful language model)"
            if source.trained
            else f"tierquant's synthetic `{source.name}` gpt-oss (random weights in the exact "
            "layout of openai/gpt-oss-120b, for testing the pipeline; not a language model)"
        ),
        "recipe_name": recipe_name,
        "group_size": group_size,
        "rounding": (rounding or Rounding()).sentence(),
        "tiers": tiers,
        "size": size_view,
        "namespace_set": "/" in repo_id,
        "made_from": sources,
        "validation": _validation(validate_metrics),
        "quality": _quality(validate_metrics),
        "machine": _machine(_maybe_json(inputs.machine), model_bench),
        "backend": _backend(_maybe_json(inputs.machine), model_bench),
        "made_with": made_with(_maybe_json(inputs.machine), tierquant_version),
        "eval_text": (eval_text or TextSource(source="text")).describe(),
        "curve_chart": None,  # set by build_card once the chart is written
        "speed": _speed(model_bench, original_bench),
        "speed_chart": None,  # set by build_card once the chart is written
        "fit": _fit(model_bench),
        "allocation": _allocation(_maybe_json(inputs.predicted) if inputs.predicted else None),
        "curve": _curve(
            _maybe_json(inputs.sweep) if inputs.sweep else None, size["total"], validate_metrics
        ),
        "bandwidth": _bandwidth(model_bench, original_bench, chips),
        "repro": {
            "revision": describe_revision(rev),
            "commit": rev["commit"] or "<tierquant revision>",
            "params_hash": provenance["params_hash"],
            "changed": [
                {"key": k, "value": _show(v), "default": _show(d)} for k, v, d in diff["changed"]
            ],
            "command": repro_command(diff["overrides"]),
        },
    }
    return card_data, context


def _allocation(predicted: dict[str, Any] | None) -> dict[str, Any] | None:
    """recipe=auto: the budget the plan allocated to, in words, and how the prediction
    meets it (predict's `budget`); None for a hand recipe."""
    budget = (predicted or {}).get("budget")
    if not budget:
        return None
    total = predicted["total"]
    weights_gib = total["bytes"] / GIB
    view = {
        "weights_gib": _num(weights_gib, 3),
        "bpw": _num(total["bits_per_weight"], 4),
        "max_gib": _num(budget["max_gib"], 3),
        "slack_gib": _num(budget["slack_gib"], 4),
        "damage": _num(budget.get("predicted_damage"), 4),
        "fit": None,
    }
    if budget.get("bits_per_weight") is not None:
        view["budget"] = f"at most {budget['bits_per_weight']:g} bits per weight"
    elif budget.get("gib") is not None:
        view["budget"] = f"weights of at most {budget['gib']:g} GiB"
    if budget.get("fit"):
        fit = budget["fit"]
        kv_gib = fit["kv_cache_bytes"] / GIB
        used = weights_gib + kv_gib + fit["overhead_gib"]
        view["budget"] = (
            f"fit a {fit['memory_gib']:g} GB Mac with a {_int(fit['context'])}-token context "
            f"({fit['wired_limit']} wired limit)"
        )
        view["fit"] = {
            "kv_gib": _num(kv_gib, 3),
            "overhead_gib": _num(fit["overhead_gib"], 3),
            "used_gib": _num(used, 3),
            "limit_gib": _num(fit["gpu_limit_gib"], 3),
            "wired_limit": fit["wired_limit"],
            "memory_gib": f"{fit['memory_gib']:g}",
            "context": _int(fit["context"]),
            "fits": used <= fit["gpu_limit_gib"],
        }
    return view


def _curve(
    points: list[dict[str, Any]] | None,
    total: dict[str, Any],
    metrics: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Where this model sits among the sweep's points (tierquant.report.pareto), when a sweep
    has been gathered and this model has been validated."""
    if not points or metrics is None or metrics.get("kld_mean") is None:
        return None
    bpw, kld = total["bits_per_weight"], metrics["kld_mean"]
    where = curve_position(points, bpw, kld)
    rows = [
        {
            "name": p["name"],
            "bpw": _num(p["bits_per_weight"], 4),
            "kld": _num(p["kld_mean"], 4),
            "top1": _num(p.get("top1_agreement"), 4),
            "this": abs(p["bits_per_weight"] - bpw) < 5e-5 and abs(p["kld_mean"] - kld) < 5e-5,
        }
        for p in points
    ]
    best = min(where["beaten_by"], key=lambda p: p["kld_mean"], default=None)
    return {
        "count": len(points),
        "rows": rows,
        "on_front": where["on_front"],
        "beats": len(where["beats"]),
        "best": None
        if best is None
        else {
            "name": best["name"],
            "bpw": _num(best["bits_per_weight"], 4),
            "kld": _num(best["kld_mean"], 4),
        },
        "bpw": _num(bpw, 4),
        "kld": _num(kld, 4),
        "at": (bpw, kld),  # the chart's star
    }


def _show(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_card(*, out: Path, template: Path = TEMPLATE, **context_args: Any) -> Path:
    """The card stage: `out/README.md` and its chart (speed.png), atomically.

    `context_args` are card_context's (inputs, repo_id, source, recipe_name, group_size,
    chips, provenance, eval_text, tierquant_version). With a sweep, the curve's chart
    (curve.png) too.
    """
    if not template.is_file():
        raise TierquantError(f"card template {template} is missing")
    inputs: CardInputs = context_args["inputs"]
    out = Path(out)
    card_data, context = card_context(**context_args)
    with atomic_output(out) as tmp:
        chart = speed_chart(
            _maybe_json(inputs.benchmark_dir / "model.json"),
            _maybe_json(inputs.benchmark_dir / "original.json"),
            tmp / SPEED_CHART,
        )
        context["speed_chart"] = SPEED_CHART if chart else None
        points = _maybe_json(inputs.sweep) if inputs.sweep and context["curve"] else None
        if points:
            at = context["curve"]["at"]
            curve = curve_chart(points, tmp / CURVE_CHART, metric="kld_mean", highlight=at)
            context["curve_chart"] = CURVE_CHART if curve else None
        card = ModelCard.from_template(card_data, template_path=str(template), **context)
        (tmp / CARD_NAME).write_text(str(card).rstrip() + "\n", encoding="utf-8")
    log.info("wrote %s", out / CARD_NAME)
    return out / CARD_NAME
