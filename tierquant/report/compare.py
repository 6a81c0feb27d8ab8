"""`tierquant compare`: one row per experiment, named by what it changed, with the headline.

The rows come from `dvc exp show --json` (the workspace, each baseline commit, and the
experiments on it). Each row is named by what it changed against its baseline's params
(`experts=4`, `mixed_3_6`, `auto 3.3 bpw`, `attention=6 experts=4`, ...), and carries
the headline metrics (tierquant.report.headline): bits/weight, GiB, KLD mean, top-1,
generation and prefill tok/s, peak memory, passed. `--wide` adds the tiers and the
budget. The table is plain text sized to the terminal (COLUMNS), or CSV or Markdown.

Everything but `exp_show_json` is a pure function of that JSON, so the table is tested
without DVC.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierquant.errors import TierquantError
from tierquant.report.provenance import DERIVED_PARAMS

# Validate's gate thresholds: all null is the docs' NOGATE sweep (docs/experiments.md),
# named "no gate".
GATE_KEYS = ("kld_mean_max", "kld_p99_max", "top1_min", "ppl_ratio_max")
# Params sections that are never a knob of an experiment (where files go, publishing).
IGNORED_SECTIONS = ("paths", "publish")
# Sections conf/ derives from the model (conf/quality/<model>.yaml and friends): when
# the model changes, their differences follow from it and are not listed.
MODEL_SECTIONS = ("model", "eval", "calibration", "validate", "benchmark")
ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    """One column: its key (a headline metric, or a row field), header, format."""

    key: str
    header: str
    fmt: Callable[[Any], str]
    numeric: bool = True
    wide: bool = False  # only with --wide


def _num(digits: int) -> Callable[[Any], str]:
    def fmt(v: Any) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"

    return fmt


def _gib(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.4f}" if v < 10 else f"{v:.2f}"


def _passed(v: Any) -> str:
    return {True: "yes", False: "NO"}.get(v, "-") if isinstance(v, bool) else str(v or "-")


def _text(v: Any) -> str:
    return "" if v is None else str(v)


COLUMNS: tuple[Column, ...] = (
    Column("name", "name", _text, numeric=False),
    Column("bpw", "bpw", _num(4)),
    Column("GiB", "GiB", _gib),
    Column("kld_mean", "kld_mean", _num(4)),
    Column("top1", "top1", _num(4)),
    Column("gen_tok_s", "gen_tok_s", _num(1)),
    Column("prefill_tok_s", "prefill_tok_s", _num(1)),
    Column("peak_memory_gib", "peak_memory_gib", _gib),
    Column("passed", "passed", _passed, numeric=False),
    Column("experiment", "experiment", _text, numeric=False),
    Column("tiers", "tiers", _text, numeric=False, wide=True),
    Column("budget", "budget", _text, numeric=False, wide=True),
)
SORT_KEYS = tuple(c.key for c in COLUMNS)


def columns(*, wide: bool = False) -> list[Column]:
    return [c for c in COLUMNS if wide or not c.wide]


# --- rows from `dvc exp show --json` --------------------------------------------------


def _params(data: Mapping[str, Any] | None) -> dict[str, Any]:
    return ((data or {}).get("params") or {}).get("params.yaml", {}).get("data") or {}


def _metrics(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every metrics file's values in one dict (the headline files' keys are distinct)."""
    merged: dict[str, Any] = {}
    for entry in ((data or {}).get("metrics") or {}).values():
        merged.update((entry or {}).get("data") or {})
    return merged


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    return str(v)


def budget_label(budget: Mapping[str, Any] | None) -> str:
    """`3.3 bpw`, `40 GiB`, `fit 64 GiB@32768` (+ the wired limit if not raised)."""
    budget = budget or {}
    if budget.get("bits_per_weight") is not None:
        return f"{budget['bits_per_weight']} bpw"
    if budget.get("gib") is not None:
        return f"{budget['gib']} GiB"
    fit = budget.get("fit") or {}
    if fit.get("memory_gib") is not None:
        limit = "" if fit.get("wired_limit", "raised") == "raised" else f" {fit['wired_limit']}"
        return f"fit {fit['memory_gib']} GiB@{fit.get('context')}{limit}"
    return "no budget"


