"""The Pareto sweep: `tierquant sweep run` queues size budgets and hand recipes, runs
them, waits, and gathers every experiment's quality against its size.

Each experiment is a `dvc exp run --queue` with the quality gate switched off
(`NO_GATE`: a sweep measures the low budgets the gate would stop); `dvc queue start -j
N` runs them and `dvc queue status`, which only reports, is polled until each of this
sweep's tasks has succeeded or failed. Then `gather` reads `dvc exp show --json` and
writes into paths.sweep (a folder, `sweep/`):

  points.json   every experiment's point (bits/weight, GiB, kld_mean, top-1), named by
                what it changed (tierquant.report.compare's names: `auto 3.3 bpw`,
                `mixed_3_6`, `seed experts=4`), with DVC's name for `dvc exp apply`
  table.md      the same as a Markdown table, sorted by size, the KLD front marked
  kld.png       KLD mean against bits per weight (tierquant.report.pareto.curve_chart)
  top1.png      top-1 agreement against bits per weight
  plots/        `dvc plots diff` of the pareto_kld and pareto_top1 plots (dvc.yaml) for
                the browser, offline (plots/html/template.html)

Why a git-ignored folder and not a committed file: every experiment is a git commit of
the workspace, so a committed sweep file would be each experiment's own (empty) copy,
and `dvc exp apply <name>` would put that copy back over the gathered one, leaving
`dvc repro card` nothing to do. Git-ignored files are neither in an experiment's commit
nor touched by `dvc exp apply`; the folder's committed README.md and .gitignore keep it
present in every checkout and queued experiment, so the card stage can depend on the
folder: after `dvc exp apply <name>`, the folder differs from what that experiment's
card was made from, and `dvc repro card` redraws the card with the curve.

Everything but `dvc`-calling code is a pure function of its inputs (tested without DVC).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierquant.core.files import atomic_output, json_bytes
from tierquant.errors import TierquantError
from tierquant.report.compare import (  # its readers of `dvc exp show --json` rows
    _metrics,
    _params,
    budget_label,
    change_name,
    dvc_executable,
    exp_show_json,
    recipe_default_tiers,
)
from tierquant.report.pareto import POINTS, curve_chart, front

# The budgets (bits per weight, recipe=auto) and hand recipes a sweep runs by default.
DEFAULT_BUDGETS = (3.0, 3.3, 3.557, 4.0, 4.5)
# Every threshold of the quality gate (conf/config.yaml `validate:`), switched off.
NO_GATE = tuple(
    f"validate.{k}=null"
    for k in ("kld_mean_max", "kld_p99_max", "kld_max_max", "top1_min", "ppl_ratio_max")
)
TABLE = "table.md"
CHARTS = {"kld_mean": "kld.png", "top1_agreement": "top1.png"}
PLOTS = "plots"  # `dvc plots diff -o`
DVC_PLOTS = ("pareto_kld", "pareto_top1")  # dvc.yaml's top-level plots
# The headline quality metrics file (tierquant.report.headline) a point is read from.
HEADLINE_QUALITY = "metrics/headline/quality.json"
DONE = ("Success", "Failed")
NO_WORKER_S = 120.0  # how long the queue may have no worker before the wait gives up

Log = Callable[[str], None]
Dvc = Callable[[list[str]], subprocess.CompletedProcess]


# --- points from `dvc exp show --json` ------------------------------------------------


def point_name(
    params: Mapping[str, Any],
    base: Mapping[str, Any],
    recipe_tiers: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """What an experiment changed against `base`, as tierquant compare names it, led by
    its recipe (`auto 3.3 bpw`, `mixed_3_6 router=8`, `seed experts=4`, `seed`). The
    quality gate is not a change of the model: a sweep's `no gate` is left out."""
    base = {**base, "validate": params.get("validate") or {}}
    name = change_name(params=params, base=base, recipe_tiers=recipe_tiers)
    recipe = str((params.get("recipe") or {}).get("name"))
    lead = f"auto {budget_label(params.get('budget'))}" if recipe == "auto" else recipe
    if lead in name:
        return name
    return f"{lead} {name}".strip()


