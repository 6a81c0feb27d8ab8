"""download: write data/original (synthetic tiny model, or a pinned Hub snapshot)."""

from pathlib import Path

from tierquant.config import Config
from tierquant.source.download import download
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Produce paths.original from `model` (synthetic or a pinned Hub revision), verified."""
    model = config.model
    download(
        out=Path(config.paths.original),
        source=model.source,
        name=model.name,
        synthetic=model.synthetic,
        repo_id=model.repo_id,
        revision=model.revision,
        allow_patterns=list(model.allow_patterns),
    )


if __name__ == "__main__":
    stage_main(run)()
