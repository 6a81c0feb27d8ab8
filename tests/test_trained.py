"""The committed trained tiny model (tierquant/assets/tiny) as the download stage writes
it: the openai/gpt-oss layout, the same bytes every time, and stock mlx-lm's logits equal
the ones recorded when it was exported (no torch needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_spec
from tierquant.core.checkpoint import Checkpoint
from tierquant.core.gptoss import hf_tensor_specs, verify_original
from tierquant.errors import TierquantError
from tierquant.quality.evalset import load_corpus
from tierquant.source.synthetic import config_json, shape_of
from tierquant.source.trained import TOKENIZER_FILES, asset_dir, write_trained_checkpoint


@pytest.fixture(scope="module")
def trained_original(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "original"
    out.mkdir()
    write_trained_checkpoint(out, tiny_spec())
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_default_is_the_trained_model():
    assert tiny_spec().weights == "trained"


def test_layout_is_the_original_checkpoints(trained_original):
    spec = tiny_spec()
    ckpt = verify_original(trained_original)
    want = {s.name: s for s in hf_tensor_specs(shape_of(spec))}
    assert {n: ckpt.info(n).spec for n in ckpt.tensors} == want
    ckpt.close()
    names = sorted(p.name for p in trained_original.glob("*.safetensors"))
    assert names[0] == "model-00000-of-00003.safetensors" and len(names) == 4
    config = json.loads((trained_original / "config.json").read_text())
    assert config == config_json(spec)
    for name in TOKENIZER_FILES:
        assert (trained_original / name).read_bytes() == (asset_dir() / name).read_bytes()


def test_experts_are_mxfp4_and_the_rest_bf16(trained_original):
    with Checkpoint(trained_original) as ckpt:
        for name, info in ckpt.tensors.items():
            packed = name.endswith("_blocks") or name.endswith("_scales")
            assert info.dtype == ("U8" if packed else "BF16"), name
        scales = ckpt.read("model.layers.0.mlp.experts.down_proj_scales")
        assert len(np.unique(scales)) > 1 and scales.max() <= 252  # trained; exact in bf16


def test_same_bytes_every_time(trained_original, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    write_trained_checkpoint(again, tiny_spec())
    assert _digest(again) == _digest(trained_original)


def test_other_shape_is_refused_with_the_key(tmp_path):
    with pytest.raises(TierquantError, match="model.synthetic.hidden_size is 256.*weights: random"):
        write_trained_checkpoint(tmp_path, tiny_spec(hidden_size=256))


def test_stock_mlx_lm_logits_equal_the_recorded_ones(trained_original):
    """The logits recorded at export time (the trainer's torch forward on the exported
    bytes) are what stock mlx-lm computes from data/original, within float32 rounding."""
    import mlx.core as mx
    from mlx_lm import load

    record = json.loads((asset_dir() / "training.json").read_text())
    want = np.load(asset_dir() / "reference_logits.npy")
    model, _ = load(str(trained_original))
    model.set_dtype(mx.float32)  # the CPU has no bf16 gather_mm; the record is float32
    got = np.array(model(mx.array([record["reference_tokens"]]))[0])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_heldout_texts_are_not_in_each_other():
    """The held-out technical text shares no word 8-gram with the eval text."""
    from importlib import resources

    technical = resources.files("tierquant").joinpath("assets/heldout_technical.txt")

    def grams(text: str) -> set[tuple[str, ...]]:
        import re

        words = re.findall(r"[a-z0-9]+", text.lower())
        return {tuple(words[i : i + 8]) for i in range(len(words) - 7)}

    assert not grams(technical.read_text(encoding="utf-8")) & grams(load_corpus())
