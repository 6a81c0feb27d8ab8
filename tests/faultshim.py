"""Run a stage script with a fault injected: `python tests/faultshim.py stages/x.py ...`.

The fault-injection suite (tests/test_faults.py) puts a `python` first on PATH that runs
this file, so `dvc repro` runs the unmodified stage commands of dvc.yaml through it and
dvc.lock stays exactly what a plain run writes. Nothing here is imported by the library:
the faults are monkeypatches, applied only to the stage named by TIERQUANT_FAULT_STAGE
(`convert`, `quantize tier=experts`: the script's stem and its arguments). Any other
command (`python -c`, other stages) runs unchanged.

TIERQUANT_FAULT_MODE (a stall first writes the stage's pid to TIERQUANT_FAULT_MARKER):
- `stall-write`: after the 2nd `ShardedWriter.write`, sleep TIERQUANT_FAULT_SECONDS: a
  shard is half written when the test kills the stage.
- `stall-commit`: sleep TIERQUANT_FAULT_SECONDS just before `atomic_output` renames a
  `.<name>.tmp` into place (the temporary complete, the previous output removed).
- `enospc`: the 2nd `ShardedWriter.write`, and any write of a `Path` under a `.*.tmp`
  temporary, raise OSError(ENOSPC) (a full disk where no small filesystem can be mounted).
"""

from __future__ import annotations

import errno
import os
import runpy
import sys
import time
from pathlib import Path


def _matches(argv: list[str]) -> bool:
    want = os.environ.get("TIERQUANT_FAULT_STAGE", "").split()
    if not want or not argv or not argv[0].endswith(".py"):
        return False
    got = [Path(argv[0]).stem, *argv[1:]]
    return got[: len(want)] == want


def _stall(seconds: float) -> None:
    """Say so (TIERQUANT_FAULT_MARKER gets this process's pid), then sleep `seconds` or
    until the file TIERQUANT_FAULT_RELEASE exists."""
    marker = os.environ.get("TIERQUANT_FAULT_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    release = os.environ.get("TIERQUANT_FAULT_RELEASE")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (release and Path(release).exists()):
        time.sleep(0.05)


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _install(mode: str, seconds: float) -> None:
    import pathlib

    from tierquant.core import checkpoint

    calls = {"write": 0}
    original_write = checkpoint.ShardedWriter.write

    def write(self, name, data):  # type: ignore[no-untyped-def]
        calls["write"] += 1
        if mode == "enospc" and calls["write"] == 2:
            raise _no_space()
        original_write(self, name, data)
        if mode == "stall-write" and calls["write"] == 2:
            for f in self._files:
                f.flush()  # the bytes are in the file, as a real stage's would be
            _stall(seconds)

    checkpoint.ShardedWriter.write = write

    if mode == "stall-commit":
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            name = Path(src).name
            if name.startswith(".") and name.endswith(".tmp"):
                _stall(seconds)
            return original_replace(src, dst, *args, **kwargs)

        os.replace = replace

    if mode == "enospc":
        original_write_bytes = pathlib.Path.write_bytes
        original_write_text = pathlib.Path.write_text

        def in_tmp(path: Path) -> bool:
            return any(p.startswith(".") and p.endswith(".tmp") for p in Path(path).parts)

        def write_bytes(self, data):  # type: ignore[no-untyped-def]
            if in_tmp(self):
                raise _no_space()
            return original_write_bytes(self, data)

        def write_text(self, data, *args, **kwargs):  # type: ignore[no-untyped-def]
            if in_tmp(self):
                raise _no_space()
            return original_write_text(self, data, *args, **kwargs)

        pathlib.Path.write_bytes = write_bytes
        pathlib.Path.write_text = write_text


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):  # `python -c ...`, `python -m ...`
        os.execv(sys.executable, [sys.executable, *argv])
    if _matches(argv):
        mode = os.environ.get("TIERQUANT_FAULT_MODE", "stall-write")
        _install(mode, float(os.environ.get("TIERQUANT_FAULT_SECONDS", "120")))
    sys.argv = argv
    sys.path[0] = str(Path(argv[0]).resolve().parent)  # as `python script.py` sets it
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
