"""What a release is tied to: the Hub repository it goes to (`default_repo_id`), the
card's file name, and the digests of what the card describes (`made_from`), written by
the card stage and checked again by publish."""

from __future__ import annotations

from pathlib import Path

from tierquant.report.provenance import file_sha256, model_digest

CARD_NAME = "README.md"


def default_repo_id(
    repo_id: str | None, namespace: str | None, model_name: str, recipe_name: str
) -> str:
    """`publish.repo_id`, or `<namespace>/<model>-tierquant-<recipe>`; without a namespace
    the bare `<model>-tierquant-<recipe>` (fine for a dry run and the card; a push
    refuses it and says to set publish.namespace)."""
    if repo_id:
        return repo_id
    name = f"{model_name}-tierquant-{recipe_name}"
    return f"{namespace}/{name}" if namespace else name


def made_from(
    model_dir: Path, validate_path: Path, hashes: dict[str, str] | None = None
) -> dict[str, str | None]:
    """The digests of what the card describes (data/model's files, validate.json's bytes):
    recorded in the card's metadata, so publish refuses a card that no longer matches.
    `hashes`: the model files' sha256 by relative path, where already computed."""
    return {
        "model_sha256": model_digest(model_dir, hashes),
        "validate_sha256": file_sha256(validate_path),
    }
