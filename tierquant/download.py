"""download stage: the original gpt-oss checkpoint into data/original.

`model.source: synthetic` writes the synthetic checkpoint; `hub` fetches the pinned
revision from the Hugging Face Hub. Either way the result is verified (index, shards,
headers, every tensor config.json implies) before it is moved into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .checkpoint import atomic_output
from .config import Config
from .errors import TierquantError
from .gptoss import verify_original

log = logging.getLogger(__name__)


def download(config: Config) -> Path:
    """Produce `paths.original` from `model`, verify it, and move it into place."""
    out = Path(config.paths.original)
    model = config.model
    with atomic_output(out) as tmp:
        if model.source == "synthetic":
            from .synthetic import write_synthetic_checkpoint

            assert model.synthetic is not None
            log.info("synthesizing gpt-oss %r (seed %d)", model.name, model.synthetic.seed)
            write_synthetic_checkpoint(tmp, model.synthetic)
        else:
            from .hub import download_snapshot

            assert model.repo_id and model.revision
            log.info("downloading %s@%s", model.repo_id, model.revision)
            sha = download_snapshot(model.repo_id, model.revision, list(model.allow_patterns), tmp)
            log.info("resolved %s@%s to commit %s", model.repo_id, model.revision, sha)
        try:
            ckpt = verify_original(tmp)
        except TierquantError as e:  # the paths it names are in the temporary, now removed
            source = f"{model.repo_id}@{sha}" if model.source != "synthetic" else model.name
            raise TierquantError(f"{source} fails verification, not kept: {e}") from e
        count, size = len(ckpt.tensors), sum(t.nbytes for t in ckpt.tensors.values())
        ckpt.close()
    log.info("wrote %s: %d tensors, %.2f GB", out, count, size / 1e9)
    return out
