"""A warm start of launch/generate.py compiles nothing: JAX's persistent cache holds
every program of the decoder, for the streaming and the `--output` paths alike
(their host hooks run between the loop's chunks, not inside the programs).

Two processes share one cache directory. The first streams one prompt and must
write the decoder's programs to the cache; the second decodes the same prompt
through a prompts file with `--output` and must report no cache miss (JAX logs
each one under `jax_explain_cache_misses`) and add no cache entry.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from sdar_jax.checkpoint.params import save_params_checkpoint
from sdar_jax.config import get_preset
from sdar_jax.data.tokenizer import load_char_tokenizer
from sdar_jax.model import transformer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECODER_PROGRAMS = ("jit__start", "jit__resume", "jit__results")
MISS = "PERSISTENT COMPILATION CACHE MISS"


def _generate(args, cache_dir):
    env = dict(os.environ, SDAR_JAX_COMPILATION_CACHE=str(cache_dir), JAX_EXPLAIN_CACHE_MISSES="1",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.join(REPO, "launch", "generate.py"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


@pytest.mark.slow
def test_second_process_compiles_nothing(tmp_path):
    tokenizer = load_char_tokenizer()
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, num_layers=1,
                        mask_token_id=tokenizer.mask_token_id, eos_token_id=1)
    ckpt = tmp_path / "ckpt"
    assets = os.path.join(REPO, "sdar_jax", "data", "assets", "char_tokenizer")
    save_params_checkpoint(ckpt, config, jax.device_get(
        transformer.init_params(config, jax.random.key(3))), aux_dir=assets)
    cache = tmp_path / "cache"
    knobs = ["--ckpt", str(ckpt), "--chat", "--block-length", "4", "--max-new-tokens", "8",
             "--stop-ids", ""]

    streamed, cold = _generate([*knobs, "--prompt", "12+34="], cache)
    entries = sorted(os.listdir(cache))
    for program in DECODER_PROGRAMS:
        assert f"{MISS} for '{program}'" in cold  # the check sees compilations
        # One program each: resuming the loop's state does not compile it again.
        assert sum(e.startswith(program + "-") for e in entries) == 1, (program, entries)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "12+34="}) + "\n")
    output = tmp_path / "out.jsonl"
    _, warm = _generate([*knobs, "--prompts-file", str(prompts), "--output", str(output)], cache)
    assert MISS not in warm, [line for line in warm.splitlines() if MISS in line]
    assert sorted(os.listdir(cache)) == entries
    assert streamed == json.loads(output.read_text())["completion"] + "\n"
