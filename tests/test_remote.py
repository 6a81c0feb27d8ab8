"""A DVC remote on S3, end to end: the real DVC client with dvc-s3 against a real S3
server (moto's standalone server, tests/s3server.py), no mocks inside DVC.

One "machine A" run is shared by the module: a clone of a bare origin runs docs/cache.md's
"Sharing the cache between machines" verbatim (its `bash` blocks, minus the `pip
install` lines: the venv running the tests has the extra already, and an editable
install from a temporary clone would repoint the package at it), i.e. `dvc repro`,
`dvc push --run-cache`, commit and `git push`. Other machines are further clones of
the origin, each with its own `.dvc/cache` (the clone's own, with the committed
`cache.type`), its own `data/` and only the credentials in the environment.
"""

from __future__ import annotations

import hashlib
import re
import time
import types
from pathlib import Path

import pytest
import yaml
from hubserver import LocalHub
from s3server import BUCKET, S3Server, clear_aws_env

from tests.conftest import PYTHON, copy_repo, run
from tests.docs import bash_blocks, section

pytestmark = [pytest.mark.slow, pytest.mark.remote]

ROOT = Path(__file__).resolve().parents[1]
ALWAYS_RUN = {"machine"}
GIT_ID = {
    "GIT_AUTHOR_NAME": "tester",
    "GIT_AUTHOR_EMAIL": "tester@localhost",
    "GIT_COMMITTER_NAME": "tester",
    "GIT_COMMITTER_EMAIL": "tester@localhost",
}


def readme_blocks() -> list[str]:
    """The `bash` blocks of the docs' remote section (docs/cache.md, "Sharing the cache
    between machines"), without `pip install` lines."""
    blocks = bash_blocks(section("## Sharing the cache between machines"))
    assert len(blocks) == 3, blocks  # set up, compute + push, pull + repro
    return [
        "\n".join(line for line in b.splitlines() if not line.startswith("pip install"))
        for b in blocks
    ]


def _ran(output: str) -> set[str]:
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def sh(script: str, cwd: Path, s3: S3Server, check: bool = True, **env: str):
    return run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd,
        env={**s3.env(), **GIT_ID, **env},
        check=check,
    )


def dvc(args: list[str], cwd: Path, s3: S3Server, check: bool = True, **env: str):
    return run(["dvc", *args], cwd, env={**s3.env(), **GIT_ID, **env}, check=check)


def outputs(repo: Path) -> dict[str, bytes]:
    """Every file under data/ and metrics/ (links followed): relative path -> bytes."""
    return {
        str(p.relative_to(repo)): p.read_bytes()
        for top in ("data", "metrics")
        for p in sorted((repo / top).rglob("*"))
        if p.is_file()
    }


def cache_objects(repo: Path) -> list[Path]:
    files = repo / ".dvc" / "cache" / "files" / "md5"
    return sorted(p for p in files.rglob("*") if p.is_file()) if files.exists() else []


def object_name(key: str) -> str:
    """files/md5/ab/cdef... (or .dir) -> abcdef...: the md5 the object must have."""
    parts = key.split("/")
    return (parts[-2] + parts[-1]).removesuffix(".dir")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        clear_aws_env(mp)
        with S3Server(tmp_path_factory.mktemp("s3")) as server:
            yield server


@pytest.fixture(scope="module")
def machine_a(s3, tmp_path_factory):
    """The docs' first two remote blocks in a clone of a bare origin: remote set up,
    `dvc repro`, `dvc push --run-cache`, lock committed and pushed to the origin."""
    root = tmp_path_factory.mktemp("machines")
    src = copy_repo(root / "src")
    run(["git", "clone", "-q", "--bare", str(src), str(root / "origin.git")], root)
    run(["git", "clone", "-q", str(root / "origin.git"), str(root / "a")], root)
    a = root / "a"
    setup, compute, _ = readme_blocks()
    sh(setup, a, s3)
    proc = sh(compute, a, s3)
    return types.SimpleNamespace(root=root, path=a, repro=proc, outputs=outputs(a))


def clone(machine_a, name: str) -> Path:
    dest = machine_a.root / name
    run(["git", "clone", "-q", str(machine_a.root / "origin.git"), str(dest)], machine_a.root)
    return dest


