"""The `tierquant` command: the pipeline's stages by name, and maintenance commands.

`tierquant <stage> [key=value ...]` runs `python stages/<stage>.py` of the checkout you
are in (the same thing `dvc repro` runs for that stage; overrides as in the stage's own
`--help`). `tierquant cache verify` checks the DVC cache (tierquant.check.cache). The
pipeline itself is driven by DVC (`dvc repro`, `dvc exp run`); this command is a thin
front door over the stage scripts and the library, not a second pipeline.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tierquant.errors import TierquantError
from tierquant.report.compare import DESCRIPTION as COMPARE_DESCRIPTION
from tierquant.report.compare import add_arguments as add_compare_arguments

# The stages in pipeline order (dvc.yaml), with what each does; tests keep this list
# equal to stages/*.py.
STAGES: tuple[tuple[str, str], ...] = (
    ("check", "every param and cheap input, before any output is removed -> a stamp"),
    ("download", "write data/original: the synthetic tiny model, or a pinned Hub snapshot"),
    ("convert", "by hand only: data/original -> data/float, the exact bf16 export (mlx-lm)"),
    ("plan", "recipe (or recipe=auto: data/measure + budget) + headers -> data/plan/<tier>.json"),
    ("calibration", "auto/gptq: calibration windows, off the eval set -> data/calibration.npy"),
    ("measure", "recipe=auto: damage of each allocation group x candidate -> data/measure"),
    ("predict", "plan + tiers + quant -> metrics/predicted_size.json (bytes, bits/weight)"),
    ("quantize", "one tier, read from data/original, at its precision -> data/quantized/<tier>"),
    ("quantize_gptq", "quant.rounding=gptq: one tier, GPTQ-rounded -> data/quantized/<tier>"),
    ("assemble", "every tier's shards (linked) -> data/model, a stock mlx-lm model"),
    ("reference", "the original's log-probs on the eval set -> data/reference"),
    ("validate", "data/model's structure and KLD/top-1/PPL vs the reference; the gate"),
    ("pareto", "this run's (bits/weight, kld_mean, top-1) -> metrics/pareto.json (sweep plot)"),
    ("machine", "record this machine (OS, chip, memory, MLX) -> data/machine.json"),
    ("benchmark", "prefill/generation tok/s and peak memory (variant=model|original)"),
    ("card", "the model card data/card/README.md from this run's measurements"),
    ("publish", "dry-run receipt data/publish.json, or a push (publish.push=true)"),
)

EPILOG = """\
The stages above are the pipeline's, in order: `dvc repro` runs those the recipe needs
(calibration and measure only for recipe=auto; convert, the bf16 export, never: run
`tierquant convert` for data/float). `tierquant <stage> --help` says how to call one.

