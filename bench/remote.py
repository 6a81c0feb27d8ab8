"""Pull + repro from a DVC remote against a full repro, at gpt-oss-120b widths.

In a scratch directory, one invocation: a clone of this repo composed for `model=wide`
with N layers (default 2) becomes a bare origin; machine A clones it, runs the full
`dvc repro validate` (download → convert → plan → predict → quantize@tiers → assemble →
reference → validate; benchmarks off, as bench/pipeline.py), `dvc push --run-cache` to
a local S3 server (moto, as in the tests: tests/s3server.py) and pushes its lock; A's
clone is then deleted (disk); machine B clones the origin and runs docs/cache.md's "Sharing
the cache between machines" for the same target: `dvc pull --run-cache --with-deps
validate`, then `dvc repro validate`, which must run no stage. Prints per step wall
time, peak RSS of the process tree and bytes written, and pull + repro as a fraction of
the full repro. The S3 server is on the same
machine (loopback), so the pull is bound by moto and DVC, not by a network; moto
serves one transfer at a time (`-j 1`, see MOTO_JOBS).

    python bench/remote.py --workdir /big/scratch     # ~50 GB scratch at 2 layers
    python bench/remote.py --remote local --workdir /big/scratch   # what runs at wide
    python bench/remote.py --model tiny --layers 6    # smoke test, a minute
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from common import REPO, VENV_BIN, dir_bytes, gb, run_measured, scratch_dir
from pipeline import prepare_clone

sys.path.insert(0, str(REPO / "tests"))
from s3server import BUCKET, S3Server  # noqa: E402

# moto holds a whole object in memory to complete a multipart upload or to serve a GET
# (shards here are up to 5 GB): four at once (DVC's default jobs on this machine)
# answered 500 on CompleteMultipartUpload. One at a time failed the same way on the
# 4.6 GB shards (the 2-layer wide run, 2026-12-02), so at these widths use --remote
# local; a real S3 takes these objects and DVC's default parallelism.
MOTO_JOBS = ["-j", "1"]

GIT_ID = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wide")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--remote",
        choices=("s3", "local"),
        default="s3",
        help="s3: moto on loopback (default); local: a directory remote in the workdir "
        "(moto fails multipart uploads of multi-GB objects: see MOTO_JOBS)",
    )
    args = parser.parse_args()
    work = scratch_dir("tq-remote-", args.workdir)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    dvc = str(VENV_BIN / "dvc")
    try:
        src = prepare_clone(work, args.model, args.layers)
        subprocess.run(
            ["git", "clone", "-q", "--bare", str(src), str(work / "origin.git")], check=True
        )
        shutil.rmtree(src)
        server = S3Server(work / "s3") if args.remote == "s3" else contextlib.nullcontext()
        with server as s3:
            if s3 is None:
                env, url, jobs = {**GIT_ID}, str(work / "remote"), []
            else:
                env = {**s3.env(), **GIT_ID, "TMPDIR": str(work)}
                url, jobs = f"s3://{BUCKET}/tierquant", MOTO_JOBS
            a = work / "a"
            subprocess.run(["git", "clone", "-q", str(work / "origin.git"), str(a)], check=True)
            run_measured([dvc, "remote", "add", "-d", "storage", url], cwd=a, env=env)
            rows = [
                (
                    "A: full `dvc repro validate`",
                    run_measured([dvc, "repro", "validate"], cwd=a, env=env),
                )
            ]
            rows.append(
                (
                    "A: `dvc push --run-cache`",
                    run_measured([dvc, "push", "--run-cache", *jobs], cwd=a, env=env),
                )
            )
            cached = dir_bytes(a / ".dvc" / "cache")
            for cmd in (
                ["git", "add", "-A"],
                ["git", "commit", "-qm", "repro"],
                ["git", "push", "-q"],
            ):
                run_measured(cmd, cwd=a, env=env)
            shutil.rmtree(a)
            b = work / "b"
            subprocess.run(["git", "clone", "-q", str(work / "origin.git"), str(b)], check=True)
            pull = run_measured(
                [dvc, "pull", "--run-cache", "--with-deps", "validate", *jobs], cwd=b, env=env
            )
            repro = run_measured([dvc, "repro", "validate"], cwd=b, env=env)
            rows += [
                ("B: `dvc pull --run-cache --with-deps validate`", pull),
                ("B: `dvc repro validate`", repro),
            ]
            ran = [ln for ln in repro.output.splitlines() if ln.startswith("Running stage")]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; "
        f"model={args.model}, {args.layers} layers, {args.remote} remote; "
        f"DVC cache pushed: {gb(cached)}"
    )
    print("| step | wall | peak RSS | written |\n|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m.wall_s:.1f} s | {gb(m.peak_rss)} | {gb(m.bytes_written)} |")
    full, push = rows[0][1].wall_s, rows[1][1].wall_s
    both = pull.wall_s + repro.wall_s
    print(
        f"\npull + repro on B: {both:.1f} s = {both / full:.2f}x the full repro on A "
        f"({full:.1f} s); push on A {push:.1f} s ({push / full:.2f}x)"
    )
    print(f"stages B's repro ran: {ran or 'none'}")
    if ran:
        raise SystemExit("error: the repro after the pull ran stages: " + ", ".join(ran))


if __name__ == "__main__":
    main()
