"""The calibration set: token windows the `measure` stage computes damage on, disjoint
from the eval set, so the allocation is never fitted to the windows it is judged on.

`calibration:` reads text as `eval:` does (a local file, the bundled corpus, a Hub
dataset). When both read the same text (same source, path, dataset, revision, files and
column) the eval windows are taken out first: the calibration windows are cut from the
token runs between them, spread evenly over those runs, so no token position lies in
both sets. `calibration_windows` checks that and fails (naming `calibration.num_windows`
/ `window_length`) when the gaps cannot hold the windows asked for. With a different text
the two sets are disjoint by construction and the windows are spread as the eval's are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tierquant.errors import TierquantError
from tierquant.quality.evalset import (
    CalibrationSet,
    EvalSet,
    load_eval_text,
    make_windows,
    tokenize,
)
from tierquant.quality.windows import write_windows

log = logging.getLogger(__name__)

TEXT_FIELDS = ("source", "path", "repo_id", "revision", "files", "text_column")


def same_text(cal: CalibrationSet, ev: EvalSet) -> bool:
    """Whether the calibration and eval sets read the same text."""
    return all(getattr(cal, f) == getattr(ev, f) for f in TEXT_FIELDS)


def eval_starts(num_tokens: int, num_windows: int) -> list[int]:
    """First token of each eval window (evalset.make_windows' placement)."""
    stride = num_tokens // num_windows
    return [i * stride for i in range(num_windows)]


def free_runs(num_tokens: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The [start, stop) runs of token positions in [0, num_tokens) not in `taken`."""
    runs, pos = [], 0
    for start, stop in sorted(taken):
        if start > pos:
            runs.append((pos, start))
        pos = max(pos, stop)
    if pos < num_tokens:
        runs.append((pos, num_tokens))
    return runs


def windows_in_runs(runs: list[tuple[int, int]], num_windows: int, length: int) -> list[int]:
    """Starts of `num_windows` non-overlapping windows of `length` inside `runs`, spread
    evenly over every slot the runs hold (slot j of a run starts at start + j*length)."""
    slots = [s + j * length for s, e in runs for j in range((e - s) // length)]
    if len(slots) < num_windows:
        raise TierquantError(
            f"calibration: the text between the eval windows holds {len(slots)} windows of "
            f"{length} tokens, fewer than calibration.num_windows = {num_windows}; use fewer "
            "or shorter windows (calibration.num_windows / window_length), a longer text, "
            "or another text (calibration.path / calibration.files)"
        )
    return [slots[(k * len(slots)) // num_windows] for k in range(num_windows)]


def calibration_token_windows(
    tokens: list[int] | np.ndarray, cal: CalibrationSet, ev: EvalSet | None
) -> np.ndarray:
    """int32 [N, L] calibration windows of `tokens`; `ev` given: the eval set reads the same
    tokens, and every eval window's positions are left out."""
    ids = np.asarray(tokens, dtype=np.int32)
    if ev is None:
        return make_windows(ids, cal.num_windows, cal.window_length)
    need = ev.num_windows * ev.window_length
    if len(ids) < need:  # the eval set itself cannot be built: its own error says so
        make_windows(ids, ev.num_windows, ev.window_length)
    taken = [(s, s + ev.window_length) for s in eval_starts(len(ids), ev.num_windows)]
    starts = windows_in_runs(free_runs(len(ids), taken), cal.num_windows, cal.window_length)
    check_disjoint(starts, cal.window_length, taken)
    return np.stack([ids[s : s + cal.window_length] for s in starts])


def check_disjoint(starts: list[int], length: int, taken: list[tuple[int, int]]) -> None:
    """No calibration window shares a token position with a taken (eval) window."""
    for s in starts:
        for a, b in taken:
            if s < b and a < s + length:
                raise TierquantError(  # pragma: no cover - windows_in_runs guarantees it
                    f"calibration window at token {s} overlaps the eval window [{a}, {b})"
                )


def calibration_windows(cal: CalibrationSet, ev: EvalSet, model_dir: Path) -> np.ndarray:
    """The calibration set of `cal`, tokenized with the tokenizer in `model_dir`, disjoint
    from the eval set `ev` (see the module docstring)."""
    tokens = tokenize(load_eval_text(cal), model_dir)  # type: ignore[arg-type]
    return calibration_token_windows(tokens, cal, ev if same_text(cal, ev) else None)


def write_calibration_windows(
    *, calibration: CalibrationSet, eval_set: EvalSet, original: Path, out: Path
) -> np.ndarray:
    """The calibration stage: the calibration windows (`calibration_windows`) written to
    `out` (tierquant.quality.windows). measure reads them from there, so a change of the
    eval set that leaves these windows as they were (calibration on another text, or
    the same windows) changes no byte measure depends on."""
    tokens = calibration_windows(calibration, eval_set, Path(original))
    write_windows(Path(out), tokens)
    log.info("wrote %s: %d calibration windows × %d tokens", out, *tokens.shape)
    return tokens
