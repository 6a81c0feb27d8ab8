"""The shared entry point of every stage script: Hydra in, typed config, clean errors.

A stage script is `stage_main(library_function)`. Hydra reads params.yaml (never
conf/, so `dvc exp run -S` overrides apply) with quiet settings: no outputs/ folder,
no log file, logs on stdout. `key=value` overrides work when run by hand. Expected
failures (TierquantError, an unknown key, a wrong type) print one `error:` line per
problem, once (on stderr, not also in the log), and exit non-zero without a traceback;
so does an OSError (a full disk, a permission, an I/O error: the machine's fault, not
the code's), naming its file and errno.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from tierquant import IMPORTED_AT
from tierquant.config import project_root, validate
from tierquant.errors import TierquantError

QUIET_HYDRA = (
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=stdout",
    "hydra/hydra_logging=none",
)

log = logging.getLogger("tierquant")

# mlx-lm imports transformers, whose import logs "PyTorch was not found. Models won't be
# available ..." through `logger.warning_advice` (transformers/__init__.py): advice, not a
# problem (MLX is the backend here). TRANSFORMERS_NO_ADVISORY_WARNINGS silences exactly
# that kind of message, nothing else. Set before any stage imports mlx-lm (all its imports
# are inside functions), and only if the caller has not chosen.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def stage_main(
    run: Callable[..., object], stage_args: tuple[str, ...] = (), positional: str = ""
) -> Callable[[], None]:
    """Wrap `run(config, **stage_args)` as a Hydra command line reading params.yaml.

    `stage_args` are per-stage arguments that are not params (e.g. the `tier=experts`
    that dvc.yaml's foreach gives each quantize stage): taken off the command line
    before Hydra sees it, and required. `positional` is what the usage line shows for a
    positional argument the script takes off itself (benchmark's `{model|original}`).
    """

    def main() -> None:
        import hydra
        from omegaconf import DictConfig

        if any(a in ("-h", "--help") for a in sys.argv[1:]):
            _print_help(run, stage_args, positional)
            return
        kwargs: dict[str, str] = {}
        for name in stage_args:
            found = [a for a in sys.argv[1:] if a.startswith(f"{name}=")]
            if not found:
                print(f"error: {sys.argv[0]} needs {name}=<value>", file=sys.stderr)
                sys.exit(2)
            kwargs[name] = found[-1].split("=", 1)[1]
            sys.argv[1:] = [a for a in sys.argv[1:] if a not in found]
        given = {arg.split("=", 1)[0] for arg in sys.argv[1:]}
        sys.argv[1:1] = [o for o in QUIET_HYDRA if o.split("=", 1)[0] not in given]

        # params.yaml of the checkout the stage script belongs to (not of the checkout
        # the package was installed from).
        root = project_root(Path(sys.argv[0]).resolve().parent)

        @hydra.main(config_path=str(root), config_name="params", version_base=None)
        def _hydra_main(cfg: DictConfig) -> None:
            logging.getLogger().setLevel(logging.INFO)
            try:
                config = validate(cfg)
                run(config, **kwargs)
                # bench/pipeline.py sums these to tell stage time from DVC's own time;
                # counted from the first import of tierquant, so imports are the stage's.
                log.info(
                    "stage %s finished in %.2f s, peak RSS %.0f MB",
                    _stage_label(kwargs),
                    time.perf_counter() - IMPORTED_AT,
                    _peak_rss_mb(),
                )
            except TierquantError as e:
                fail(str(e))
            except OSError as e:  # the machine, not the code: full disk, permissions, I/O
                fail(os_error_message(e))

        _hydra_main()

    main.__doc__ = run.__doc__
    return main


def fail(message: str) -> NoReturn:
    """Print each problem of `message` once, as an `error:` line on stderr, and exit 1.

    Only stderr: the log (stdout) does not repeat it, so each problem shows once.
    """
    for line in message.splitlines() or [message]:
        if line.strip():
            print(f"error: {line.strip()}", file=sys.stderr)
    sys.exit(1)


def _print_help(
    run: Callable[..., object], stage_args: tuple[str, ...], positional: str = ""
) -> None:
    """What the stage does and how to call it (Hydra's own --help lists only its groups)."""
    import __main__

    script = Path(sys.argv[0]).name
    args = f" {positional}" if positional else ""
    args += "".join(f" {name}=<{name}>" for name in stage_args)
    print(f"usage: tierquant {Path(script).stem}{args} [key=value ...]")
    print(f"   or: python stages/{script}{args} [key=value ...]\n")
    for doc in (getattr(__main__, "__doc__", None), run.__doc__):
        if doc:
            print(doc.strip() + "\n")
    print(
        "Reads params.yaml (the composition of conf/; `python -m tierquant.config --write\n"
        "model=...` recomposes it) and takes key=value overrides of it, e.g.\n"
        "paths.original=/tmp/orig. Unknown keys and wrong types are refused, naming the\n"
        "key. `--cfg job` prints the resolved params; `--hydra-help` is Hydra's own help."
    )


def _peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _stage_label(kwargs: dict[str, str]) -> str:
    """`quantize@experts`, `benchmark@model`: the DVC stage name, from the command line."""
    positional = [a for a in sys.argv[1:] if "=" not in a and not a.startswith("-")]
    return "@".join([Path(sys.argv[0]).stem, *kwargs.values(), *positional])


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file(s) it names, what went wrong, the errno name."""
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    code = f" [{errno.errorcode[e.errno]}]" if e.errno in errno.errorcode else ""
    return f"{where}: {what}{code}" if where else f"{what}{code}"