@pytest.fixture(scope="module")
def machine_b(machine_a, s3):
    """A fresh clone (empty cache, no data/) after the docs' third remote block."""
    b = clone(machine_a, "b")
    assert not (b / "data" / "original").exists() and not cache_objects(b)
    proc = sh(readme_blocks()[2], b, s3)
    return types.SimpleNamespace(path=b, proc=proc)


def test_credentials_stay_out_of_git(machine_a, s3):
    config = (machine_a.path / ".dvc" / "config").read_text()
    assert f"s3://{BUCKET}/tierquant" in config and s3.secret_access_key not in config
    assert s3.secret_access_key in (machine_a.path / ".dvc" / "config.local").read_text()
    tracked = run(["git", "ls-files"], machine_a.path).stdout.split()
    assert ".dvc/config.local" not in tracked and "dvc.lock" in tracked
    assert run(["git", "status", "--porcelain"], machine_a.path).stdout == ""


def test_pull_then_repro_reruns_nothing_and_matches_a(machine_a, machine_b, s3):
    assert {"download", "benchmark@original", "publish"} <= _ran(machine_a.repro.stdout)
    assert _ran(machine_b.proc.stdout) <= ALWAYS_RUN, machine_b.proc.stdout
    b_outputs = outputs(machine_b.path)
    assert set(b_outputs) == set(machine_a.outputs)
    # benchmark results are measurements: B has A's pushed bytes, not a new measurement
    assert "data/benchmark/original.json" in b_outputs
    different = [p for p in b_outputs if b_outputs[p] != machine_a.outputs[p]]
    assert different == []
    status = dvc(["status"], machine_b.path, s3).stdout
    assert {line[:-1] for line in status.splitlines() if line.endswith(":")} <= ALWAYS_RUN


def test_exp_run_after_pull_runs_only_that_tier(machine_b, s3):
    proc = dvc(["exp", "run", "-S", "tiers.experts=4"], machine_b.path, s3)
    ran = _ran(proc.stdout)
    assert {"quantize@experts", "assemble", "validate", "benchmark@model", "card"} <= ran
    untouched = {"download", "plan@rules", "reference", "benchmark@original"}
    untouched |= {"quantize@control", "quantize@sensitive", "quantize@attention"}
    assert not ran & untouched, ran


def _queue_done(repo: Path, s3: S3Server) -> bool:
    status = dvc(["queue", "status"], repo, s3).stdout
    return not re.search(r"\b(Queued|Running)\b", status)


def test_queued_sweep_runs_two_experiments_in_parallel(machine_b, s3):
    """Two tier variants queued and run with two workers, each in its own temporary
    copy under .dvc/tmp/exps: both show with their metrics; neither reruns plan or
    reference (their outputs come from the cache, their stages are unchanged)."""
    repo = machine_b.path
    for name, bits in (("experts6", "6"), ("experts5", "5")):
        dvc(["exp", "run", "--queue", "-n", name, "-S", f"tiers.experts={bits}"], repo, s3)
    dvc(["queue", "start", "-j", "2"], repo, s3)
    try:
        deadline = time.monotonic() + 900
        while not _queue_done(repo, s3):
            assert time.monotonic() < deadline, dvc(["queue", "status"], repo, s3).stdout
            time.sleep(3)
    finally:
        dvc(["queue", "stop"], repo, s3, check=False)
    status = dvc(["queue", "status"], repo, s3).stdout
    assert status.count("Success") == 2, status
    for name in ("experts6", "experts5"):
        log = dvc(["queue", "logs", name], repo, s3).stdout
        ran = _ran(log)
        assert "quantize@experts" in ran and "validate" in ran, log
        assert not ran & {"download", "plan@rules", "reference", "benchmark@original"}
    shown = yaml.safe_load(dvc(["exp", "show", "--json"], repo, s3).stdout)
    exps = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                exps[rev.get("name")] = rev["data"]
    for name, bits in (("experts6", 6), ("experts5", 5)):
        data = exps[name]
        assert data["params"]["params.yaml"]["data"]["tiers"]["experts"] == bits
        quality = data["metrics"]["metrics/headline/quality.json"]["data"]
        assert quality["passed"] is True and quality["kld_mean"] > 0
    assert exps["experts6"]["metrics"] != exps["experts5"]["metrics"]


