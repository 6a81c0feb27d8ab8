"""The shared entry point of every stage script: Hydra in, typed config, clean errors.

A stage script is `stage_main(library_function)`. Hydra reads params.yaml (never
conf/, so `dvc exp run -S` overrides apply) with quiet settings: no outputs/ folder,
no log file, logs on stdout. `key=value` overrides work when run by hand. Expected
failures (TierquantError, an unknown key, a wrong type) print one clear line and exit
non-zero without a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .config import REPO_ROOT, Config, validate
from .errors import TierquantError

QUIET_HYDRA = (
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=stdout",
    "hydra/hydra_logging=none",
)

log = logging.getLogger("tierquant")


def stage_main(run: Callable[[Config], object]) -> Callable[[], None]:
    """Wrap `run(config)` as a Hydra command line reading params.yaml."""

    def main() -> None:
        import hydra
        from omegaconf import DictConfig

        given = {arg.split("=", 1)[0] for arg in sys.argv[1:]}
        sys.argv[1:1] = [o for o in QUIET_HYDRA if o.split("=", 1)[0] not in given]

        @hydra.main(config_path=str(REPO_ROOT), config_name="params", version_base=None)
        def _hydra_main(cfg: DictConfig) -> None:
            logging.getLogger().setLevel(logging.INFO)
            try:
                config = validate(cfg)
                run(config)
            except TierquantError as e:
                log.error("%s", e)
                print(f"error: {e}", file=sys.stderr)
                sys.exit(1)

        _hydra_main()

    main.__doc__ = run.__doc__
    return main
