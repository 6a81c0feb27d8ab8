"""Nothing lost (#27): a refused run removes no output, a failed one leaves the expensive
outputs usable, an interrupted one is repaired by `tierquant doctor`, and the docs'
way back (docs/troubleshooting.md) works. RELIABILITY.md lists each case beside its test.

Two throwaway copies of the repo (small calibration set, `shrink_calibration`, so the
measure stage takes seconds; conf/ is edited and committed, so `dvc exp run` keeps it):

- `good`: one `dvc repro`; the refused and failed experiments run in it, each followed
  by the way back. Its committed dvc.lock is this checkout's, whose measure hash is not
  the copy's (another calibration set): the situation of a fresh clone on another CPU,
  whose cache lacks what git's dvc.lock names.
- `interrupted`: `dvc repro` from scratch, stopped by SIGINT/SIGTERM at 12 points, each
  followed by `tierquant doctor`; then `dvc repro` must finish with `good`'s outputs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PYTHON, REPO, copy_repo, run, shrink_calibration
from tests.docs import doc_pages
from tests.faults import digest_tree, dvc_env, locked_stages, temporaries

pytestmark = pytest.mark.faults

SHIM = Path(__file__).with_name("dvcshim.py")
ALWAYS_RUN = {"machine"}
EXPENSIVE = ("data/original", "data/measure", "data/reference", "data/quantized")
MEASURED = ("data/benchmark/", "data/card/", "data/publish.json", "metrics/headline/")


def _readme_way_back() -> str:
    """The command of "The way back" (docs/troubleshooting.md), verbatim: the one command
    that every page giving it (README.md, docs/*.md) gives."""
    found = set()
    for page in doc_pages():
        text = page.read_text()
        found |= {
            m.strip()
            for m in re.findall(r"\*\*The way back\*\*.*?```bash\n(.*?)\n\s*```", text, re.S)
        }
    assert found, "no page of the docs has a way back"
    assert len(found) == 1, found
    return found.pop()


WAY_BACK = _readme_way_back()


def _ran(output: str) -> set[str]:
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def _kept(digests: dict[str, str], prefixes=("data/", "metrics/")) -> dict[str, str]:
    """Digests without the measurements (tok/s and what quotes them) and validate's peak
    memory (tests/test_faults.py's MEASURED)."""
    return {
        p: d
        for p, d in digests.items()
        if p.startswith(prefixes)
        and not p.startswith(MEASURED)
        and p not in ("metrics/validate.json",)
    }


def _clone(dest: Path) -> Path:
    """A repo copy with a small calibration set and this checkout's dvc.lock committed, as
    a clone has it. Its measure hash is not the copy's (another calibration set): the
    situation of a fresh clone on another CPU, whose cache lacks what git's lock names."""
    repo = copy_repo(dest)
    shutil.copyfile(REPO / "dvc.lock", repo / "dvc.lock")
    run(["git", "add", "dvc.lock"], repo)
    shrink_calibration(repo)  # commits dvc.lock with conf/ and params.yaml
    return repo


def _dvc(repo: Path, *args: str, check: bool = True):
    return run(["dvc", *args], repo, env=dvc_env(), check=check)


def _status_clean(repo: Path) -> None:
    out = _dvc(repo, "status").stdout
    changed = {line[:-1] for line in out.splitlines() if line.endswith(":")}
    assert changed <= ALWAYS_RUN, out


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    repo = _clone(tmp_path_factory.mktemp("good") / "repo")
    _dvc(repo, "repro")
    return repo, digest_tree(repo)


def _way_back(repo: Path) -> str:
    """The docs' way back, verbatim, through a shell."""
    env = dvc_env()
    proc = subprocess.run(WAY_BACK, shell=True, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# --- refused before any output is removed ---------------------------------------------------

REFUSED = [
    ("group-size-48", ["quant.group_size=48"], "quant.group_size"),
    ("no-layers", ["model.synthetic.num_hidden_layers=0"], "model.synthetic.num_hidden_layers"),
    ("width-not-a-multiple", ["model.synthetic.intermediate_size=96"], "quant.group_size=64"),
    ("bpw-1", ["recipe=auto", "budget.bits_per_weight=1.0"], "budget.bits_per_weight"),
    ("bpw-2-infeasible", ["recipe=auto", "budget.bits_per_weight=2.0"], "infeasible"),
    ("gib-negative", ["recipe=auto", "budget.gib=-1"], "budget.gib"),
    ("budget-with-hand-recipe", ["budget.gib=-1"], "hand recipe"),
    ("window-length-0", ["eval.window_length=0"], "eval.window_length"),
    ("eval-too-short", ["eval.num_windows=100000"], "eval.num_windows"),
    ("eval-path-missing", ["eval.path=/nonexistent.txt"], "eval.path"),
    ("eval-path-empty", ["eval.path=EMPTY"], "eval.num_windows"),
    ("calibration-too-long", ["calibration.num_windows=1000"], "calibration.num_windows"),
]


@pytest.mark.parametrize("overrides, named", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_before_any_output_is_removed(good, tmp_path, overrides, named):
    repo, _ = good
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    before, lock = digest_tree(repo), (repo / "dvc.lock").read_bytes()
    args = [a for o in overrides for a in ("-S", o)]
    proc = _dvc(repo, "exp", "run", *args, check=False)
    assert proc.returncode != 0, proc.stdout
    assert _ran(proc.stdout) == {"check"}, proc.stdout  # measure never reran, nothing did
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (repo / "dvc.lock").read_bytes() == lock
    after = digest_tree(repo)
    assert after == {p: before[p] for p in after}  # md5 for md5, nothing changed
    removed = sorted(set(before) - set(after))
    if not any(o.startswith("recipe=") for o in overrides):
        assert not removed  # nothing removed either
        run([PYTHON, "-m", "tierquant.cli", "doctor", "--reset", "--no-cache-check"], repo)
    else:
        # recipe=auto defines other quantize@ stages: `dvc exp run` checks the workspace
        # out (--force --allow-missing) before it reproduces anything, and that removes
        # the outputs of the stages the new params no longer define (DVC's "unused
        # links"): the hand recipe's tiers and its plan@rules. They stay in the cache; the
        # way back brings them back from the run-cache, quantizing nothing.
        assert removed and all(p.startswith(("data/quantized/", "data/plan/")) for p in removed)
        ran = _ran(_way_back(repo))
        assert not ran & {"download", "measure@damage", "reference"}, ran
        assert not any(r.startswith("quantize@") for r in ran), ran
    assert digest_tree(repo) == before
    _status_clean(repo)


# --- a failure only a run can show; a by-hand stage run; the way back --------------------------


def test_failed_gate_keeps_the_expensive_outputs_and_the_way_back_recomputes_none(good):
    """tiers.experts=4 with an impossible gate: quantize@experts reruns, validate fails.
    The way back restores every expensive output from the run-cache (no stage that
    makes one runs) and ends with the good run's bytes."""
    repo, _ = good
    before = digest_tree(repo)
    proc = _dvc(
        repo, "exp", "run", "-S", "tiers.experts=4", "-S", "validate.kld_mean_max=0", check=False
    )
    assert proc.returncode != 0 and "validate" in _ran(proc.stdout), proc.stdout
    after = digest_tree(repo)
    # the seed recipe's expensive outputs (it has no data/measure: only recipe=auto measures)
    for out in ("data/original", "data/reference"):
        mine = {p: d for p, d in after.items() if p.startswith(out + "/")}
        assert mine and mine == {p: before[p] for p in mine}, out
    ran = _ran(_way_back(repo))
    assert not ran & {"download", "measure", "reference", "quantize@experts", "convert"}, ran
    assert _kept(digest_tree(repo)) == _kept(before)
    _status_clean(repo)
    assert not temporaries(repo)


def test_way_back_after_a_by_hand_stage_run(good):
    """README's own example, `python stages/quantize.py tier=experts tiers.experts=4`, by
    hand replaces data/quantized/experts with fresh files (not the cache's): `git checkout
    . && dvc checkout` refused them ("unsaved files ... Use --force"); the way back
    brings the good tier back from the run-cache, quantizing nothing."""
    repo, _ = good
    before = digest_tree(repo)
    run([PYTHON, "stages/quantize.py", "tier=experts", "tiers.experts=4"], repo, env=dvc_env())
    tier = {p: d for p, d in digest_tree(repo).items() if p.startswith("data/quantized/experts/")}
    assert tier != {p: before[p] for p in tier}
    ran = _ran(_way_back(repo))
    assert not ran & {"quantize@experts", "measure", "reference", "download"}, ran
    assert _kept(digest_tree(repo)) == _kept(before)
    _status_clean(repo)


# --- interrupts -------------------------------------------------------------------------------

# (signal, when): "lock N" = while DVC's N-th write of dvc.lock in this run is half done
# (tests/dvcshim.py holds it there); "stage K +D" = D seconds after this run's K-th
# `Running stage` line (inside that stage's command, or DVC's own work around it: DVC
# has already removed the stage's outputs). Each point resumes from where the last one
# left, so the points walk through the pipeline (check, download, convert, measure,
# plan, the tiers, ...); the test prints which stage each one hit.
POINTS = [
    (signal.SIGINT, "lock 1"),
    (signal.SIGINT, "stage 1 +1.0"),
    (signal.SIGINT, "lock 1"),
    (signal.SIGTERM, "stage 1 +0.5"),
    (signal.SIGINT, "lock 2"),
    (signal.SIGINT, "stage 2 +2.0"),
    (signal.SIGINT, "stage 1 +0.0"),
    (signal.SIGTERM, "lock 1"),
    (signal.SIGINT, "stage 2 +1.0"),
    (signal.SIGINT, "lock 2"),
    (signal.SIGINT, "stage 1 +2.0"),
    (signal.SIGINT, "lock 1"),
]


def _interrupt(repo: Path, sig: signal.Signals, when: str, tmp: Path) -> str:
    """Run `dvc repro` (through the shim) and deliver `sig` to its process group at
    `when`; return what it printed. A point whose moment never comes (the pipeline
    finished first) is reported, not signalled."""
    marker = tmp / f"stalled-{time.monotonic_ns()}"
    env = dvc_env()
    kind, *rest = when.split()
    if kind == "lock":
        env.update({"TIERQUANT_LOCK_STALL": rest[0], "TIERQUANT_LOCK_MARKER": str(marker)})
    proc = subprocess.Popen(
        [PYTHON, str(SHIM), "repro"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    assert proc.stdout is not None
    if kind == "lock":
        while proc.poll() is None and not marker.exists():
            time.sleep(0.02)
    else:
        k, delay, seen = int(rest[0]), float(rest[1]), 0
        for line in proc.stdout:
            lines.append(line)
            seen += line.startswith("Running stage '")
            if seen == k:
                time.sleep(delay)
                break
    hit = proc.poll() is None
    if hit:
        os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    return f"{'hit' if hit else 'missed'}: {''.join(lines)}{out}"


def _lock_parses(repo: Path) -> bool:
    try:
        return isinstance(yaml.safe_load((repo / "dvc.lock").read_text()), dict)
    except yaml.YAMLError:
        return False


def test_interrupts_at_twelve_points_then_doctor_and_repro(good, tmp_path):
    ref_repo, ref = good
    repo = _clone(tmp_path / "interrupted")
    hits, damaged = 0, 0
    for sig, when in POINTS:
        said = _interrupt(repo, sig, when, tmp_path)
        hits += said.startswith("hit")
        outcome, _, printed = said.partition(": ")
        print(f"{sig.name} at {when}: {outcome}; ran {sorted(_ran(printed))}")
        doc = run([PYTHON, "-m", "tierquant.cli", "doctor"], repo, env=dvc_env(), check=False)
        damaged += "repaired: dvc.lock" in doc.stdout
        assert doc.returncode in (0, 1), doc.stdout + doc.stderr
        assert "Traceback" not in doc.stderr, doc.stderr
        assert _lock_parses(repo), (when, doc.stdout)
        _dvc(repo, "status")  # DVC reads the repaired lock
    assert hits >= 10, hits
    assert damaged >= 4, damaged  # the lock-write points did cut dvc.lock, doctor mended it
    _dvc(repo, "repro")
    assert _lock_parses(repo)
    _status_clean(repo)
    assert not temporaries(repo)
    assert _kept(digest_tree(repo)) == _kept(ref), "outputs differ from an uninterrupted run"
    assert set(locked_stages(repo)) == set(locked_stages(ref_repo))


def test_doctor_says_nothing_to_repair_on_a_good_workspace(good):
    repo, _ = good
    proc = run([PYTHON, "-m", "tierquant.cli", "doctor"], repo, env=dvc_env(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to repair" in proc.stdout
