"""Files we write and read beside tensors: canonical JSON, and outputs that appear
complete or not at all.

`atomic_output` gives a stage a temporary sibling of its output, fsyncs it and renames it
into place on success, removes it on any error, and turns a full disk (or another
write-only failure) into one error naming the output. Nothing here knows safetensors
(tierquant.core.checkpoint does).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tierquant.errors import TierquantError


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TierquantError(f"{path}: file is missing") from None
    except ValueError as e:
        raise TierquantError(f"{path}: is not valid JSON ({e})") from e


def json_bytes(obj: object) -> bytes:
    """Canonical JSON for files we write: stable key order, readable, trailing newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: Path, obj: object) -> None:
    Path(path).write_bytes(json_bytes(obj))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_output(path: Path, *, is_dir: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `path`; on success replace `path` with it.

    On an exception the temporary is removed and `path` is left as it was, so an
    output appears complete or not at all. Output files are always new inodes, never
    edited in place: DVC may have hardlinked the old ones into its cache.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # left over by a killed run
        if is_dir:
            tmp.mkdir()
        yield tmp
        if is_dir:
            _fsync_tree(tmp)
        _remove(path)
        os.replace(tmp, path)
    except BaseException as e:
        what = _write_failure(e, path.parent) if isinstance(e, OSError) else None
        with contextlib.suppress(OSError):
            _remove(tmp)
        if what:
            raise TierquantError(
                f"{path}: {what} while writing it; the partial output ({tmp.name}) was "
                "removed and any previous output is kept. Free space (or fix the "
                "filesystem) and rerun."
            ) from e
        raise


# Errors that can only come from writing the output: reported with the output's path.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded (no space left for this user)",
    errno.EFBIG: "file too large for the filesystem",
    errno.EROFS: "read-only filesystem",
}


def _write_failure(e: OSError, where: Path) -> str | None:
    """What a write error means, or None if it is not one. numpy's `tofile` (np.save)
    reports a short write without an errno: a full filesystem is then the cause."""
    if e.errno in WRITE_ERRNOS:
        return WRITE_ERRNOS[e.errno]
    if e.errno is None and "written" in str(e):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(where).free < 1 << 20:
                return WRITE_ERRNOS[errno.ENOSPC]
    return None


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
