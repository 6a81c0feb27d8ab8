"""download stage: the original gpt-oss checkpoint into data/original.

`model.source: synthetic` writes the synthetic checkpoint (`model.synthetic.weights:
trained`, the tiny default: the committed trained model, tierquant.source.trained; `random`:
tierquant.source.synthetic's generator); `hub` fetches the pinned
revision from the Hugging Face Hub. Either way the result is verified (index, shards,
headers, every tensor config.json implies) before it is moved into place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tierquant.core.files import atomic_output
from tierquant.core.gptoss import verify_original
from tierquant.errors import TierquantError
from tierquant.source.synthetic import SyntheticSpec

log = logging.getLogger(__name__)


def write_local_checkpoint(out_dir: Path, spec: SyntheticSpec) -> None:
    """The checkpoint `model.synthetic` describes, into the existing directory `out_dir`:
    the committed trained tiny model (`weights: trained`) or tierquant.source.synthetic's
    generator (`random`). Everything that makes the embedded model calls this."""
    if spec.weights == "trained":
        from tierquant.source.trained import write_trained_checkpoint

        write_trained_checkpoint(out_dir, spec)
    else:
        from tierquant.source.synthetic import write_synthetic_checkpoint

        write_synthetic_checkpoint(out_dir, spec)


def download(
    *,
    out: Path,
    source: str,
    name: str,
    synthetic: SyntheticSpec | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    allow_patterns: Sequence[str] = (),
) -> Path:
    """The download stage: produce `out` (the original checkpoint) from `source`
    ("synthetic": `synthetic`'s checkpoint; "hub": `repo_id`@`revision`'s files matching
    `allow_patterns`), verify it, and move it into place."""
    out = Path(out)
    with atomic_output(out) as tmp:
        if source == "synthetic":
            if synthetic is None:
                raise TierquantError(
                    "params: model.source is 'synthetic' but model.synthetic is null"
                )
            log.info("writing the %s gpt-oss %r", synthetic.weights, name)
            write_local_checkpoint(tmp, synthetic)
            what = name
        else:
            from tierquant.source.hub import download_snapshot

            if not repo_id or not revision:
                raise TierquantError("params: a hub model needs model.repo_id and model.revision")
            log.info("downloading %s@%s", repo_id, revision)
            sha = download_snapshot(repo_id, revision, list(allow_patterns), tmp)
            log.info("resolved %s@%s to commit %s", repo_id, revision, sha)
            what = f"{repo_id}@{sha}"
        try:
            ckpt = verify_original(tmp)
        except TierquantError as e:  # the paths it names are in the temporary, now removed
            raise TierquantError(f"{what} fails verification, not kept: {e}") from e
        count, size = len(ckpt.tensors), ckpt.nbytes
        ckpt.close()
    log.info("wrote %s: %d tensors, %.2f GB", out, count, size / 1e9)
    return out