maintenance:
  doctor [--reset]     after an interrupted (Ctrl-C, SIGTERM, kill) or failed run: repair
                       dvc.lock, DVC's rwlock, params.yaml if it does not parse, remove
                       partial outputs, evict corrupt cache objects, list the outputs that
                       differ from dvc.lock; exits 1 if it repaired damage. Then `dvc
                       repro`. --reset also puts params.yaml back to the committed one:
                       `tierquant doctor --reset && dvc repro` is the way back after a
                       failed experiment
  cache verify         rehash every DVC cache object, evict the corrupt ones (and the
                       outputs linked to them) so the next `dvc repro` rebuilds them
  compare [options]    one row per experiment (and the workspace, main): what it
                       changed (`experts=4`, `auto 3.3 bpw`), bits/weight, GiB, KLD,
                       top-1, tok/s, peak memory, passed; --wide, --sort KEY, --csv, --md
  sweep run [options]  the Pareto sweep in one command: queue recipe=auto at several
                       budgets and the hand recipes (gate off), run them, wait, and
                       write sweep/ (points.json, table.md, kld.png, top1.png, dvc
                       plots); `tierquant sweep run --help`, docs/sweep.md
  sweep [args]         only gather: every experiment's point from `dvc exp show
                       --json` (extra args go to it) into sweep/, which the card
                       reads to place its model on the curve

Run inside a tierquant checkout. Compare experiments with `tierquant compare`.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierquant",
        description="gpt-oss MXFP4 checkpoints -> tiered mixed-precision MLX models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, what in STAGES:
        p = sub.add_parser(name, help=what, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    cache = sub.add_parser("cache", help="maintenance of the DVC cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="<cache command>")
    verify = cache_sub.add_parser(
        "verify",
        help="rehash every cache object against its name; evict what is corrupt",
        description=(
            "Rehash every object of the DVC cache (md5) against its name. A corrupt object "
            "(e.g. an output edited in place while hard-linked to the cache) is reported and, "
            "unless --no-evict, deleted with every workspace file linked to it, so the next "
            "`dvc repro` rebuilds those outputs. Exits 1 when it found something."
        ),
    )
    verify.add_argument("--no-evict", action="store_true", help="report only, delete nothing")
    doc = sub.add_parser(
        "doctor",
        help="repair the workspace after an interrupted or failed run (then `dvc repro`)",
        description="Repair what an interrupted or failed `dvc repro`/`dvc exp run` left "
        "(tierquant.check.doctor says exactly what): a dvc.lock that does not parse or lost "
        "stages, a corrupt DVC rwlock, partial outputs, corrupt cache objects; list the "
        "outputs that differ from dvc.lock. Exits 1 if it repaired damage, 0 if there was "
        "none (--reset's params.yaml is not damage). Then `dvc repro` restores from the "
        "run-cache or reruns what differs.",
    )
    doc.add_argument(
        "--reset",
        action="store_true",
        help="also put params.yaml back to the committed one (the way back after a failed "
        "experiment: `tierquant doctor --reset && dvc repro`)",
    )
    doc.add_argument(
        "--no-cache-check",
        action="store_true",
        help="skip rehashing the cache (minutes per 100 GB at 120B; `tierquant cache verify` "
        "does it on its own)",
    )
    doc.add_argument("--repo", type=Path, default=None, help="the checkout (default: here)")
    add_compare_arguments(
        sub.add_parser(
            "compare",
            help="experiments side by side: what each changed, the headline metrics",
            description=COMPARE_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    sweep = sub.add_parser(
        "sweep",
        help="the Pareto sweep: `sweep run` runs it; `sweep` alone gathers it -> sweep/",
        description="`tierquant sweep run [options]` runs the Pareto sweep (queue budgets "
        "and hand recipes, run, wait, gather: `tierquant sweep run --help`). `tierquant "
        "sweep [args]` only gathers: it reads `dvc exp show --json` (args passed on, e.g. "
        "--all-commits) and writes every experiment's bits per weight, kld_mean and top-1, "
        "named by what it changed, into paths.sweep (sweep/: points.json, table.md, "
        "kld.png, top1.png, plots/); `dvc repro card` then says where the model sits on "
        "that curve.",
    )
    sweep.add_argument("args", nargs=argparse.REMAINDER, help="passed on to dvc exp show")
    verify.add_argument("--repo", type=Path, default=None, help="the checkout (default: here)")
    return parser


def run_stage(name: str, args: list[str]) -> int:
    """Run `python stages/<name>.py args...` in the checkout holding the current folder."""
    from tierquant.config import project_root

    root = project_root()
    script = root / "stages" / f"{name}.py"
    if not script.is_file():
        raise TierquantError(f"{script}: no such stage script in this checkout")
    return subprocess.run([sys.executable, str(script), *args], cwd=root).returncode