def change_name(
    *,
    params: Mapping[str, Any],
    base: Mapping[str, Any],
    recipe_tiers: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """What `params` changes against `base`, as a short name ("" if nothing).

    `recipe_tiers` maps a recipe to its default tiers (conf/recipe/<name>.yaml): a
    recipe's own tiers are then not listed as changes, only overrides of them.
    """
    parts: list[str] = []
    model = (params.get("model") or {}).get("name")
    model_changed = model != (base.get("model") or {}).get("name")
    if model_changed:
        parts.append(f"model={model}")
    recipe = (params.get("recipe") or {}).get("name")
    base_recipe = (base.get("recipe") or {}).get("name")
    budget = params.get("budget") or {}
    base_budget = base.get("budget") or {}
    if recipe == "auto" and (recipe != base_recipe or _flatten(budget) != _flatten(base_budget)):
        parts.append(f"auto {budget_label(budget)}")
        if budget.get("router") != base_budget.get("router"):
            parts.append(f"router={_value(budget.get('router'))}")
    elif recipe != base_recipe:
        parts.append(str(recipe))
    if recipe != base_recipe:
        ref_tiers = (recipe_tiers or {}).get(str(recipe))
    else:
        ref_tiers = base.get("tiers") or {}
    if ref_tiers is not None:
        for tier, value in (params.get("tiers") or {}).items():
            if tier not in ref_tiers or _value(ref_tiers[tier]) != _value(value):
                parts.append(f"{tier}={_value(value)}")
    flat, base_flat = _flatten(params), _flatten(base)
    if (params.get("recipe") or {}) != (base.get("recipe") or {}) and recipe == base_recipe:
        parts.append("recipe edited")
    gate = params.get("validate") or {}
    base_gate = base.get("validate") or {}
    no_gate = all(gate.get(k) is None for k in GATE_KEYS)
    if not model_changed and no_gate and not all(base_gate.get(k) is None for k in GATE_KEYS):
        parts.append("no gate")
    for key in sorted(set(flat) | set(base_flat)):
        section = key.split(".", 1)[0]
        if section in ("recipe", "tiers", "budget", *IGNORED_SECTIONS):
            continue
        if model_changed and section in MODEL_SECTIONS:
            continue
        if key == "model.name" or (no_gate and key.removeprefix("validate.") in GATE_KEYS):
            continue
        if key.startswith(DERIVED_PARAMS):  # follow quant.rounding (and the tiers)
            continue
        if flat.get(key) != base_flat.get(key):
            short = key.removeprefix("quant.")
            parts.append(f"{short}={_value(flat.get(key))}")
    return " ".join(parts)


def tiers_label(params: Mapping[str, Any]) -> str:
    """`control=bf16 sensitive=6 ...`; recipe=auto's tiers are keyed by precision."""
    if (params.get("recipe") or {}).get("name") == "auto":
        return "by precision (auto)"
    return " ".join(f"{k}={_value(v)}" for k, v in (params.get("tiers") or {}).items())


def _row(
    *, name: str, experiment: str, data: Mapping[str, Any] | None, state: str | None
) -> dict[str, Any]:
    params, metrics = _params(data), _metrics(data)
    recipe = (params.get("recipe") or {}).get("name")
    row: dict[str, Any] = {c.key: metrics.get(c.key) for c in COLUMNS if c.numeric}
    row.update(
        name=name,
        experiment=experiment,
        passed=metrics.get("passed", state),
        tiers=tiers_label(params),
        budget=budget_label(params.get("budget")) if recipe == "auto" else "hand recipe",
        recipe=recipe,
        orig={k: v for k, v in metrics.items() if k.startswith("orig_")},
    )
    return row


def experiment_rows(
    exp_show: list[Mapping[str, Any]],
    *,
    recipe_tiers: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per entry of `dvc exp show --json`: the workspace (against the first
    baseline), each baseline commit, and each experiment (against its baseline)."""
    rows: list[dict[str, Any]] = []
    baselines = [b for b in exp_show if b.get("rev") != "workspace"]
    head = _params(baselines[0].get("data")) if baselines else {}
    for baseline in exp_show:
        rev = str(baseline.get("rev"))
        data = baseline.get("data")
        if rev == "workspace":
            changed = change_name(params=_params(data), base=head, recipe_tiers=recipe_tiers)
            name = f"workspace: {changed}" if changed else "workspace"
            rows.append(_row(name=name, experiment="workspace", data=data, state=None))
            continue
        label = baseline.get("name") or rev[:7]
        rows.append(_row(name=label, experiment=label, data=data, state=None))
        base = _params(data)
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or [{}]
            exp_data = revs[0].get("data")
            state = (exp.get("executor") or {}).get("state")
            if state == "success":
                state = None
            exp_name = exp.get("name") or str(revs[0].get("rev"))[:7]
            changed = change_name(params=_params(exp_data), base=base, recipe_tiers=recipe_tiers)
            name = changed or f"as {label}"
            rows.append(_row(name=name, experiment=exp_name, data=exp_data, state=state))
    return rows


def sort_rows(rows: list[dict[str, Any]], *, key: str, reverse: bool = False) -> list[dict]:
    """`rows` by `key` (a column key); rows without a value for it come last."""
    if key not in SORT_KEYS:
        raise TierquantError(f"--sort {key}: not a column; one of {', '.join(SORT_KEYS)}")
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]

    def value(r: dict[str, Any]) -> Any:
        v = r[key]
        return str(v) if not isinstance(v, (int, float)) else v

    return sorted(present, key=value, reverse=reverse) + missing


# --- rendering ------------------------------------------------------------------------


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def render_table(
    rows: list[dict[str, Any]], *, width: int = 120, wide: bool = False, gap: int = 2
) -> str:
    """A plain-text table of `rows`; the name column is cut (…) to fit `width`."""
    cols = columns(wide=wide)
    cells = [[c.fmt(r.get(c.key)) for c in cols] for r in rows]
    widths = [max([len(c.header), *(len(line[i]) for line in cells)]) for i, c in enumerate(cols)]
    name_at = next(i for i, c in enumerate(cols) if c.key == "name")
    others = sum(w for i, w in enumerate(widths) if i != name_at) + gap * (len(cols) - 1)
    widths[name_at] = max(min(widths[name_at], width - others), len("name") + 4)
    lines = []
    for line in [[c.header for c in cols], *cells]:
        out = []
        for i, (c, text) in enumerate(zip(cols, line, strict=True)):
            text = _fit(text, widths[i])
            out.append(text.rjust(widths[i]) if c.numeric else text.ljust(widths[i]))
        lines.append((" " * gap).join(out).rstrip())
    return "\n".join(lines)


def render_csv(rows: list[dict[str, Any]], *, wide: bool = False) -> str:
    """CSV with the raw values (empty when absent), the column keys as the header."""
    cols = columns(wide=wide)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.key for c in cols])
    for r in rows:
        writer.writerow(["" if r.get(c.key) is None else r.get(c.key) for c in cols])
    return buf.getvalue().rstrip("\n")


def render_markdown(rows: list[dict[str, Any]], *, wide: bool = False) -> str:
    """A GitHub-flavoured Markdown table (full names, formatted values)."""
    cols = columns(wide=wide)

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    out = [line(c.header for c in cols)]
    out.append("|" + "|".join("---:" if c.numeric else "---" for c in cols) + "|")
    out.extend(line(c.fmt(r.get(c.key)) for c in cols) for r in rows)
    return "\n".join(out)


def original_line(rows: list[dict[str, Any]]) -> str:
    """The original's speed and memory (the same in every row measured on one machine),
    from the first row that has them."""
    for r in rows:
        orig = r.get("orig") or {}
        if orig:
            gen, pre = orig.get("orig_gen_tok_s"), orig.get("orig_prefill_tok_s")
            peak = orig.get("orig_peak_memory_gib")
            return (
                f"original ({r['experiment']}): gen_tok_s {_num(1)(gen)}, prefill_tok_s "
                f"{_num(1)(pre)}, peak_memory_gib {_gib(peak)}"
            )
    return "original: not benchmarked"


# --- DVC ------------------------------------------------------------------------------


def dvc_executable() -> str:
    return shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")


def exp_show_json(*, root: Path, dvc_args: list[str]) -> list[dict[str, Any]]:
    """`dvc exp show --json` (+ `dvc_args`, which select revisions) in `root`."""
    import json

    proc = subprocess.run(
        [dvc_executable(), "exp", "show", "--json", *dvc_args],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise TierquantError(f"dvc exp show failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def recipe_default_tiers(conf_dir: Path) -> dict[str, dict[str, Any]]:
    """Each recipe's default `tiers:` (conf/recipe/<name>.yaml), keyed by recipe name."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(conf_dir, "recipe").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        name = (doc.get("recipe") or {}).get("name", path.stem)
        out[str(name)] = doc.get("tiers") or {}
    return out


def compare(
    *,
    root: Path,
    dvc_args: list[str],
    wide: bool = False,
    sort: str | None = None,
    reverse: bool = False,
    fmt: str = "table",
    width: int | None = None,
) -> str:
    """The `tierquant compare` output for the checkout at `root`."""
    rows = experiment_rows(
        exp_show_json(root=root, dvc_args=dvc_args),
        recipe_tiers=recipe_default_tiers(Path(root) / "conf"),
    )
    if sort:
        rows = sort_rows(rows, key=sort, reverse=reverse)
    if fmt == "csv":
        return render_csv(rows, wide=wide)
    if fmt == "md":
        return render_markdown(rows, wide=wide)
    width = width or shutil.get_terminal_size((120, 24)).columns
    return render_table(rows, width=width, wide=wide) + "\n" + original_line(rows)


# --- the command line (tierquant.cli's `compare`) -----------------------------------

DESCRIPTION = """\
One row per experiment of `dvc exp show` (the workspace, each baseline commit such as
main, and the experiments on it), named by what it changed against its baseline's
params (`experts=4`, `mixed_3_6 router=8`, `auto 3.3 bpw`, `attention=6 experts=4`;
`as main` when nothing), with the headline metrics (metrics/headline/):

  bpw            bits per weight on disk          GiB           the model's weights
  kld_mean, top1 quality against the original     passed        validate's gate
  gen_tok_s, prefill_tok_s, peak_memory_gib       the benchmark (first context; peak
                                                  over all contexts)
  experiment     DVC's name for it (`dvc exp apply <experiment>`)

A last line gives the original's tok/s and peak memory. The table fits the terminal
(COLUMNS; the name is cut with … if needed); --csv and --md print every name whole.
Reads `dvc exp show --json`; the revision options below are passed on to it.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`tierquant compare`'s options on `parser`."""
    parser.add_argument("--wide", action="store_true", help="add the tiers and budget columns")
    parser.add_argument(
        "--sort",
        metavar="KEY",
        choices=SORT_KEYS,
        help=f"sort by a column, ascending; missing values last ({', '.join(SORT_KEYS)})",
    )
    parser.add_argument("--reverse", action="store_true", help="with --sort: descending")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV (raw values) instead of a table")
    fmt.add_argument("--md", action="store_true", help="a Markdown table instead")
    dvc = parser.add_argument_group("revisions (passed on to dvc exp show)")
    dvc.add_argument("-a", "--all-branches", action="store_true", help="all branches' experiments")
    dvc.add_argument("-T", "--all-tags", action="store_true", help="all tags' experiments")
    dvc.add_argument("-A", "--all-commits", action="store_true", help="every commit's experiments")
    dvc.add_argument("--rev", action="append", metavar="<commit>", help="from this baseline")
    dvc.add_argument("-n", "--num", type=int, metavar="<num>", help="the last num commits")
    for flag in ("--hide-queued", "--hide-failed", "--hide-workspace"):
        dvc.add_argument(flag, action="store_true", help=f"{flag[7:]} rows left out")
    # `tierquant compare --no-pager` was `dvc exp show`'s flag; the table never pages.
    parser.add_argument("--no-pager", action="store_true", help=argparse.SUPPRESS)


def dvc_args_from(args: argparse.Namespace) -> list[str]:
    """The revision options of `args` as `dvc exp show` arguments."""
    out = [
        flag
        for flag, on in (
            ("--all-branches", args.all_branches),
            ("--all-tags", args.all_tags),
            ("--all-commits", args.all_commits),
            ("--hide-queued", args.hide_queued),
            ("--hide-failed", args.hide_failed),
            ("--hide-workspace", args.hide_workspace),
        )
        if on
    ]
    for rev in args.rev or []:
        out += ["--rev", rev]
    if args.num is not None:
        out += ["--num", str(args.num)]
    return out


def from_args(args: argparse.Namespace, *, root: Path) -> str:
    """`compare(...)` for parsed `tierquant compare` arguments."""
    fmt = "csv" if args.csv else "md" if args.md else "table"
    return compare(
        root=root,
        dvc_args=dvc_args_from(args),
        wide=args.wide,
        sort=args.sort,
        reverse=args.reverse,
        fmt=fmt,
    )
