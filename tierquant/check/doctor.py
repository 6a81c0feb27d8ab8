"""`tierquant doctor`: bring a workspace back to a consistent state after an interrupted
or failed run, and say what it did.

DVC writes dvc.lock in place (`open(path, "w+")`, then the YAML): a SIGINT or SIGTERM
while it writes leaves it empty, cut mid-line or cut at a stage boundary, and from then
on every `dvc` command fails or trusts a lock that lost stages. DVC's `.dvc/tmp/rwlock`
is written the same way. Stage outputs themselves appear whole or not at all
(tierquant.core.files.atomic_output), but a killed stage leaves its `.<name>.tmp`.
`doctor` (in this order):

1. refuses to touch anything while a `dvc` process holds the repository's rwlock;
2. with `reset` (the way back after a failed experiment): writes params.yaml back to the
   committed bytes (`git show HEAD:params.yaml`, compared by content: git's own
   `checkout` trusts the index's stat data, which `dvc exp run` can leave matching a
   modified file, so `git status` calls it clean); without `reset`, only a params.yaml
   that does not parse is put back;
3. dvc.lock: a stage entry is kept when it is whole (every dep, param file and out that
   dvc.yaml declares for the stage, each out/dep with a 32-hex md5, a size, a dir's
   nfiles; the file's last line ends with a newline); an entry that is not, or a stage
   that git's dvc.lock has and this one lost, is taken from git's dvc.lock (HEAD); an
   entry of a stage dvc.yaml no longer defines is left as DVC left it. The repaired file
   is written to a temporary and renamed, so the repair itself cannot truncate it;
4. removes a `.dvc/tmp/rwlock` that does not parse (DVC drops dead pids itself);
5. deletes leftover `.<output>.tmp` temporaries of atomic_output;
6. rehashes the cache and evicts objects that do not hash to their names
   (tierquant.check.cache.verify_cache, what `tierquant cache verify` runs);
7. lists the stages whose outputs (or deps) do not match dvc.lock (`dvc status`): the
   next `dvc repro` restores them from the run-cache when their deps and params match
   an earlier run (no recomputation: "is cached - skipping run"), and reruns them
   otherwise, with outputs byte-identical to an uninterrupted run.

It does not run the pipeline: `dvc repro` after it does (with `reset`, `tierquant
doctor --reset && dvc repro` is the way back, docs/troubleshooting.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tierquant.errors import TierquantError

LOCK = "dvc.lock"
PARAMS = "params.yaml"
RWLOCK = Path(".dvc") / "tmp" / "rwlock"
_MD5 = re.compile(r"[0-9a-f]{32}(\.dir)?")
TEMP = re.compile(r"\..+\.tmp")  # atomic_output's `.<name>.tmp`
OUTPUT_FOLDERS = ("data", "metrics")


@dataclass
class DoctorReport:
    """What `doctor` repaired (`repairs`: damage an interrupt left), put back on request
    (`reset`: params.yaml, not damage) and found still out of date (`stale`)."""

    repairs: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        return bool(self.repairs)


def doctor(root: Path, *, reset: bool = False, verify_cache: bool = True) -> DoctorReport:
    """Repair `root` (module docstring); return what was done and what is out of date."""
    root = Path(root)
    report = DoctorReport()
    _refuse_while_running(root)
    _params(root, reset, report)
    _lock(root, report)
    _rwlock(root, report)
    _temporaries(root, report)
    if verify_cache:
        from tierquant.check.cache import verify_cache as verify

        found = verify(root, evict=True)
        for c in found.corrupt:
            linked = ", ".join(str(p.relative_to(root)) for p in c.linked) or "no workspace file"
            report.repairs.append(f"evicted cache object {c.path.name} ({c.reason}); {linked}")
    report.stale = _stale(root)
    return report


# --- git ----------------------------------------------------------------------------------


def _git_show(root: Path, path: str) -> bytes | None:
    """The committed bytes of `path` (HEAD), or None when git has none."""
    proc = subprocess.run(
        ["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True, check=False
    )
    return proc.stdout if proc.returncode == 0 else None


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to a temporary beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.doctor")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- 1. no dvc running --------------------------------------------------------------------


def _holders(root: Path) -> list[str]:
    try:
        lock = json.loads((root / RWLOCK).read_text())
    except (OSError, ValueError):
        return []
    infos: list[Any] = []
    for mode in ("read", "write"):
        for held in (lock.get(mode) or {}).values():
            infos += held if isinstance(held, list) else [held]
    alive = []
    for info in infos:
        try:
            pid = int(info["pid"])
            os.kill(pid, 0)
        except (KeyError, TypeError, ValueError, ProcessLookupError):
            continue
        except PermissionError:
            pass
        alive.append(f"pid {info['pid']}: {info.get('cmd', '?')}")
    return sorted(set(alive))


def _refuse_while_running(root: Path) -> None:
    holders = _holders(root)
    if holders:
        raise TierquantError(
            f"dvc is running in {root} ({'; '.join(holders)}): let it finish or stop it "
            "(Ctrl-C), then run `tierquant doctor` again"
        )


# --- 2. params.yaml -----------------------------------------------------------------------


def _params(root: Path, reset: bool, report: DoctorReport) -> None:
    path = root / PARAMS
    committed = _git_show(root, PARAMS)
    current = path.read_bytes() if path.is_file() else None
    if committed is None or current == committed:
        return
    if reset:
        _replace(path, committed)
        report.reset.append("params.yaml: put back to the committed one (git HEAD)")
        return
    try:
        ok = isinstance(yaml.safe_load(current or b""), dict)
    except yaml.YAMLError:
        ok = False
    if not ok:
        _replace(path, committed)
        report.repairs.append("params.yaml: did not parse; put back to git HEAD's")


# --- 3. dvc.lock --------------------------------------------------------------------------


def _load_yaml(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict):
        return None
    return doc


def _hash_entry_ok(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return False
    md5 = entry.get("md5")
    if not isinstance(md5, str) or not _MD5.fullmatch(md5) or entry.get("hash") != "md5":
        return False
    if not isinstance(entry.get("size"), int):
        return False
    return not md5.endswith(".dir") or isinstance(entry.get("nfiles"), int)


def _entry_ok(entry: object, declared: dict[str, Any] | None) -> bool:
    """A whole lock entry: DVC's fields, every hash complete, and (when dvc.yaml declares
    the stage) every declared dep, params file and out present."""
    if not isinstance(entry, dict) or not isinstance(entry.get("cmd"), str):
        return False
    deps, outs = entry.get("deps", []), entry.get("outs", [])
    if not isinstance(deps, list) or not isinstance(outs, list):
        return False
    if not all(_hash_entry_ok(e) for e in [*deps, *outs]):
        return False
    params = entry.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        return False
    if declared is None:
        return True
    return (
        {e["path"] for e in deps} == declared["deps"]
        and {e["path"] for e in outs} == declared["outs"]
        and set(params) == declared["params"]
        and entry["cmd"] == declared["cmd"]
    )


def _declared(root: Path) -> dict[str, dict[str, Any]] | None:
    """dvc.yaml's stages as DVC resolves them (foreach expanded): cmd, dep paths, params
    files, out paths. None when DVC cannot read dvc.yaml/params.yaml."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            out = {}
            for stage in repo.index.stages:
                if not getattr(stage, "cmd", None):
                    continue
                params = {d.def_path for d in stage.deps if hasattr(d, "params")}
                out[stage.name] = {  # not .addressing: that is relative to the cwd
                    "cmd": stage.cmd,
                    "deps": {d.def_path for d in stage.deps if not hasattr(d, "params")},
                    "params": params,
                    "outs": {o.def_path for o in stage.outs},
                }
            return out
    except (DvcException, OSError, ValueError) as e:
        import logging

        logging.getLogger(__name__).warning("doctor: DVC cannot resolve dvc.yaml: %s", e)
        return None


