"""Typed schema of params.yaml, validation at load, and composition of conf/.

Hydra composes `conf/` into `params.yaml` (`dvc exp run` does so on every run;
`python -m tierquant.config --write` does so by hand). Stages read params.yaml and
validate it here, so an unknown key or a wrong type fails at once, naming the key.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import TierquantError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
PARAMS_PATH = REPO_ROOT / "params.yaml"


@dataclass
class SyntheticConfig:
    """Shape and seed of a synthetic gpt-oss checkpoint (see tierquant.synthetic)."""

    seed: int = 0
    num_hidden_layers: int = 6
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    hidden_size: int = 128
    intermediate_size: int = 128
    head_dim: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    sliding_window: int = 32
    vocab_size: int = 1024
    num_regular_tokens: int = 1000
    max_shard_bytes: int = 1_000_000
    fit_to_corpus: bool = True


@dataclass
class ModelConfig:
    """Which checkpoint the pipeline starts from."""

    name: str = "tiny"
    source: str = "synthetic"  # "synthetic" or "hub"
    repo_id: str | None = None
    revision: str | None = None
    license: str = "apache-2.0"
    allow_patterns: list[str] = field(default_factory=list)
    synthetic: SyntheticConfig | None = None


@dataclass
class PathsConfig:
    original: str = "data/original"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def validate(cfg: DictConfig | dict) -> Config:
    """Merge `cfg` onto the schema: unknown keys and wrong types raise, naming the key."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise TierquantError(
            f"params: invalid config{f' key {key!r}' if key else ''}: {_first_line(e)}. "
            "Check params.yaml / conf/ or your key=value override."
        ) from None
    _check_semantics(config)
    return config


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_semantics(config: Config) -> None:
    model = config.model
    if model.source == "synthetic":
        if model.synthetic is None:
            raise TierquantError("params: model.source is 'synthetic' but model.synthetic is null")
    elif model.source == "hub":
        if not model.repo_id or not model.revision:
            raise TierquantError(
                "params: model.source is 'hub': set model.repo_id and model.revision "
                "(a commit sha, tag or branch)"
            )
        if not model.allow_patterns:
            raise TierquantError("params: model.allow_patterns must not be empty for a hub model")
    else:
        raise TierquantError(
            f"params: model.source must be 'synthetic' or 'hub', got {model.source!r}"
        )


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra, as `dvc exp run` does, into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def params_text(params: dict[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tierquant.config",
        description="Compose conf/ into params.yaml (what `dvc exp run` does) or check it.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite params.yaml")
    mode.add_argument("--check", action="store_true", help="fail if params.yaml has drifted")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=wide")
    args = parser.parse_args(argv)
    params = compose(args.overrides)
    validate(params)
    text = params_text(params)
    if args.write:
        PARAMS_PATH.write_text(text)
        print(f"wrote {PARAMS_PATH.relative_to(REPO_ROOT)}")
        return 0
    current = PARAMS_PATH.read_text() if PARAMS_PATH.exists() else ""
    if OmegaConf.to_container(OmegaConf.create(current)) != params:
        print(
            "params.yaml differs from the composition of conf/: run "
            "`python -m tierquant.config --write`",
            file=sys.stderr,
        )
        return 1
    print("params.yaml matches conf/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