def cache_verify(repo: Path | None, evict: bool) -> int:
    """Print what `tierquant.check.cache.verify_cache` found; 1 if anything was corrupt."""
    from tierquant.check.cache import verify_cache
    from tierquant.config import project_root

    root = Path(repo) if repo else project_root()
    report = verify_cache(root, evict=evict)
    for c in report.corrupt:
        linked = ", ".join(str(p.relative_to(root)) for p in c.linked) or "no workspace file"
        action = "evicted" if report.evicted else "corrupt"
        print(f"error: {action} {c.path}: {c.reason} (md5 {c.actual}); linked: {linked}")
    if report.corrupt:
        what = "were evicted: run `dvc repro` to rebuild" if report.evicted else "are corrupt"
        print(f"error: {len(report.corrupt)} of {report.checked} cache objects {what}")
        return 1
    print(f"cache ok: {report.checked} objects in {report.cache_dir} match their names")
    return 0


def doctor(repo: Path | None, reset: bool, verify_cache: bool = True) -> int:
    """Print what `tierquant.check.doctor.doctor` did and found; 1 if it repaired damage
    (not for --reset's params.yaml, which was asked for)."""
    from tierquant.check.doctor import doctor as run_doctor
    from tierquant.config import project_root

    root = Path(repo) if repo else project_root()
    report = run_doctor(root, reset=reset, verify_cache=verify_cache)
    for line in report.reset:
        print(f"reset: {line}")
    for line in report.repairs:
        print(f"repaired: {line}")
    for line in report.stale:
        print(f"differs from dvc.lock: {line}")
    if report.stale:
        print("run `dvc repro`: it restores these from the run-cache or reruns them")
    if report.repaired:
        print(f"doctor: {len(report.repairs)} repairs")
        return 1
    matches = "" if report.stale else "; the workspace matches dvc.lock"
    print(f"doctor: nothing to repair{matches}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """Print tierquant.compare's table for the checkout holding the current folder."""
    from tierquant.config import project_root
    from tierquant.report.compare import from_args

    print(from_args(args, root=project_root()))
    return 0


def _sweep_dir(root: Path) -> Path:
    from tierquant.config import compose, validate

    return root / validate(compose([])).paths.sweep


def sweep(extra: list[str]) -> int:
    """`tierquant sweep [args]`: gather the points of `dvc exp show --json` (+ `extra`)
    into paths.sweep (tierquant.report.sweep.gather)."""
    from tierquant.config import project_root
    from tierquant.report.sweep import gather

    root = project_root()
    gather(root=root, out_dir=_sweep_dir(root), dvc_args=extra)
    return 0


def sweep_run_parser() -> argparse.ArgumentParser:
    from tierquant.report.sweep import DESCRIPTION, add_run_arguments

    parser = argparse.ArgumentParser(
        prog="tierquant sweep run",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    return parser


def sweep_run(argv: list[str]) -> int:
    """`tierquant sweep run [options]` (tierquant.report.sweep.run_command)."""
    from tierquant.config import compose, project_root, validate
    from tierquant.report.sweep import run_command

    args = sweep_run_parser().parse_args(argv)
    root = project_root()

    def check(overrides: list[str]) -> None:
        validate(compose(overrides))

    return run_command(args, root=root, out_dir=_sweep_dir(root), check=check)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        if argv and argv[0] in dict(STAGES):  # everything after the name is the stage's
            return run_stage(argv[0], argv[1:])
        if argv[:2] == ["sweep", "run"]:
            return sweep_run(argv[2:])
        if argv and argv[0] == "sweep" and not {"-h", "--help"} & set(argv[1:]):
            return sweep(argv[1:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "cache":
            if args.cache_command != "verify":
                parser.parse_args(["cache", "--help"])
            return cache_verify(args.repo, evict=not args.no_evict)
        if args.command == "doctor":
            return doctor(args.repo, reset=args.reset, verify_cache=not args.no_cache_check)
        if args.command == "compare":
            return compare(args)
        return run_stage(args.command, args.args)  # pragma: no cover (handled above)
    except TierquantError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
