"""Shared helpers for the bench/ scripts: run a command, measure wall time and peak RSS."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass
class Measured:
    wall_s: float
    peak_rss: int  # bytes: peak of the summed RSS of the whole process tree (sampled)
    returncode: int
    output: str
    bytes_written: int = 0  # kernel write accounting of the (waited-for) process tree


def _tree_rss(root: int) -> int:
    """Summed RSS of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid = int(fields[1])
            pages = int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        pid = int(entry)
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(cmd: list[str], *, cwd: Path = REPO, env: dict | None = None) -> Measured:
    """Run `cmd`, sampling its process tree's RSS every 20 ms; raise if it fails."""
    full_env = dict(os.environ)
    full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(env or {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    written = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - before) * 512
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-3000:]}")
    return Measured(wall, peak, proc.returncode, output, written)


def copy_checkout(dest: Path, source: Path = REPO) -> Path:
    """A fresh git repo at `dest` holding `source`'s tracked and untracked (non-ignored)
    files, without DVC outputs or dvc.lock: a clean clone of the working tree."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=source,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = source / rel
        if not src.is_file() or (rel.startswith("data/") and not rel.endswith(".gitignore")):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    (dest / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=tierquant", "-c", "user.email=tierquant@localhost"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def scratch_dir(prefix: str, workdir: str | Path | None) -> Path:
    """A fresh folder for one run's files under `workdir` (created if missing; the system
    temp folder when None). Left in place for the caller to remove."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
