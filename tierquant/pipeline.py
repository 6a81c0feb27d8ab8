"""The pipeline in-process, for tests and bench/: the stage scripts' own `run(config)`
functions (stages/<name>.py), called in order with one typed config, so the sequence of
library calls a stage makes is written once, in stages/.

`paths_under(config, root, ...)` points every output of `config` into `root`;
`run_stages(config, ["plan", "quantize", "assemble"])` then builds a model there
(`quantize` runs every tier of `tiers`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

from tierquant.config import Config, PathsConfig, project_root

FILES = {  # paths.* that are files, not folders: they keep their name under the root
    f.name: Path(f.default).name
    for f in dataclasses.fields(PathsConfig)
    if Path(str(f.default)).suffix
}


def paths_under(config: Config, root: Path, **keep: Path) -> Config:
    """`config` with every `paths.*` under `root` (same leaf names), except the ones
    given in `keep` (e.g. `original=...` to reuse a checkpoint)."""
    root = Path(root)
    paths = {
        f.name: str(keep[f.name]) if f.name in keep else str(root / FILES.get(f.name, f.name))
        for f in dataclasses.fields(PathsConfig)
    }
    return dataclasses.replace(config, paths=PathsConfig(**paths))


@cache
def _stage_module(name: str) -> ModuleType:
    path = project_root() / "stages" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tierquant_stage_{name}", path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_run(name: str) -> Callable[..., object]:
    """stages/<name>.py's `run(config, ...)`."""
    return _stage_module(name).run


def run_stages(config: Config, names: Sequence[str]) -> None:
    """Run the named stages in order, in-process; `quantize` runs every tier (by
    stages/quantize_gptq.py when quant.rounding is gptq) and `benchmark` both variants,
    as dvc.yaml's foreach does."""
    for name in names:
        if name == "quantize":
            script = "quantize_gptq" if config.quant.rounding == "gptq" else name
            for tier in config.tiers:
                stage_run(script)(config, tier=tier)
        elif name == "benchmark":
            for variant in ("original", "model"):
                stage_run(name)(config, variant=variant)
        else:
            stage_run(name)(config)