def _lock(root: Path, report: DoctorReport) -> None:
    path = root / LOCK
    raw = path.read_bytes() if path.is_file() else b""
    committed = _load_yaml(_git_show(root, LOCK))
    current = _load_yaml(raw)
    if current is None:
        if committed is None:
            if raw.strip():
                path.unlink()
                report.repairs.append("dvc.lock: did not parse and git has none; removed")
            return
        _replace(path, _git_show(root, LOCK) or b"")
        what = "was empty" if not raw.strip() else "did not parse"
        report.repairs.append(f"dvc.lock: {what}; put back git HEAD's")
        return
    # Parked while DVC resolves dvc.yaml: it reads dvc.lock too, and would refuse a bad one.
    parked = path.with_name(f".{LOCK}.doctor-parked")
    os.replace(path, parked)
    try:
        declared = _declared(root)
    finally:
        os.replace(parked, path)
    stages: dict[str, Any] = current["stages"]
    names = list(stages)
    if names and not raw.endswith(b"\n"):  # cut mid-line: its last entry is suspect
        stages = {n: stages[n] for n in names[:-1]} | {names[-1]: None}
    fixed: dict[str, Any] = {}
    changed = []
    old = committed["stages"] if committed else {}
    for name in [*stages, *[n for n in old if n not in stages]]:
        entry = stages.get(name)
        want = None if declared is None else declared.get(name)
        if declared is not None and name not in declared and name not in stages:
            continue  # git's lock has a stage dvc.yaml no longer defines: not needed
        if entry is not None and _entry_ok(entry, want):
            fixed[name] = entry
            continue
        if name in old and _entry_ok(old[name], want):
            fixed[name] = old[name]
            changed.append(f"{name} (from git HEAD)")
        else:
            changed.append(f"{name} (dropped: `dvc repro` redoes it)")
    if not changed:
        return
    doc = {"schema": current.get("schema", "2.0"), "stages": fixed}
    _replace(path, yaml.safe_dump(doc, sort_keys=False).encode())
    report.repairs.append(f"dvc.lock: incomplete entries repaired: {', '.join(changed)}")


