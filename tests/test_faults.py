"""Fault injection: kills, full disks, bad inputs, determinism, concurrent runs.

Run alone with `pytest -m faults`; RELIABILITY.md lists each fault, what the pipeline
does and the test here that proves it. Three throwaway copies of the repo:

- `runs` A and B: `dvc repro` from scratch in each, at once. A is the reference
  "uninterrupted run" every other output is compared with.
- `chain` C: each long stage is SIGKILLed part-way through its writes, then `dvc repro`
  finishes it; finally two `dvc repro` at once. C ends as a complete pipeline whose
  outputs must equal A's.

Bad inputs go through the stage scripts (subprocesses), in A, with their outputs
redirected to temporary paths holding a previous output that must survive.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests import faults
from tests.conftest import PYTHON, copy_repo, run
from tests.faults import (
    BAD_CHECKPOINTS,
    check_cache,
    digest_tree,
    dvc_env,
    fault_env,
    kill_group,
    locked_stages,
    sha256,
    start,
    temporaries,
    tree_size,
    wait_for,
)

pytestmark = pytest.mark.faults

# Settings of the copies: the same code paths as the defaults, a fraction of the time.
FAST_PARAMS = {
    "benchmark": {"contexts": [16], "generate_tokens": 4, "trials": 1, "warmup": 0, "probe_mib": 8},
    "eval": {"num_windows": 4},
    "calibration": {"num_windows": 2, "window_length": 32},
}

# Outputs that are measurements by nature, and outputs made from them: not compared.
MEASURED = {
    "data/benchmark/": "tok/s, load time, peak memory and memory bandwidth measured this run",
    "data/card/": "the model card quotes the benchmark's measured tok/s and memory",
    "metrics/headline/model.json": "the benchmark's tok/s at the first context",
    "metrics/headline/original.json": "the benchmark's tok/s at the first context",
    "data/publish.json": "the dry-run receipt lists the card's sha256",
}
# Measurements inside otherwise deterministic JSON outputs: compared without these keys.
MEASURED_KEYS = {
    "metrics/validate.json": {"peak_memory_bytes": "MLX's peak allocation: varies by a few KB"},
}
ALWAYS_RUN = {"machine"}  # always_changed: runs every time, its output unchanged


def _measured(path: str) -> bool:
    return any(path == m or (m.endswith("/") and path.startswith(m)) for m in MEASURED)


def _deterministic(repo: Path, digests: dict[str, str]) -> dict[str, str]:
    """`digests` without the measurements; JSON files holding some, hashed without them."""
    out = {p: d for p, d in digests.items() if not _measured(p)}
    for path, keys in MEASURED_KEYS.items():
        if path in out:
            data = json.loads((repo / path).read_text())
            kept = {k: v for k, v in data.items() if k not in keys}
            out[path] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return out


def _ran(output: str) -> set[str]:
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def _fast_copy(dest: Path) -> Path:
    repo = copy_repo(dest)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in FAST_PARAMS.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def _finish(proc: subprocess.Popen, what: str, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n{out}\n{err}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two copies after `dvc repro` from scratch (run at the same time), then the bf16
    export (data/float) in each."""
    base = tmp_path_factory.mktemp("runs")
    a, b = _fast_copy(base / "a"), _fast_copy(base / "b")
    procs = [start(["dvc", "repro"], repo, dvc_env()) for repo in (a, b)]
    for repo, proc in zip((a, b), procs, strict=True):
        _finish(proc, f"dvc repro in {repo}")
    # and the bf16 export, by hand as the README says (`tierquant convert`): no DVC stage
    for repo in (a, b):
        run([PYTHON, "stages/convert.py"], repo, env=dvc_env())
    return a, b


@pytest.fixture(scope="module")
def reference(runs) -> dict[str, str]:
    """Digests of the uninterrupted run's outputs."""
    return digest_tree(runs[0])


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """A copy in which the kill tests run one after another."""
    return _fast_copy(tmp_path_factory.mktemp("chain") / "c")


# --- determinism ------------------------------------------------------------------------------


def test_two_runs_from_scratch_are_byte_identical(runs, reference):
    a, b = runs
    got = digest_tree(b)
    assert sorted(got) == sorted(reference)  # the same files, measurements included
    same, got = _deterministic(a, reference), _deterministic(b, got)
    assert len(same) >= 40, sorted(same)
    diff = sorted(p for p in same if got[p] != same[p])
    assert not diff, f"outputs differ between two runs from scratch: {diff}"
    # dvc.lock agrees on every output's hash but the measurements'.
    lock_a, lock_b = locked_stages(a), locked_stages(b)
    assert set(lock_a) == set(lock_b)
    for stage, entry in lock_a.items():
        outs_b = lock_b[stage].get("outs", [])
        for out_a, out_b in zip(entry.get("outs", []), outs_b, strict=True):
            path = out_a["path"]
            if not (_measured(path) or _measured(path + "/") or path in MEASURED_KEYS):
                assert out_a == out_b, stage
    assert check_cache(a) > 0 and check_cache(b) > 0
    assert not temporaries(a) and not temporaries(b)