def _verify_remote(s3: S3Server, prefix: str) -> dict[str, bytes]:
    """Every content object under prefix/files/md5 has the md5 its name says, and every
    directory listing names only objects that are there."""
    objects = s3.objects(f"{prefix}/files/md5/")
    for key, data in objects.items():
        assert hashlib.md5(data).hexdigest() == object_name(key), key
    present = {object_name(k) for k in objects}
    for key, data in objects.items():
        if key.endswith(".dir"):
            for entry in yaml.safe_load(data):
                assert entry["md5"] in present, (key, entry)
    return objects


def test_push_cut_mid_way_then_completed(machine_a, s3):
    """The server goes away in the middle of a push (the proxy in front of moto drops
    every connection and stops listening: tests/s3server.py says why a proxy): the push
    fails with DVC's message, what reached the remote is whole, a second push once the
    server is back completes, and a third clone pulls and verifies every object."""
    a = machine_a.path
    prefix = "interrupted"
    dvc(["remote", "add", "--local", "interrupted", f"s3://{BUCKET}/{prefix}"], a, s3)
    total = sum(p.stat().st_size for p in cache_objects(a))
    s3.proxy.cut_after(total // 2)
    proc = dvc(["push", "-r", "interrupted", "--run-cache"], a, s3, check=False)
    assert s3.proxy.cuts == 1 and not s3.proxy.listening
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors and "Could not connect to the endpoint URL" in errors[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    partial = _verify_remote(s3, prefix)
    assert 0 < len(partial) < len(cache_objects(a))

    s3.proxy.resume()
    dvc(["push", "-r", "interrupted", "--run-cache"], a, s3)
    full = _verify_remote(s3, prefix)
    assert len(full) > len(partial)
    status = dvc(["status", "--cloud", "-r", "interrupted"], a, s3).stdout
    assert "in sync" in status, status

    c = clone(machine_a, "c")
    dvc(["remote", "add", "--local", "interrupted", f"s3://{BUCKET}/{prefix}"], c, s3)
    dvc(["pull", "-r", "interrupted", "--run-cache"], c, s3)
    objects = cache_objects(c)
    assert objects and {o.parent.name + o.name for o in objects} <= {
        k.split("/")[-2] + k.split("/")[-1] for k in full
    }
    for obj in objects:
        name = obj.parent.name + obj.name.removesuffix(".dir")
        assert hashlib.md5(obj.read_bytes()).hexdigest() == name, obj
    assert outputs(c) == machine_a.outputs


def _snapshot(repo: Path) -> dict[str, tuple[int, int]]:
    """Every file in the clone but .git and DVC's own tmp/ (locks, state db)."""
    return {
        str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in repo.rglob("*")
        if p.is_file() and ".git" not in p.parts and "tmp" not in p.relative_to(repo).parts[:2]
    }


def _one_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, proc.stderr
    assert any(n in errors[0] for n in needles), errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_wrong_credentials_or_missing_bucket_write_nothing(machine_a, s3):
    d = clone(machine_a, "d")
    before = _snapshot(d)
    for env in ({"AWS_SECRET_ACCESS_KEY": "wrong"}, {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN0000"}):
        proc = dvc(["pull", "--run-cache"], d, s3, check=False, **env)
        _one_error(proc, "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    dvc(["remote", "add", "--local", "nobucket", "s3://no-such-bucket/tierquant"], d, s3)
    before = _snapshot(d)
    proc = dvc(["pull", "-r", "nobucket"], d, s3, check=False)
    _one_error(proc, "NoSuchBucket", "bucket does not exist")
    assert _snapshot(d) == before
    assert not (d / "data" / "original").exists() and not cache_objects(d)

    # A keeps its credentials in .dvc/config.local (docs/cache.md), which DVC prefers to the
    # environment: a second remote there, same URL, wrong secret
    a = machine_a.path
    dvc(["remote", "add", "--local", "badkey", f"s3://{BUCKET}/tierquant"], a, s3)
    dvc(["remote", "modify", "--local", "badkey", "access_key_id", s3.access_key_id], a, s3)
    dvc(["remote", "modify", "--local", "badkey", "secret_access_key", "wrong"], a, s3)
    remote_before = s3.objects("tierquant/")
    a_before = _snapshot(a)
    proc = dvc(["push", "-r", "badkey", "--run-cache"], a, s3, check=False)
    # DVC logs one `failed to transfer` line per run-cache entry before its final error:
    # every line names the refusal, the last one is the error
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors and all("SignatureDoesNotMatch" in e or "Forbidden" in e for e in errors)
    assert errors[-1].startswith("ERROR: unexpected error - Forbidden"), errors[-1]
    assert _snapshot(a) == a_before
    assert s3.objects("tierquant/") == remote_before


HUB_TOKEN = "hf_TESTtoken_release_0123456789"


def _expand(value: str, context: dict[str, dict[str, str]]) -> str:
    """The `${{ ... }}` forms release.yml uses: `secrets.X`, `vars.X`, `vars.X || 'd'`."""

    def one(match: re.Match) -> str:
        expr = match.group(1).strip()
        m = re.fullmatch(r"(secrets|vars|github)\.(\w+)(?:\s*\|\|\s*'([^']*)')?", expr)
        assert m, f"release.yml uses an expression this test does not model: {expr}"
        return context[m.group(1)].get(m.group(2)) or m.group(3) or ""

    return re.sub(r"\$\{\{(.*?)\}\}", one, value)


def test_release_workflow_steps_run_against_the_remote_and_hub(machine_a, s3, tmp_path):
    """release.yml's shell steps, in order, in a fresh clone as the runner has it: the
    check, restore from the remote (machine A's push), `dvc repro`, save to the remote,
    publish to the local Hub with the tag. Not run: the `uses:` steps (checkout, Python,
    artifact upload: the clone and this venv stand for the first two) and "Install the
    project" (pip into the venv running the tests)."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    (job,) = workflow["jobs"].values()
    r = clone(machine_a, "release")
    # docs/publishing.md, "Release automation": name the Hub namespace in conf/ and commit
    config = r / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("namespace: null", "namespace: tester", 1))
    run([PYTHON, "-m", "tierquant.config", "--write"], r)
    run(["git", "commit", "-qam", "publish under tester"], r, env=GIT_ID)

    url = f"s3://{BUCKET}/tierquant"
    context = {
        "secrets": {
            "HF_TOKEN": HUB_TOKEN,
            "AWS_ACCESS_KEY_ID": s3.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
        },
        "vars": {"DVC_REMOTE_URL": url},
        "github": {"ref": "refs/tags/v0.1.0", "ref_name": "v0.1.0"},
    }
    github_path = tmp_path / "github_path"
    github_path.touch()
    with LocalHub(require_token=HUB_TOKEN) as hub:
        base_env = {
            "GITHUB_REF_NAME": "v0.1.0",
            "GITHUB_PATH": str(github_path),
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home"),
            # the runner has no AWS credentials but the step's; the endpoint is moto's
            "AWS_ACCESS_KEY_ID": "",
            "AWS_SECRET_ACCESS_KEY": "",
            **{k: _expand(str(v), context) for k, v in job["env"].items()},
        }
        outputs_by_step = {}
        for step in job["steps"]:
            if "run" not in step or step["name"] == "Install the project":
                continue
            condition = step.get("if")
            env = {**base_env, **{k: _expand(v, context) for k, v in step.get("env", {}).items()}}
            if condition is not None:
                assert condition == "env.DVC_REMOTE_URL != ''", condition
                if not env["DVC_REMOTE_URL"]:
                    continue
            proc = run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                r,
                env={**s3.env(), **env},
            )
            outputs_by_step[step["name"]] = proc.stdout + proc.stderr
        receipt = yaml.safe_load((r / "data" / "publish.json").read_text())
        assert receipt["status"] == "pushed", receipt
        repo = hub.repos[receipt["repo_id"]]
        assert receipt["repo_id"].startswith("tester/")
        assert repo.tags["v0.1.0"] == receipt["commit"]["oid"]

    ran = _ran(outputs_by_step["Run the pipeline"])
    # restored from A's push; only what the namespace change touches reruns (and the
    # check stage, which reads every param: seconds, its stamp unchanged)
    assert ran - ALWAYS_RUN == {"check", "card", "publish"}, ran
    lock = yaml.safe_load((r / "dvc.lock").read_text())
    card_md5 = next(o["md5"] for o in lock["stages"]["card"]["outs"])
    assert s3.objects(f"tierquant/files/md5/{card_md5[:2]}/{card_md5[2:]}")
