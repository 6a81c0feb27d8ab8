"""The calibration windows file (data/calibration.npy): int32 [N, L] token ids, written
by the calibration stage, read by measure (so measure depends on the windows, not on
the texts and params that placed them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tierquant.core.files import atomic_output
from tierquant.errors import TierquantError


def write_windows(path: Path, tokens: np.ndarray) -> None:
    """`tokens` [N, L] as an int32 .npy file at `path`, atomically (same array, same bytes)."""
    with atomic_output(Path(path), is_dir=False) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(tokens, dtype=np.int32), allow_pickle=False)


def read_windows(path: Path) -> np.ndarray:
    """The windows `write_windows` wrote, checked."""
    path = Path(path)
    if not path.is_file():
        raise TierquantError(f"{path}: missing; run the calibration stage (`dvc repro`)")
    try:
        tokens = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TierquantError(f"{path}: unreadable ({e}); rerun the calibration stage") from e
    if tokens.dtype != np.int32 or tokens.ndim != 2 or 0 in tokens.shape:
        raise TierquantError(f"{path}: not a token window array; rerun the calibration stage")
    return tokens
