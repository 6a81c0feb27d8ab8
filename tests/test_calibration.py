"""The calibration set never shares a token position with the eval set."""

from __future__ import annotations

import numpy as np
import pytest

from tierquant.config import CalibrationSet, EvalSet, compose, validate
from tierquant.errors import TierquantError
from tierquant.quality import calibration


def _positions(tokens_len: int, starts: list[int], length: int) -> set[int]:
    return {p for s in starts for p in range(s, s + length)}


@pytest.mark.parametrize("n_tokens", [2048 + 1, 5000, 11_533])
def test_windows_between_eval_windows_are_disjoint(n_tokens):
    ev, cal = EvalSet(num_windows=16, window_length=128), CalibrationSet()
    taken = [(s, s + 128) for s in calibration.eval_starts(n_tokens, 16)]
    runs = calibration.free_runs(n_tokens, taken)
    try:
        starts = calibration.windows_in_runs(runs, cal.num_windows, cal.window_length)
    except TierquantError as e:
        assert "calibration.num_windows" in str(e)
        return
    eval_pos = _positions(n_tokens, [a for a, _ in taken], ev.window_length)
    cal_pos = _positions(n_tokens, starts, cal.window_length)
    assert len(cal_pos) == cal.num_windows * cal.window_length  # no two overlap either
    assert not eval_pos & cal_pos
    assert max(cal_pos) < n_tokens


def test_default_calibration_is_disjoint_from_default_eval_on_the_bundled_corpus(tiny_original):
    from tierquant.quality.evalset import eval_windows, load_eval_text, tokenize

    config = validate(compose())
    assert calibration.same_text(config.calibration, config.eval)
    tokens = np.asarray(tokenize(load_eval_text(config.eval), tiny_original))
    ev = eval_windows(config.eval, tiny_original)
    cal = calibration.calibration_windows(config.calibration, config.eval, tiny_original)
    assert cal.shape == (config.calibration.num_windows, config.calibration.window_length)

    def where(windows):  # token positions of each window in the text (exact match)
        out = set()
        for w in windows:
            hits = [
                s
                for s in range(len(tokens) - len(w) + 1)
                if tokens[s] == w[0] and np.array_equal(tokens[s : s + len(w)], w)
            ]
            assert hits, "a window is not a run of the text's tokens"
            out |= {p for s in hits[:1] for p in range(s, s + len(w))}
        return out

    eval_pos = {p for s in calibration.eval_starts(len(tokens), 16) for p in range(s, s + 128)}
    assert where(ev) == eval_pos
    assert not where(cal) & eval_pos
    again = calibration.calibration_windows(config.calibration, config.eval, tiny_original)
    assert np.array_equal(cal, again)


def test_too_many_calibration_windows_names_the_key(tiny_original):
    cal = CalibrationSet(num_windows=200, window_length=128)
    with pytest.raises(TierquantError, match="calibration.num_windows"):
        calibration.calibration_windows(cal, EvalSet(), tiny_original)


def test_other_text_is_not_carved(tmp_path, tiny_original):
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cal = CalibrationSet(path=str(text), num_windows=4, window_length=32)
    assert not calibration.same_text(cal, EvalSet())
    out = calibration.calibration_windows(cal, EvalSet(), tiny_original)
    assert out.shape == (4, 32)


def test_bad_calibration_config_names_the_key():
    with pytest.raises(TierquantError, match="calibration.window_length"):
        validate(compose(["calibration.window_length=1"]))
    with pytest.raises(TierquantError, match="calibration.source"):
        validate(compose(["calibration.source=web"]))