def sweep_points(
    exp_show: list[dict[str, Any]],
    *,
    recipe_tiers: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every experiment's point in `dvc exp show --json` output (and each baseline's and
    the workspace's; not a queued, running or failed one), named by `point_name` against
    its baseline, sorted by bits per weight. The same model twice (the same recipe,
    budget, size and KLD: the workspace after `dvc exp apply`, the seed recipe ungated
    and its gated baseline) is one point, named as the experiment. Names that are still
    equal get DVC's name added."""
    baselines = [b for b in exp_show if b.get("rev") != "workspace"]
    head = _params(baselines[0].get("data")) if baselines else {}
    entries: list[tuple[str, Mapping[str, Any] | None, Mapping[str, Any]]] = []
    for baseline in baselines:
        base = _params(baseline.get("data"))
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state not in (None, "success"):  # queued, running, failed: DVC shows a
                continue  # failed one with the metrics files of the workspace it came from
            revs = exp.get("revs") or [{}]
            name = exp.get("name") or str(revs[0].get("rev"))[:7]
            entries.append((name, revs[0].get("data"), base))
        label = baseline.get("name") or str(baseline.get("rev"))[:7]
        entries.append((label, baseline.get("data"), base))
    for ws in (b for b in exp_show if b.get("rev") == "workspace"):
        entries.append(("workspace", ws.get("data"), head))

    points: dict[tuple, dict[str, Any]] = {}
    for experiment, data, base in entries:
        params, metrics = _params(data), _metrics(data)
        if not all(isinstance(metrics.get(k), (int, float)) for k in ("bpw", "kld_mean")):
            continue
        recipe = str((params.get("recipe") or {}).get("name", "?"))
        point = {
            "name": point_name(params, base, recipe_tiers),
            "experiment": experiment,
            "recipe": recipe,
            "budget": budget_label(params.get("budget")) if recipe == "auto" else "hand recipe",
            "bits_per_weight": metrics["bpw"],
            "gib": metrics.get("GiB"),
            "kld_mean": metrics["kld_mean"],
            "top1_agreement": metrics.get("top1"),
        }
        key = (recipe, point["budget"], round(point["bits_per_weight"], 6), point["kld_mean"])
        points.setdefault(key, point)
    out = sorted(points.values(), key=lambda p: (p["bits_per_weight"], p["kld_mean"]))
    names = [p["name"] for p in out]
    for p in out:
        if names.count(p["name"]) > 1:
            p["name"] = f"{p['name']} ({p['experiment']})"
    return out


def render_table(points: Sequence[Mapping[str, Any]]) -> str:
    """The points as a Markdown table, sorted as given; `front` marks the KLD front."""
    on_front = {id(p) for p in front(list(points))}

    def num(v: Any, digits: int) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "–"

    lines = [
        "| point | bits/weight | GiB | KLD mean | top-1 | front | experiment |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for p in points:
        cells = [
            str(p["name"]).replace("|", "\\|"),
            num(p["bits_per_weight"], 4),
            num(p.get("gib"), 4),
            num(p["kld_mean"], 4),
            num(p.get("top1_agreement"), 4),
            "yes" if id(p) in on_front else "",
            f"`{p['experiment']}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep(points: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """points.json, table.md and the two charts in `out_dir`; the files written. An
    error (nothing written) when there are no points."""
    if not points:
        raise TierquantError(
            "dvc exp show lists no experiment with quality metrics: run the sweep first "
            "(`tierquant sweep run`, docs/sweep.md)"
        )
    out_dir = Path(out_dir)
    written = []
    with atomic_output(out_dir / POINTS, is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(points))
    written.append(out_dir / POINTS)
    with atomic_output(out_dir / TABLE, is_dir=False) as tmp:
        tmp.write_text(render_table(points) + "\n", encoding="utf-8")
    written.append(out_dir / TABLE)
    for metric, name in CHARTS.items():
        if curve_chart(points, out_dir / name, metric=metric):
            written.append(out_dir / name)
    return written


# --- the experiments ------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One experiment of the sweep: its label and its `dvc exp run -S` overrides."""

    label: str
    overrides: tuple[str, ...]


def plan_sweep(
    budgets: Sequence[float], recipes: Sequence[str], extra: Sequence[str] = ()
) -> list[Planned]:
    """recipe=auto at each budget (bits per weight), then each hand recipe; each with the
    gate off and `extra` overrides (e.g. `model=gpt-oss-20b`)."""
    planned = []
    also = "".join(f" {o}" for o in extra)
    for b in budgets:
        planned.append(
            Planned(
                f"auto {budget_label({'bits_per_weight': b})}{also}",
                ("recipe=auto", f"budget.bits_per_weight={b}", *NO_GATE, *extra),
            )
        )
    for r in recipes:
        planned.append(Planned(f"{r}{also}", (f"recipe={r}", *NO_GATE, *extra)))
    if not planned:
        raise TierquantError("nothing to sweep: give --budgets and/or --recipes")
    return planned


def queue_status(text: str) -> dict[str, str]:
    """`dvc queue status`'s table as {experiment name: status}."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[-1] in ("Queued", "Running", *DONE) and words[0] != "Task":
            out[words[1]] = words[-1]
    return out


def queue_workers(text: str) -> int | None:
    """How many workers (active + idle) `dvc queue status` reports; None if it does not."""
    found = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return int(found.group(1)) + int(found.group(2)) if found else None


@dataclass
class SweepRun:
    """What `run_sweep` queued, and how each ended."""

    queued: dict[str, Planned] = field(default_factory=dict)  # DVC name -> experiment
    status: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [n for n in self.queued if self.status.get(n) == "Failed"]


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise TierquantError(f"{what} failed: " + " / ".join(tail))
    return proc


def run_sweep(
    planned: Sequence[Planned],
    *,
    dvc: Dvc,
    jobs: int = 1,
    poll_s: float = 10.0,
    log: Log = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> SweepRun:
    """Queue `planned`, start `jobs` workers, and poll `dvc queue status` until every
    task of this sweep has succeeded or failed, logging each change."""
    run = SweepRun()
    log(f"sweep: queueing {len(planned)} experiment{'s' * (len(planned) > 1)}, quality gate off")
    for p in planned:
        args = ["exp", "run", "--queue"]
        for o in p.overrides:
            args += ["-S", o]
        proc = _check(dvc(args), f"dvc exp run --queue ({p.label})")
        found = re.search(r"Queued experiment '([^']+)'", proc.stdout + proc.stderr)
        if not found:
            raise TierquantError(
                f"dvc exp run --queue ({p.label}): no experiment name in its output"
            )
        run.queued[found.group(1)] = p
        log(f"sweep: queued {found.group(1)}: {p.label}")
    _check(dvc(["queue", "start", "-j", str(jobs)]), "dvc queue start")
    log(
        f"sweep: running {len(run.queued)} with {jobs} worker{'s' * (jobs > 1)} "
        "(`dvc queue logs -f <name>` follows one)"
    )
    start, last, idle_since = clock(), None, None
    while True:
        text = _check(dvc(["queue", "status"]), "dvc queue status").stdout
        status = queue_status(text)
        run.status = {n: status.get(n, "Queued") for n in run.queued}
        done = [n for n in run.queued if run.status[n] in DONE]
        running = [n for n in run.queued if run.status[n] == "Running"]
        summary = (len(done), tuple(running), len(run.failed))
        if summary != last:
            now = int(clock() - start)
            what = ", ".join(f"{run.queued[n].label} ({n})" for n in running) or "none"
            log(
                f"sweep: [{now // 60:02d}:{now % 60:02d}] {len(done)}/{len(run.queued)} done"
                f" ({len(run.failed)} failed); running: {what}"
            )
            last = summary
        if len(done) == len(run.queued):
            return run
        # none started, or all stopped (`dvc queue stop`). The worker count comes from
        # celery's 1 s inspect broadcast, which a busy worker on loaded cores can miss;
        # an experiment of ours Running (read from the queue's files) proves a worker.
        if queue_workers(text) == 0 and not running:
            idle_since = clock() if idle_since is None else idle_since
            if clock() - idle_since > NO_WORKER_S:
                raise TierquantError(
                    f"no queue worker has run for {NO_WORKER_S:.0f} s with "
                    f"{len(run.queued) - len(done)} of this sweep's experiments not done: "
                    "`dvc queue start` runs them, then `tierquant sweep` gathers them"
                )
        else:
            idle_since = None
        sleep(poll_s)


def failure_lines(run: SweepRun, dvc: Dvc) -> list[str]:
    """One `error:`-ready line per failed experiment, with the error its log shows."""
    lines = []
    for name in run.failed:
        logs = dvc(["queue", "logs", name])
        lines_ = [ln.strip() for ln in (logs.stdout + logs.stderr).splitlines()]
        # the stage's own `error:` line says why; DVC's `ERROR:` only which stage failed
        own = [ln for ln in lines_ if ln.startswith("error:")]
        dvcs = [ln for ln in lines_ if ln.startswith("ERROR:")]
        why = f": {own[0]}" if own else (f": {dvcs[-1]}" if dvcs else "")
        lines.append(
            f"experiment {name} ({run.queued[name].label}) failed{why} "
            f"(`dvc queue logs {name}` shows its log)"
        )
    return lines


# --- gathering, and the command line -------------------------------------------------


def gather(*, root: Path, out_dir: Path, dvc_args: Sequence[str] = (), log: Log = print) -> list:
    """Read `dvc exp show --json` (+ `dvc_args`), write the sweep's files into `out_dir`
    and the dvc plots into `out_dir/plots`; the points."""
    points = sweep_points(
        exp_show_json(root=root, dvc_args=list(dvc_args)),
        recipe_tiers=recipe_default_tiers(Path(root) / "conf"),
    )
    written = write_sweep(points, out_dir)
    rel = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in written]
    log(f"sweep: {len(points)} points -> {', '.join(rel)}")
    revs = [p["experiment"] for p in points if p["experiment"] != "workspace"]
    plots = out_dir / PLOTS
    proc = subprocess.run(
        [dvc_executable(), "plots", "diff", *revs, "--targets", *DVC_PLOTS, "-o", str(plots)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        log(f"sweep: dvc plots for the browser -> {plots / 'index.html'}")
    else:  # the PNGs and the table are written: say why the HTML is not, and go on
        log(f"sweep: warning: dvc plots diff failed: {proc.stderr.strip()[-300:]}")
    log("")
    log(render_table(points))
    log("")
    log(
        "Next: `dvc exp apply <experiment> && dvc repro card` makes that model's card, "
        "with this curve."
    )
    return points


DESCRIPTION = """\
The Pareto sweep as one command: quality against size across size budgets and recipes.

  1. queue recipe=auto at each --budgets (bits per weight) and each of --recipes, with
     the quality gate off (`-S validate.<threshold>=null`: the low budgets would fail
     it), as `dvc exp run --queue`;
  2. run the queue (`dvc queue start -j JOBS`) and wait until every task has
     succeeded or failed, logging progress;
  3. gather every experiment's point (`dvc exp show`) into the sweep folder
     (paths.sweep, `sweep/`): points.json, table.md, kld.png (KLD mean vs bits per
     weight), top1.png (top-1 agreement vs bits per weight), each point named by what
     it changed (`auto 3.3 bpw`, `mixed_3_6`, `seed`), and plots/index.html (dvc plots
     diff of pareto_kld and pareto_top1, offline).

Then `dvc exp apply <experiment> && dvc repro card` gives that model's card, placed on
the curve. Exits 1 with an `error:` line per failed experiment (after gathering the
others). `tierquant sweep` alone only gathers (step 3). docs/sweep.md has the details.
"""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`tierquant sweep run`'s options on `parser`."""
    parser.add_argument(
        "--budgets",
        nargs="*",
        type=float,
        default=list(DEFAULT_BUDGETS),
        metavar="BPW",
        help="recipe=auto budgets in bits per weight "
        f"(default: {' '.join(map(str, DEFAULT_BUDGETS))}; none: hand recipes only)",
    )
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=None,
        metavar="RECIPE",
        help="hand recipes (conf/recipe/; default: all of them but auto)",
    )
    parser.add_argument(
        "-j", "--jobs", type=int, default=1, help="experiments run at once (default 1)"
    )
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every experiment (repeatable), e.g. -S model=gpt-oss-20b",
    )
    parser.add_argument(
        "--poll", type=float, default=10.0, metavar="SECONDS", help="queue poll interval"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the experiments' overrides, run nothing"
    )


def check_planned(planned: Sequence[Planned], check: Callable[[list[str]], Any]) -> None:
    """`check` (the CLI's: compose conf/ + the overrides and type them, as `dvc exp run`
    will) each experiment's overrides: a value out of range or a key that does not exist
    fails here, naming the experiment, before anything is queued."""
    for p in planned:
        try:
            check(list(p.overrides))
        except Exception as e:  # Hydra's, OmegaConf's and tierquant's own errors
            raise TierquantError(f"{p.label}: {e}") from None


def run_dvc(root: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    """`dvc cmd` in `root`, its output captured in files, not pipes: `dvc queue start`
    leaves workers behind that inherit its stdout and stderr, and a pipe would stay open
    (and `subprocess.run` would wait) until the last worker exits."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run([dvc_executable(), *cmd], cwd=root, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def hand_recipes(conf_dir: Path) -> list[str]:
    """The recipes of conf/recipe/ that are not recipe=auto."""
    return [r for r in recipe_default_tiers(conf_dir) if r != "auto"]


def run_command(
    args: argparse.Namespace,
    *,
    root: Path,
    out_dir: Path,
    check: Callable[[list[str]], Any],
    log: Log = print,
) -> int:
    """`tierquant sweep run`: check, queue, run, wait, gather; 1 if an experiment failed.
    `check(overrides)` types one experiment's params (see check_planned)."""
    known = hand_recipes(root / "conf")
    recipes = known if args.recipes is None else list(args.recipes)
    unknown = [r for r in recipes if r not in known]
    if unknown:
        raise TierquantError(
            f"--recipes {' '.join(unknown)}: not a hand recipe of conf/recipe/ "
            f"({', '.join(known)}; recipe=auto is swept by --budgets)"
        )
    if args.jobs < 1:
        raise TierquantError(f"--jobs {args.jobs}: at least 1")
    planned = plan_sweep(args.budgets, recipes, args.set)
    check_planned(planned, check)
    if args.dry_run:
        for p in planned:
            log(f"{p.label}: dvc exp run --queue " + " ".join(f"-S {o}" for o in p.overrides))
        return 0

    def dvc(cmd: list[str]) -> subprocess.CompletedProcess:
        return run_dvc(root, cmd)

    try:
        run = run_sweep(planned, dvc=dvc, jobs=args.jobs, poll_s=args.poll, log=log)
    except KeyboardInterrupt:
        raise TierquantError(
            "interrupted: the queued experiments go on running (`dvc queue status`; `dvc "
            "queue kill <name>` stops one); `tierquant sweep` gathers them when done"
        ) from None
    failed = failure_lines(run, dvc)
    if len(failed) < len(run.queued):
        gather(root=root, out_dir=out_dir, log=log)
    if failed:
        raise TierquantError(
            "\n".join([*failed, f"{len(failed)} of {len(run.queued)} experiments failed"])
        )
    return 0
