"""Run `dvc` with its own write of dvc.lock paused half-way: `python tests/dvcshim.py
repro ...`.

DVC writes dvc.lock in place (open "w+", then the YAML); a signal during that write cuts
the file. The write takes milliseconds, so a test cannot land a signal in it by timing
alone. With TIERQUANT_LOCK_STALL=N this shim makes DVC's N-th write of dvc.lock write
the first half of the text, flush it, write its pid to TIERQUANT_LOCK_MARKER and sleep
(60 s) before the rest: the test then signals dvc's process group while the file is
half written, as a Ctrl-C at that moment would. Without it, `dvc` runs unchanged.
Nothing here is imported by the library.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _install(stall_at: int, marker: Path) -> None:
    from dvc.utils.serialize import _yaml

    original = _yaml._dump
    writes = {"lock": 0}

    def dump(data, stream):  # type: ignore[no-untyped-def]
        if not str(getattr(stream, "name", "")).endswith("dvc.lock"):
            return original(data, stream)
        writes["lock"] += 1
        if writes["lock"] != stall_at:
            return original(data, stream)
        import io

        text = io.StringIO()
        original(data, text)
        value = text.getvalue()
        stream.write(value[: len(value) // 2])
        stream.flush()
        marker.write_text(str(os.getpid()))
        time.sleep(60)
        stream.write(value[len(value) // 2 :])
        return None

    _yaml._dump = dump


if __name__ == "__main__":
    stall = os.environ.get("TIERQUANT_LOCK_STALL")
    if stall:
        _install(int(stall), Path(os.environ["TIERQUANT_LOCK_MARKER"]))
    from dvc.cli import main

    sys.exit(main(sys.argv[1:]))