# --- 4, 5. DVC's rwlock, temporaries -------------------------------------------------------


def _rwlock(root: Path, report: DoctorReport) -> None:
    path = root / RWLOCK
    if not path.is_file():
        return
    try:
        json.loads(path.read_text())
    except ValueError:
        path.unlink()
        report.repairs.append(f"{RWLOCK}: did not parse (cut by the interrupt); removed")


def _temporaries(root: Path, report: DoctorReport) -> None:
    import shutil

    for folder in OUTPUT_FOLDERS:
        for dirpath, dirs, files in os.walk(root / folder):
            for name in [*dirs, *files]:
                if TEMP.fullmatch(name):
                    p = Path(dirpath) / name
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    report.repairs.append(f"removed the partial output {p.relative_to(root)}")
            dirs[:] = [d for d in dirs if not TEMP.fullmatch(d)]


# --- 7. what still differs -----------------------------------------------------------------


def _stale(root: Path) -> list[str]:
    """Stages `dvc status` reports (outputs or deps not matching dvc.lock), but the
    always-changed ones with nothing else to say."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            status = repo.status()
    except DvcException as e:
        return [f"dvc status failed: {e}"]
    out = []
    for name, changes in status.items():
        what = []
        for change in changes:
            if isinstance(change, dict):
                for kind, items in change.items():
                    if isinstance(items, dict):
                        what += [f"{kind} {path}: {state}" for path, state in items.items()]
            elif change != "always changed":
                what.append(str(change))
        if what:
            out.append(f"{name}: {'; '.join(what)}")
    return out
