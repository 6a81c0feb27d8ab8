"""card stage: the model card (data/card/README.md) from this run's measurements.

Every number comes from the run's own files: assemble's size metrics
(`paths.size_metrics`) and the plan files (which modules form each tier), validate's
metrics (`paths.validate`), the two benchmarks (`paths.benchmark/{model,original}.json`:
speed, fit and bandwidth tables) and the machine (`paths.machine`). A file that is
missing leaves its section saying "not measured"; a failed validation is stated at the
top (and tierquant.publish refuses to push it). The layout lives in
`tierquant/templates/card.md.j2`, rendered with huggingface_hub's
`ModelCard.from_template`; the metadata is a `ModelCardData`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .config import Config
from .errors import TierquantError
from .files import atomic_output, read_json
from .plan import read_plan
from .provenance import (
    describe_revision,
    git_revision,
    params_diff,
    params_hash,
    pipeline_outputs,
    repro_command,
)

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "templates" / "card.md.j2"
CARD_NAME = "README.md"
GIB = 2**30
QUALITY_ROWS = (  # metric key, label, gate key in ValidateConfig (or None)
    ("kld_mean", "KLD mean", "kld_mean_max"),
    ("kld_median", "KLD median", None),
    ("kld_p99", "KLD p99", "kld_p99_max"),
    ("kld_p99_9", "KLD p99.9", None),
    ("kld_max", "KLD max", "kld_max_max"),
    ("top1_agreement", "Top-1 agreement", "top1_min"),
    ("ppl_reference", "PPL (original)", None),
    ("ppl_model", "PPL (this model)", None),
    ("ppl_ratio", "PPL ratio (this / original)", "ppl_ratio_max"),
)


def default_repo_id(config: Config) -> str:
    """`publish.repo_id`, or `<namespace>/<model>-tierquant-<recipe>` (namespace may be a
    `<namespace>` placeholder when unset: fine for a dry run, refused for a push)."""
    if config.publish.repo_id:
        return config.publish.repo_id
    namespace = config.publish.namespace or "<namespace>"
    return f"{namespace}/{config.model.name}-tierquant-{config.recipe.name}"


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


def _validation(metrics: dict[str, Any] | None, config: Config) -> dict[str, str]:
    if metrics is None:
        return {"status": "not run", "summary": ""}
    failures = []
    for key, label, gate in QUALITY_ROWS:
        limit = getattr(config.validate, gate) if gate else None
        value = metrics.get(key)
        if limit is None or value is None:
            continue
        ok = value >= limit if gate.endswith("_min") else value <= limit
        if not ok:
            failures.append(f"{label} {value:.4g} vs limit {limit:g}")
    if metrics.get("structure_problems"):
        failures.append(f"{metrics['structure_problems']} structural problems")
    passed = bool(metrics.get("passed")) and not failures
    if passed:
        summary = ", ".join(
            f"{label} {metrics[key]:.4g}"
            for key, label, _ in QUALITY_ROWS
            if key in ("kld_mean", "top1_agreement", "ppl_ratio") and key in metrics
        )
        return {"status": "passed", "summary": summary}
    return {"status": "failed", "summary": "; ".join(failures) or "validate reported a failure"}


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


def _quality(metrics: dict[str, Any] | None, config: Config) -> dict[str, Any] | None:
    """The quality table: validate's values ± their errors, and its own verdicts (the
    "gate" list of metrics/validate.json; the card decides nothing)."""
    if metrics is None or "kld_mean" not in metrics:
        return None
    verdicts = {g["metric"]: g for g in metrics.get("gate", []) if g.get("passed") is not None}
    rows = []
    for key, label, err_key in QUALITY_TABLE:
        if metrics.get(key) is None:
            continue
        value = f"{metrics[key]:.4f}"
        if err_key and metrics.get(err_key) is not None:
            value += f" ± {metrics[err_key]:.4f}"
        gate = ""
        if key in verdicts:
            v = verdicts[key]
            op = "≤" if v["op"] == "<=" else "≥"
            gate = f"{op} {v['threshold']:g} {'✓' if v['passed'] else '✗ FAILED'}"
        rows.append({"name": label, "value": value, "gate": gate})
    return {
        "rows": rows,
        "tokens": _int(metrics.get("tokens")),
        "windows": metrics.get("windows", "–"),
        "top_k": metrics.get("top_k", "–"),
    }


def _speed(model: dict[str, Any] | None, original: dict[str, Any] | None) -> dict | None:
    if model is None:
        return None
    original = original or {}
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
                "memory_original": _num(o.get("peak_memory_gib"), 3),
            }
        )
    settings = model.get("settings", {})
    return {
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


def _tags(precisions: list[str]) -> list[str]:
    bits = []
    for p in precisions:
        label = p.split(" ")[0]  # "3-bit g64" -> "3-bit"
        if label not in bits:
            bits.append(label)
    quantized = [b for b in bits if b != "bf16"]
    extra = ["mixed-precision"] if len(quantized) > 1 else []
    return ["mlx", "gpt_oss", "quantized", *extra, *bits, "tierquant"]


def card_context(config: Config) -> tuple[ModelCardData, dict[str, Any]]:
    """The card's metadata and template variables, from this run's files."""
    paths = config.paths
    size = read_json(Path(paths.size_metrics))  # assemble always runs before the card
    model_config = _maybe_json(Path(paths.model) / "config.json") or {}
    num_layers = model_config.get("num_hidden_layers")
    bench_dir = Path(paths.benchmark)
    model_bench = _maybe_json(bench_dir / "model.json")
    original_bench = _maybe_json(bench_dir / "original.json")
    validate_metrics = _maybe_json(Path(paths.validate))

    tiers = []
    for name, t in size["tiers"].items():
        plan = read_plan(Path(paths.plan), name)
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

    rev = git_revision(ignore=pipeline_outputs(config))
    diff = params_diff(config)
    repo_id = default_repo_id(config)
    base_model = config.model.repo_id if config.model.source == "hub" else None
    precisions = [t["precision"] for t in size["tiers"].values()]
    card_data = ModelCardData(
        license=config.model.license,
        base_model=base_model,
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=_tags(precisions),
        model_name=repo_id.split("/")[-1],
        **({"base_model_relation": "quantized"} if base_model else {}),
    )
    context = {
        "repo_id": repo_id,
        "model_label": f"`{base_model}`" if base_model else f"The `{config.model.name}` model",
        "base_model": base_model,
        "base_revision": config.model.revision,
        "source_note": (
            f"tierquant's synthetic `{config.model.name}` gpt-oss (random weights in the exact "
            "layout of openai/gpt-oss-120b, for testing the pipeline; not a language model)"
        ),
        "recipe_name": config.recipe.name,
        "group_size": config.quant.group_size,
        "tiers": tiers,
        "size": size_view,
        "validation": _validation(validate_metrics, config),
        "quality": _quality(validate_metrics, config),
        "machine": _machine(_maybe_json(Path(paths.machine)), model_bench),
        "speed": _speed(model_bench, original_bench),
        "fit": _fit(model_bench),
        "bandwidth": _bandwidth(model_bench, original_bench, config.benchmark.chips),
        "repro": {
            "revision": describe_revision(rev),
            "commit": rev["commit"] or "<tierquant revision>",
            "params_hash": params_hash(config),
            "changed": [
                {"key": k, "value": _show(v), "default": _show(d)} for k, v, d in diff["changed"]
            ],
            "command": repro_command(diff["overrides"]),
        },
    }
    return card_data, context


def _show(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def render_card(config: Config, template: Path = TEMPLATE) -> ModelCard:
    """The model card for this run (not written)."""
    if not template.is_file():
        raise TierquantError(f"card template {template} is missing")
    card_data, context = card_context(config)
    return ModelCard.from_template(card_data, template_path=str(template), **context)


def build_card(config: Config) -> Path:
    """The card stage: render the card into `paths.card/README.md` (atomically)."""
    card = render_card(config)
    out = Path(config.paths.card)
    with atomic_output(out) as tmp:
        (tmp / CARD_NAME).write_text(str(card).rstrip() + "\n", encoding="utf-8")
    log.info("wrote %s", out / CARD_NAME)
    return out / CARD_NAME
