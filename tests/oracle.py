"""The whole-model path: stock `mlx_lm.load` and one forward per batch of windows.

Not used by any stage (they stream, tierquant.quality.stream): it is the independent oracle the
tests compare the streamed forward with, and the peer bench/eval_stream.py times it
against. It holds the whole model and the full [T, vocab] logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tierquant.errors import TierquantError
from tierquant.quality.evaluate import LogitChunks
from tierquant.quality.stream import compute_dtype


def load_whole(model_dir: Path):
    """The model in `model_dir` via stock `mlx_lm.load`, cast as the stages compute."""
    import mlx.core as mx
    from mlx_lm import load

    if not (Path(model_dir) / "config.json").is_file():
        raise TierquantError(f"{model_dir}: not a model directory (no config.json)")
    model, _ = load(str(model_dir))
    if compute_dtype() == "float32":
        model.set_dtype(mx.float32)  # floating params only; packed weights stay as stored
    return model


def whole_logits(model: Any, tokens: np.ndarray, batch_size: int):
    """float32 logits of positions 0..L-2 of every window: mx [N*(L-1), vocab]."""
    import mlx.core as mx

    out = []
    for start in range(0, len(tokens), batch_size):
        logits = model(mx.array(tokens[start : start + batch_size]))[:, :-1, :]
        logits = logits.astype(mx.float32)
        mx.eval(logits)
        out.append(logits.reshape(-1, logits.shape[-1]))
    return mx.concatenate(out)


def whole_chunks(model: Any, tokens: np.ndarray, batch_size: int) -> LogitChunks:
    """The whole model's logits as one vocab slice (tierquant.quality.evaluate.LogitChunks)."""
    logits = whole_logits(model, tokens, batch_size)
    return lambda: iter([(0, logits)])
