"""Verify the DVC cache: every object must hash to its name; evict the ones that do not.

With `cache.type` hardlink or symlink (this project's `.dvc/config`) an output
file in the workspace IS its cache object: a tool that edits it in place (root ignores
the read-only bit; `chmod` and an in-place rewrite do the same) changes the object too,
and from then on `dvc checkout` and `dvc repro` restore the bad bytes while `dvc status`
says all is well. `verify_cache` rehashes every object (md5, DVC's hash, streamed) against
its name; with `evict`, a corrupt object is deleted together with every workspace file
that is a link to it, so the next `dvc repro` finds the output missing and rebuilds it
(the run-cache cannot restore an object that is gone). `.dir` objects (directory listings)
are checked the same way, and a listing that names an in-progress temporary counts as
corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tierquant.errors import TierquantError

_CHUNK = 16 << 20
_OBJECT = re.compile(r"[0-9a-f]{32}(\.dir)?")
TEMP_SUFFIX = ".tmp"  # tierquant.core.checkpoint.atomic_output's `.<name>.tmp` temporaries


@dataclass
class CorruptObject:
    """A cache object whose bytes do not hash to its name, and the files linked to it."""

    path: Path
    expected: str
    actual: str
    reason: str
    linked: list[Path] = field(default_factory=list)


@dataclass
class CacheReport:
    """What `verify_cache` checked and found."""

    cache_dir: Path
    checked: int = 0
    corrupt: list[CorruptObject] = field(default_factory=list)
    evicted: bool = False


def md5_file(path: Path) -> str:
    """md5 of a file, read in chunks (DVC's object name is the md5 of its bytes)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_objects_dir(root: Path) -> Path:
    """The md5 object folder of the repo's local DVC cache (honours `cache.dir`)."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return Path(repo.cache.local.path)
    except NotDvcRepoError:
        raise TierquantError(f"{root} is not a DVC repository (no .dvc/ folder)") from None
    except DvcException as e:
        raise TierquantError(f"{root}: DVC cannot open the repository: {e}") from None


def _check_object(obj: Path) -> CorruptObject | None:
    name = obj.parent.name + obj.name
    expected = name.removesuffix(".dir")
    actual = md5_file(obj)
    if actual != expected:
        return CorruptObject(obj, expected, actual, "content does not match its name")
    if name.endswith(".dir"):
        try:
            entries = json.loads(obj.read_bytes())
            temporaries = [
                e["relpath"]
                for e in entries
                if any(p.endswith(TEMP_SUFFIX) for p in Path(e["relpath"]).parts)
            ]
        except (ValueError, TypeError, KeyError):
            return CorruptObject(obj, expected, actual, "not a DVC directory listing")
        if temporaries:
            return CorruptObject(obj, expected, actual, f"lists a temporary: {temporaries[0]}")
    return None


def _workspace_files(root: Path) -> list[Path]:
    """Files in the workspace that may be links into the cache (not .git/.dvc/.venv)."""
    skip = {".git", ".dvc", ".venv", "node_modules"}
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        out += [Path(folder) / f for f in files]
    return out


def _links_to(corrupt: list[CorruptObject], root: Path) -> None:
    """Fill each object's `linked`: workspace hardlinks (same inode) or symlinks to it."""
    by_inode = {}
    by_path = {}
    for c in corrupt:
        st = c.path.stat()
        by_inode[(st.st_dev, st.st_ino)] = c
        by_path[c.path.resolve()] = c
    for f in _workspace_files(root):
        try:
            if f.is_symlink():
                hit = by_path.get(f.resolve())
            else:
                st = f.stat()
                hit = by_inode.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
        except OSError:
            continue
        if hit is not None:
            hit.linked.append(f)


def verify_cache(root: Path, *, evict: bool = True, cache_dir: Path | None = None) -> CacheReport:
    """Rehash every object of `root`'s DVC cache; with `evict`, delete the corrupt ones
    and the workspace files linked to them (so `dvc repro` rebuilds those outputs)."""
    root = Path(root)
    cache_dir = Path(cache_dir) if cache_dir else cache_objects_dir(root)
    report = CacheReport(cache_dir)
    if not cache_dir.is_dir():
        return report
    for obj in sorted(cache_dir.rglob("*")):
        if not obj.is_file() or not _OBJECT.fullmatch(obj.parent.name + obj.name):
            continue  # not an object (e.g. DVC's own in-progress temporaries)
        report.checked += 1
        problem = _check_object(obj)
        if problem is not None:
            report.corrupt.append(problem)
    if report.corrupt:
        _links_to(report.corrupt, root)
        if evict:
            for c in report.corrupt:
                for f in c.linked:
                    f.unlink(missing_ok=True)
                c.path.unlink(missing_ok=True)
            report.evicted = True
    return report