def test_second_repro_reruns_nothing(runs):
    _, b = runs
    before = digest_tree(b)
    proc = run(["dvc", "repro"], b, env=dvc_env())
    assert _ran(proc.stdout) <= ALWAYS_RUN, proc.stdout
    assert digest_tree(b) == before
    status = run(["dvc", "status"], b, env=dvc_env()).stdout
    assert {line[:-1] for line in status.splitlines() if line.endswith(":")} <= ALWAYS_RUN


# --- SIGKILL part-way, then dvc repro ---------------------------------------------------------

# (dvc target, what the shim matches, where it stalls, the output). `stall-write`: a shard
# half written; `stall-commit`: everything written, the rename not done (the previous
# output already removed).
KILLS = [
    ("download", "download", "stall-write", "data/original"),
    ("plan@rules", "plan", "stall-commit", "data/plan"),
    ("quantize@experts", "quantize tier=experts", "stall-write", "data/quantized/experts"),
    ("assemble", "assemble", "stall-commit", "data/model"),
    ("reference", "reference", "stall-commit", "data/reference"),
]


@pytest.mark.parametrize("target, match, mode, out", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_part_way_then_repro(chain, reference, tmp_path, target, match, mode, out):
    marker = tmp_path / "stalled"
    env = fault_env(tmp_path / "bin", match, mode, 300, marker)
    proc = start(["dvc", "repro", target], chain, env)
    pid = wait_for(marker, proc)
    out_path = chain / out
    tmp = out_path.parent / f".{out_path.name}.tmp"
    assert tree_size(tmp) > 0, "the stage had written nothing yet"
    kill_group(proc, pid)

    # Killed: nothing committed, the half-written temporary is all that is left.
    assert target not in locked_stages(chain)
    assert tmp.exists() and not out_path.exists()
    check_cache(chain)

    proc = run(["dvc", "repro", target], chain, env=dvc_env())
    assert target in _ran(proc.stdout)
    assert not tmp.exists() and not temporaries(chain)
    got = digest_tree(chain)
    mine = {p: d for p, d in got.items() if p.startswith(out + "/") or p == out}
    assert mine and mine == {p: reference[p] for p in mine}
    check_cache(chain)


def test_two_repro_at_once_second_refuses(chain, runs, reference, tmp_path):
    """The first `dvc repro` is held inside its validate stage while a second one starts."""
    marker, release = tmp_path / "stalled", tmp_path / "release"
    env = fault_env(tmp_path / "bin", "validate", "stall-commit", 300, marker)
    env["TIERQUANT_FAULT_RELEASE"] = str(release)
    first = start(["dvc", "repro"], chain, env)
    try:
        wait_for(marker, first, timeout=300)
        second = run(["dvc", "repro"], chain, env=dvc_env(), check=False)
    finally:
        release.touch()
    _finish(first, "the first dvc repro")
    assert second.returncode != 0
    said = second.stdout + second.stderr
    assert "is busy" in said or "Unable to acquire lock" in said, said
    assert "Traceback" not in said
    # The first completed intact: the whole pipeline, byte-identical to run A (less A's
    # bf16 export, data/float, which no stage of the pipeline writes).
    got = digest_tree(chain)
    pipeline = {p: d for p, d in reference.items() if not p.startswith("data/float/")}
    assert sorted(got) == sorted(pipeline)
    assert _deterministic(chain, got) == _deterministic(runs[0], pipeline)
    status = run(["dvc", "status"], chain, env=dvc_env()).stdout
    assert {line[:-1] for line in status.splitlines() if line.endswith(":")} <= ALWAYS_RUN
    check_cache(chain)


# --- bad inputs through the stage scripts ----------------------------------------------------


def _stage(repo: Path, stage: str, *args: str, env: dict | None = None):
    return subprocess.run(
        [PYTHON, f"stages/{stage}.py", *args],
        cwd=repo,
        env=env or dvc_env(),
        capture_output=True,
        text=True,
    )


def _copy_output(src: Path, dest: Path) -> Path:
    """A previous output at `dest` (fresh, writable files)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=shutil.copyfile)
    else:
        shutil.copyfile(src, dest)
    return dest


def _assert_clean_failure(proc, named: tuple[str, ...], previous: Path, before: dict) -> None:
    """Non-zero exit, one `error:` line naming every string in `named`, no traceback, the
    previous output as it was and no temporary beside it."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for word in named:
        assert word in errors[0], (word, errors[0])
    assert _digest(previous) == before
    assert not list(previous.parent.glob(".*.tmp"))


def _digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory by relative path."""
    if path.is_file():
        return {"": sha256(path)}
    return {p.relative_to(path).as_posix(): sha256(p) for p in path.rglob("*") if p.is_file()}


def _bad_original(runs, tmp_path, case: str) -> tuple[Path, tuple[str, ...]]:
    bad = _copy_output(runs[0] / "data" / "original", tmp_path / "bad" / "original")
    named = BAD_CHECKPOINTS[case](bad)
    return bad, named


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_convert_refuses_a_bad_checkpoint(runs, tmp_path, case):
    a = runs[0]
    bad, named = _bad_original(runs, tmp_path, case)
    previous = _copy_output(a / "data" / "float", tmp_path / "out" / "float")
    before = _digest(previous)
    proc = _stage(a, "convert", f"paths.original={bad}", f"paths.float={previous}")
    _assert_clean_failure(proc, named, previous, before)


PLAN_CASES = [
    "header_claims_too_much",
    "duplicate_across_shards",
    "index_names_other_shard",
    "fewer_layers_in_config",
    "tokenizer_not_json",
]


@pytest.mark.parametrize("case", PLAN_CASES)
def test_plan_refuses_a_bad_checkpoint(runs, tmp_path, case):
    a = runs[0]
    bad, named = _bad_original(runs, tmp_path, case)
    previous = _copy_output(a / "data" / "plan", tmp_path / "out" / "plan")
    before = _digest(previous)
    proc = _stage(a, "plan", f"paths.original={bad}", f"paths.plan={previous}")
    _assert_clean_failure(proc, named, previous, before)


DOWNLOAD_CASES = [
    "header_claims_too_much",
    "duplicate_across_shards",
    "index_names_other_shard",
    "fewer_layers_in_config",
    "scales_missing",
    "tokenizer_not_json",
    "tokenizer_not_a_tokenizer",
]


@pytest.fixture(scope="module")
def hub():
    from tests.hubserver import LocalHub

    with LocalHub() as server:
        yield server


@pytest.mark.parametrize("case", DOWNLOAD_CASES)
def test_download_refuses_a_bad_snapshot(runs, hub, tmp_path, case):
    """The Hub serves a broken checkpoint: the download stage's verification names it."""
    from tierquant.source.hub import DEFAULT_ALLOW_PATTERNS

    a = runs[0]
    bad, named = _bad_original(runs, tmp_path, case)
    repo_id = f"openai/bad-{case.replace('_', '-')}"
    sha = hub.add_commit(repo_id, bad, message=case)
    previous = _copy_output(a / "data" / "original", tmp_path / "out" / "original")
    before = _digest(previous)
    env = dvc_env({"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""})
    env.pop("HF_HUB_OFFLINE")
    proc = _stage(
        a,
        "download",
        "model.source=hub",
        "model.synthetic=null",
        f"model.repo_id={repo_id}",
        f"model.revision={sha}",
        f"model.allow_patterns=[{','.join(DEFAULT_ALLOW_PATTERNS)}]",
        f"paths.original={previous}",
        env=env,
    )
    _assert_clean_failure(proc, (*named, f"{repo_id}@{sha}"), previous, before)


def _corrupt_json(path: Path) -> None:
    text = path.read_text()
    path.unlink()
    path.write_text(text[: len(text) // 2])


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.unlink()
    path.write_bytes(raw[: len(raw) // 2])


def _nan_original(root: Path) -> None:
    faults.nan_scale(root)


# (id, stage and its arguments, output key, output under A, strings the error names,
#  None or (path key, one of A's outputs to copy, break and pass as that key, how))
Broken = tuple[str, str, Callable[[Path], None]] | None

BAD_PARAMS: list[tuple[str, tuple[str, ...], str, str, tuple[str, ...], Broken]] = [
    (
        "unknown-kind",
        ("plan", "recipe.tiers.experts=[{kinds:[gate_proj,up_proj,bogus]}]"),
        "paths.plan",
        "data/plan",
        ("recipe.tiers.experts[0].kinds", "bogus"),
        None,
    ),
    (
        "tensor-in-no-tier",
        ("plan", "recipe.tiers.experts=[{kinds:[gate_proj,up_proj]}]"),
        "paths.plan",
        "data/plan",
        ("down_proj.weight", "matched by no tier"),
        None,
    ),
    (
        "tensor-in-two-tiers",
        ("plan", "recipe.tiers.attention=[{kinds:[q_proj,k_proj]}]"),
        "paths.plan",
        "data/plan",
        ("q_proj.weight", "matched by 2 tiers"),
        None,
    ),
    (
        "rule-matching-nothing",
        ("plan", "+recipe.tiers.extra=[{kinds:[q_proj],layers:[[40,50]]}]"),
        "paths.plan",
        "data/plan",
        ("recipe.tiers.extra[0]", "matches no tensor"),
        None,
    ),
    (
        "tier-with-no-rules",
        ("plan", "recipe.tiers.experts=[]"),
        "paths.plan",
        "data/plan",
        ("recipe.tiers.experts", "non-empty list"),
        None,
    ),
    (
        "bad-edge-fraction",
        ("plan", "recipe.edge_layers=2/3"),
        "paths.plan",
        "data/plan",
        ("recipe.edge_layers",),
        None,
    ),
    (
        "unknown-selector",
        ("plan", "recipe.tiers.experts=[{kinds:[gate_proj],bogus:1}]"),
        "paths.plan",
        "data/plan",
        ("recipe.tiers.experts[0].bogus",),
        None,
    ),
    (
        "tier-without-plan",
        ("predict", "+tiers.bogus=4"),
        "paths.predict",
        "metrics/predicted_size.json",
        ("tiers.bogus",),
        None,
    ),
    (
        "recipe-tier-without-bits",
        ("predict", "~tiers.experts"),
        "paths.predict",
        "metrics/predicted_size.json",
        ("tiers.experts",),
        None,
    ),
    (
        "bits-7",
        ("quantize", "tier=experts", "tiers.experts=7"),
        "paths.quantized",
        "data/quantized",
        ("tiers.experts", "7"),
        None,
    ),
    (
        "unknown-precision",
        ("quantize", "tier=experts", "tiers.experts=fp3"),
        "paths.quantized",
        "data/quantized",
        ("tiers.experts", "fp3"),
        None,
    ),
    (
        "group-size-16",
        ("quantize", "tier=experts", "quant.group_size=16"),
        "paths.quantized",
        "data/quantized",
        ("quant.group_size", "16"),
        None,
    ),
    (
        "unknown-tier",
        ("quantize", "tier=bogus"),
        "paths.quantized",
        "data/quantized",
        ("bogus",),
        None,
    ),
    (
        "mxfp4-for-a-bf16-module",
        ("quantize", "tier=sensitive", "tiers.sensitive=mxfp4"),
        "paths.quantized",
        "data/quantized",
        ("sensitive", "mxfp4", "lm_head"),
        None,
    ),
    (
        "unknown-config-key",
        ("convert", "+quant.bogus=1"),
        "paths.float",
        "data/float",
        ("quant.bogus",),
        None,
    ),
    (
        "config-wrong-type",
        ("convert", "model.max_shard_bytes=lots"),
        "paths.float",
        "data/float",
        ("model.max_shard_bytes",),
        None,
    ),
    (
        "plan-file-not-json",
        ("quantize", "tier=experts"),
        "paths.quantized",
        "data/quantized",
        ("experts.json", "not valid JSON"),
        ("paths.plan", "data/plan", lambda d: _corrupt_json(d / "experts.json")),
    ),
    (
        "original-shard-truncated",  # quantize reads the original, not data/float
        ("quantize", "tier=experts"),
        "paths.quantized",
        "data/quantized",
        ("model-00003-of-00003.safetensors", "truncated"),
        (
            "paths.original",
            "data/original",
            lambda d: _truncate(d / "model-00003-of-00003.safetensors"),
        ),
    ),
    (
        "mxfp4-nan-scale",
        ("quantize", "tier=experts", "tiers.experts=mxfp4"),
        "paths.quantized",
        "data/quantized",
        (faults.SCALES, "255"),
        ("paths.original", "data/original", _nan_original),
    ),
    (
        "manifest-not-json",
        ("assemble",),
        "paths.model",
        "data/model",
        ("experts/manifest.json", "not valid JSON"),
        ("paths.quantized", "data/quantized", lambda d: _corrupt_json(d / "experts/manifest.json")),
    ),
    (
        "tier-bits-changed-since-quantize",
        ("assemble", "tiers.experts=4"),
        "paths.model",
        "data/model",
        ("manifest.json", "tiers.experts"),
        None,
    ),
    (
        "eval-text-missing",
        ("reference", "eval.path=/nonexistent/eval.txt"),
        "paths.reference",
        "data/reference",
        ("eval.path", "/nonexistent/eval.txt"),
        None,
    ),
    (
        "eval-text-too-short",
        ("reference", "eval.num_windows=100000"),
        "paths.reference",
        "data/reference",
        ("eval.num_windows",),
        None,
    ),
    (
        "reference-array-truncated",
        ("validate",),
        "paths.validate",
        "metrics/validate.json",
        ("nll.npy", "unreadable"),
        ("paths.reference", "data/reference", lambda d: _truncate(d / "nll.npy")),
    ),
]


@pytest.mark.parametrize(
    "stage_args, out_key, out, named, broken",
    [case[1:] for case in BAD_PARAMS],
    ids=[case[0] for case in BAD_PARAMS],
)
def test_stage_refuses_bad_params_or_inputs(
    runs, tmp_path, stage_args, out_key, out, named, broken
):
    a = runs[0]
    stage, *args = stage_args
    previous = _copy_output(a / out, tmp_path / "out" / Path(out).name)
    before = _digest(previous)
    extra = []
    if stage == "assemble":
        extra += [f"paths.size_metrics={tmp_path / 's.json'}"]
        extra += [f"paths.quant_error_plot={tmp_path / 'e.csv'}"]
    if broken is not None:
        key, src, breaks = broken
        bad = _copy_output(a / src, tmp_path / "bad" / Path(src).name)
        breaks(bad)
        extra.append(f"{key}={bad}")
    proc = _stage(a, stage, *args, f"{out_key}={previous}", *extra)
    _assert_clean_failure(proc, named, previous, before)


# --- full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs (the machine must allow mounting one; else the test skips and
    `test_write_error_injected` covers the same path)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# (stage, its arguments, output key, output on the small disk). A directory output gets
# a file `previous.txt` standing for its previous version; a file output is that file.
DISK_FULL = [
    ("download", (), "paths.original", "original"),
    ("convert", (), "paths.float", "float"),
    ("quantize", ("tier=experts",), "paths.quantized", "quantized/experts"),
    ("assemble", (), "paths.model", "model"),
    ("reference", (), "paths.reference", "reference"),
    ("predict", (), "paths.predict", "predicted_size.json"),  # a small file: disk filled first
]


def _fill(disk: Path) -> None:
    """Fill `disk` to the last byte."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("stage, args, key, out", DISK_FULL, ids=[d[0] for d in DISK_FULL])
def test_full_disk(runs, small_disk, tmp_path, stage, args, key, out):
    """The output is on a filesystem that fills up part-way through the stage's writes."""
    a = runs[0]
    target = small_disk / out
    is_file = target.suffix == ".json"
    keep = target if is_file else target / "previous.txt"
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("previous")
    before = _digest(target)
    if is_file:
        _fill(small_disk)
    value = target.parent if stage == "quantize" else target
    extra = []
    if stage == "assemble":
        extra = [f"paths.size_metrics={tmp_path}/s.json", f"paths.quant_error_plot={tmp_path}/e"]
    proc = _stage(a, stage, *args, f"{key}={value}", *extra)
    named = (str(target), "no space left on device")
    _assert_clean_failure(proc, named, target, before)
    assert keep.read_text() == "previous"
    left = sorted(p.name for p in target.parent.iterdir() if p.name != "filler")
    assert left == [target.name]


@pytest.mark.parametrize("stage, key", [("convert", "paths.float"), ("plan", "paths.plan")])
def test_write_error_injected(runs, tmp_path, stage, key):
    """ENOSPC raised by the writes themselves (faultshim.py), where no tmpfs can be had."""
    a = runs[0]
    previous = _copy_output(a / "data" / key.split(".")[1], tmp_path / "out" / "x")
    before = _digest(previous)
    env = dvc_env({"TIERQUANT_FAULT_STAGE": stage, "TIERQUANT_FAULT_MODE": "enospc"})
    proc = subprocess.run(
        [PYTHON, str(faults.SHIM), f"stages/{stage}.py", f"{key}={previous}"],
        cwd=a,
        env=env,
        capture_output=True,
        text=True,
    )
    _assert_clean_failure(proc, (str(previous), "no space left on device"), previous, before)


def test_unusable_output_path(runs, tmp_path):
    """Any other OSError (here: the output's parent is a file) is one line naming the path."""
    a = runs[0]
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    proc = _stage(a, "plan", f"paths.plan={blocker}/plan")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(blocker) in errors[0] and "[EEXIST]" in errors[0], errors
    assert blocker.read_text() == "a file"
