"""Batch-1 decoding: sdar_jax against the public release's own generate loop, with a profile.

  python bench/release_decode.py --release-generate PATH/generate.py [--out DIR]
      [--num-prompts 16] [--prompt-length 30] [--max-new-tokens 64] [--block-length 4]
      [--steps 4] [--threshold 0.9] [--layers 8] [--hidden 512] [--vocab 8192] [--repeats 3]
      [--layouts stored,per_layer,decoding] [--seed 0]

Needs the test requirements (torch, transformers) besides sdar_jax's own, and
the release's built-in inference script: `generate.py` of JetAstra/SDAR
(commit 1c06c39 added the last strategy; `git show 1c06c39:generate.py`).
Nothing of it is copied here: its `block_diffusion_generate` is loaded from
that path and run as it is, with two stand-ins it needs from outside the file:

  model     transformers' Qwen3ForCausalLM (SDAR's network, `sdpa` attention)
            behind the call the loop makes of the release's modeling_sdar.py:
            the [1, q, k] 0/1 block mask becomes an additive 4D mask, and
            `store_kv=False` drops the call's keys/values from the cache
            again (DynamicCache.crop), as modeling_sdar does by not storing them.
  greedy    the file's sampler divides by the temperature and has no greedy
            mode; for temperature 0 its module-level sampler is replaced by the
            argmax token with its probability under the unfiltered softmax
            (spec §3.6, what sdar_jax's greedy decoding does).

One random float32 Qwen3 checkpoint (default ~33M parameters: 8 layers,
hidden 512, vocab 8192, untied head) is written in Hugging Face format and
converted with sdar_jax's converter, so both sides decode the same weights.
Both decode the same `--num-prompts` random prompts one at a time (sdar_jax:
`generate_many` with one slot, what `launch/generate.py --batch-size 1`
runs), low_confidence_dynamic, greedy, no stop ids, and the tokens are
compared. Printed, from one run:

  tokens/s    generated tokens / decode seconds, compilation excluded (best of
              `--repeats` runs over all prompts)
  ms/forward  decode seconds / model forwards (the release: its denoising and
              cache-writing calls; sdar_jax: the loop's forwards, the
              2B-token forward that writes a finished block included)
  roofline    generated tokens / (forwards x weight bytes / read bandwidth):
              every forward reads every weight once except the embedding table
              (B rows of it); the bandwidth is measured here, the best of a
              NumPy and an XLA reduction over 1 GiB

and a profile of sdar_jax at batch 1: the loop's ms per forward against the
model forward jitted alone (B tokens, and the 2B-token forward that writes
the previous block), the matrix products of every weight alone (separate
buffers, B and 2B random rows), and the proposal step (softmax, argmax,
confidence over the vocabulary); the rest of the loop's time per forward is
the loop itself (cache writes, the commit, bookkeeping).
`--layouts` names the params' layouts sdar_jax decodes with: `stored` (the
layers as one scanned stack, kernels [in, out]), `per_layer` (per-layer
buffers, `transformer.unstack_layers`) and `decoding` (per-layer buffers and
the large kernels out-major, `transformer.out_major_kernels`: what generate
and evaluate decode with on CPU at batch 1). Writes
`release_decode.json` and `release_decode.md` to `--out`. Exits 1 if the
tokens differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.convert.from_hf import hf_to_jax
from sdar_jax.decode import sampling
from sdar_jax.decode.decoder import DecodeConfig, generate_many
from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.eval.report import markdown_table
from sdar_jax.model import transformer
from sdar_jax.model.layers import out_major_product
from sdar_jax.model.attention import MaskSpec

LAYOUTS = ("stored", "per_layer", "decoding")
PROFILE_REPEATS = 10


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_release_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release-generate", required=True,
                        help="the release's generate.py (JetAstra/SDAR)")
    parser.add_argument("--out", default="runs/release_decode")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", type=_names, default=list(LAYOUTS))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _best_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall seconds of `repeats` calls after one warm-up call (compilation)."""
    out = jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def read_bandwidth(repeats: int = 5) -> dict[str, float]:
    """Bytes/s of reading 1 GiB of float32, by NumPy and by an XLA reduction (best of each)."""
    host = np.ones(2**28, np.float32)
    numpy_s = min(_timed(host.sum) for _ in range(repeats))
    device = jnp.asarray(host)
    total = jax.jit(jnp.sum)
    xla_s, _ = _best_seconds(lambda: total(device), repeats)
    return {"numpy_gbps": host.nbytes / numpy_s / 1e9, "xla_gbps": host.nbytes / xla_s / 1e9}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- the checkpoint ----------------------------------------------------------------------------
def write_checkpoint(args: argparse.Namespace, out: str):
    """A random float32 Qwen3 checkpoint in HF format and its sdar_jax conversion.
    Returns (torch model, hf_dir, sdar_jax ckpt dir)."""
    import torch
    import transformers

    heads = args.hidden // 64
    config = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), head_dim=64,
        intermediate_size=3 * args.hidden, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-6,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = transformers.Qwen3ForCausalLM(config).eval()
    hf_dir, ckpt = os.path.join(out, "hf"), os.path.join(out, "sdar_jax")
    model.save_pretrained(hf_dir, safe_serialization=True)
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    hf_config.update(mask_token_id=args.vocab - 1, block_size=args.block_length)
    with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    hf_to_jax(hf_dir, ckpt, "float32", overwrite=True)
    return model, hf_dir, ckpt


# ---- the release's loop ------------------------------------------------------------------------
def load_release(path: str, greedy: bool):
    """The release file as a module; with `greedy` its sampler takes the argmax."""
    import torch

    spec = importlib.util.spec_from_file_location("release_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if greedy:
        def argmax_sampler(logits, temperature=1.0, top_k=0, top_p=1.0):
            probs = torch.softmax(logits.float(), dim=-1)
            prob, token = probs.max(dim=-1)
            return token, prob
        module.sample_with_temperature_topk_topp = argmax_sampler
    return module


def release_model(model):
    """`model` with the call signature the release loop uses (see the module doc)."""
    import torch

    class ReleaseCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.forwards = 0

        @property
        def device(self):
            return self.inner.device

        def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache,
                    store_kv):
            additive = (1.0 - attention_mask[:, None].float()) * torch.finfo(torch.float32).min
            out = self.inner(input_ids=input_ids, attention_mask=additive, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache)
            if not store_kv:  # transformers 5 crops by a negative count of tokens to remove
                past_key_values.crop(-input_ids.shape[1])
            self.forwards += 1
            return out

    return ReleaseCall().eval()


def run_release(module, model, prompts: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    call = release_model(model)

    def decode_all():
        rows = []
        for prompt in prompts:
            with torch.inference_mode():
                x = module.block_diffusion_generate(
                    call, {"input_ids": torch.as_tensor(prompt[None], dtype=torch.long)},
                    mask_id=args.vocab - 1, gen_length=args.max_new_tokens,
                    block_length=args.block_length, denoising_steps=args.steps, temperature=1.0,
                    remasking_strategy="low_confidence_dynamic",
                    confidence_threshold=args.threshold, stopping_criteria_idx=None)
            rows.append(x[0, len(prompt): len(prompt) + args.max_new_tokens].numpy())
        return np.stack(rows)

    decode_all()  # warm-up
    best, tokens = float("inf"), None
    for _ in range(args.repeats):
        call.forwards = 0
        start = time.perf_counter()
        tokens = decode_all()
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "forwards": call.forwards, "tokens": tokens,
            "threads": torch.get_num_threads()}


# ---- sdar_jax ----------------------------------------------------------------------------------
def run_sdar_jax(config, params, prompts: np.ndarray, dc: DecodeConfig, repeats: int) -> dict[str, Any]:
    lengths = np.full((len(prompts),), prompts.shape[1], np.int32)
    keys = jax.random.key(0)
    seconds, out = _best_seconds(
        lambda: generate_many(params, config, prompts, lengths, keys, dc, num_slots=1), repeats)
    out = jax.device_get(out)
    return {"seconds": seconds, "forwards": int(out.batch_forwards),
            "tokens": np.asarray(out.tokens)[:, : dc.max_new_tokens],
            "committed": int(np.asarray(out.num_committed).sum()),
            "denoising_forwards": int(np.asarray(out.num_forwards).sum())}


def forward_ms(config, params, dc: DecodeConfig, canvas_len: int, position: int,
               repeats: int) -> dict[str, float]:
    """ms of the batch-1 model forward against the cache, jitted alone: B tokens, and the
    2B-token forward that also writes the previous block (head on its second half)."""
    b = dc.block_length
    cache = transformer.init_cache(config, 1, canvas_len)
    mask = MaskSpec("block_causal", b)

    def forward(n, head):
        tokens = jnp.full((1, n), config.mask_token_id, jnp.int32)
        positions = position - n + b + jnp.arange(n, dtype=jnp.int32)[None]
        fn = jax.jit(lambda p, c: transformer.apply(config, p, tokens, positions, mask=mask, cache=c,
                                                    logits_slice=head))
        return _best_seconds(lambda: fn(params, cache), repeats)[0] * 1e3

    return {"forward_B": forward(b, None), "forward_2B": forward(2 * b, (b, 2 * b))}


def projection_matrices(params: dict) -> list[jnp.ndarray]:
    """Every per-layer projection kernel (and the head) as a 2-D [in, out] matrix."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(transformer.unstack_layers(params))[0]:
        names = [getattr(k, "key", None) for k in path]
        if names[-1] == "kernel" and names[-2] in transformer.PROJECTION_AXES:
            num_in, _ = transformer.PROJECTION_AXES[names[-2]]
            out.append(leaf.reshape(int(np.prod(leaf.shape[:num_in])), -1))
    return out


def parts_ms(config, params, dc: DecodeConfig, repeats: int) -> dict[str, float]:
    """ms of what a forward is made of, each jitted alone: the products of B and of 2B
    random rows with every projection matrix, [in, out] (x @ w) and out-major
    (`layers.out_major_product`), and the proposal step over the vocabulary (softmax,
    argmax, confidence) for one block."""
    b = dc.block_length
    matrices = projection_matrices(params)
    transposed = [jnp.asarray(np.ascontiguousarray(np.asarray(w).T)) for w in matrices]
    draw = np.random.default_rng(0)
    in_major = jax.jit(lambda ws, xs: [x @ w for w, x in zip(ws, xs)])
    out_major = jax.jit(lambda ws, xs: [out_major_product(x, w, 1) for w, x in zip(ws, xs)])
    out = {}
    for n, suffix in ((b, "B"), (2 * b, "2B")):
        # Random rows passed in: products with constants would be folded away.
        rows = [jnp.asarray(draw.standard_normal((n, w.shape[0])), w.dtype) for w in matrices]
        out[f"matmuls_{suffix}"] = _best_seconds(lambda: in_major(matrices, rows), repeats)[0] * 1e3
        out[f"out_major_matmuls_{suffix}"] = _best_seconds(
            lambda: out_major(transposed, rows), repeats)[0] * 1e3
    logits = jax.random.normal(jax.random.key(1), (1, b, config.vocab_size), jnp.float32)
    propose = jax.jit(lambda x: sampling.propose(x, jax.random.key(2)[None], temperature=None,
                                                 top_k=0, top_p=None))
    out["propose"] = _best_seconds(lambda: propose(logits), repeats)[0] * 1e3
    return out


def weight_bytes_per_forward(params: dict, config) -> int:
    """Bytes of every weight a forward reads whole (all but the embedding table)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "embed_tokens" in jax.tree_util.keystr(path) and not config.tie_word_embeddings:
            continue
        total += leaf.size * leaf.dtype.itemsize
    return total


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for layout in args.layouts:
        if layout not in LAYOUTS:
            print(f"--layouts: {layout!r} is not one of {LAYOUTS}", file=sys.stderr)
            return 2
    if not os.path.isfile(args.release_generate):
        print(f"--release-generate {args.release_generate!r}: no such file", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    model, _, ckpt = write_checkpoint(args, args.out)
    config, params = load_params_checkpoint(ckpt, "float32")
    draw = np.random.default_rng(args.seed + 1)
    prompts = draw.integers(2, args.vocab - 1, (args.num_prompts, args.prompt_length)).astype(np.int32)
    dc = DecodeConfig(mode="diffusion", block_length=args.block_length, steps=args.steps,
                      strategy="low_confidence_dynamic", threshold=args.threshold, temperature=0.0,
                      max_new_tokens=args.max_new_tokens)
    generated = args.num_prompts * args.max_new_tokens

    bandwidth = read_bandwidth()
    gbps = max(bandwidth.values())
    nbytes = weight_bytes_per_forward(params, config)
    floor_ms = nbytes / (gbps * 1e9) * 1e3

    release = run_release(load_release(args.release_generate, greedy=True), model, prompts, args)
    rows = [{"decoder": "release generate.py (torch)", "seconds": release["seconds"],
             "forwards": release["forwards"], "mismatches": 0}]
    profiles = {}
    reference = release["tokens"]
    for layout in args.layouts:
        layout_params = {"stored": lambda: params,
                         "per_layer": lambda: transformer.unstack_layers(params),
                         "decoding": lambda: transformer.out_major_kernels(
                             transformer.unstack_layers(params), config)}[layout]()
        run = run_sdar_jax(config, layout_params, prompts, dc, args.repeats)
        rows.append({"decoder": f"sdar_jax, params {layout}", "seconds": run["seconds"],
                     "forwards": run["forwards"],
                     "mismatches": int((run["tokens"] != reference).sum()),
                     "row_tpf": run["committed"] / run["denoising_forwards"]})
        canvas_len = -(-(args.prompt_length + args.max_new_tokens) // args.block_length) * args.block_length
        profiles[layout] = forward_ms(config, layout_params, dc, canvas_len,
                                      canvas_len // 2 // args.block_length * args.block_length,
                                      PROFILE_REPEATS)
        profiles[layout]["loop_per_forward"] = rows[-1]["seconds"] / run["forwards"] * 1e3
    parts = parts_ms(config, params, dc, PROFILE_REPEATS)
    for row in rows:
        row["tokens_per_s"] = generated / row["seconds"]
        row["ms_per_forward"] = row["seconds"] / row["forwards"] * 1e3
        row["vs_release"] = rows[0]["seconds"] / row["seconds"]
        row["of_roofline"] = floor_ms / row["ms_per_forward"]

    result = {
        "model": {"params": int(config.num_params), "layers": args.layers, "hidden": args.hidden,
                  "vocab": args.vocab, "weight_bytes_per_forward": nbytes},
        "decode": {"prompts": args.num_prompts, "prompt_length": args.prompt_length,
                   "max_new_tokens": args.max_new_tokens, "block_length": args.block_length,
                   "steps": args.steps, "threshold": args.threshold, "generated_tokens": generated},
        "bandwidth_gbps": bandwidth, "roofline_ms_per_forward": floor_ms,
        "torch_threads": release["threads"], "jax": jax.__version__,
        "rows": rows, "forward_ms": profiles, "parts_ms": parts,
    }
    table = "\n".join(markdown_table(
        ["decoder", "tokens/s", "forwards", "ms/forward", "vs release", "of roofline", "token mismatches"],
        [[r["decoder"], f"{r['tokens_per_s']:.1f}", str(r["forwards"]), f"{r['ms_per_forward']:.2f}",
          f"{r['vs_release']:.2f}x", f"{100 * r['of_roofline']:.0f} %", str(r["mismatches"])]
         for r in rows]))
    profile_table = "\n".join(markdown_table(
        ["params", "decoding loop, per forward", "forward B alone", "forward 2B alone"],
        [[layout, f"{p['loop_per_forward']:.2f}", f"{p['forward_B']:.2f}", f"{p['forward_2B']:.2f}"]
         for layout, p in profiles.items()]))
    parts_line = (f"matrix products alone, [in, out]: {parts['matmuls_B']:.2f} (B rows), "
                  f"{parts['matmuls_2B']:.2f} (2B rows); out-major: {parts['out_major_matmuls_B']:.2f}, "
                  f"{parts['out_major_matmuls_2B']:.2f}; proposal over the vocabulary "
                  f"{parts['propose']:.2f}; the weights read once at the measured bandwidth "
                  f"{floor_ms:.2f}")
    text = (f"{config.num_params / 1e6:.1f}M params, {nbytes / 1e6:.1f} MB of weights per forward; "
            f"read bandwidth {bandwidth['numpy_gbps']:.1f} GB/s (NumPy), {bandwidth['xla_gbps']:.1f} "
            f"GB/s (XLA); {args.num_prompts} prompts x {args.max_new_tokens} tokens, "
            f"B={args.block_length}, {args.steps} steps, dynamic {args.threshold}, greedy\n\n"
            f"{table}\n\nsdar_jax at batch 1, ms:\n\n{profile_table}\n\n{parts_line}\n")
    with open(os.path.join(args.out, "release_decode.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=float)
    with open(os.path.join(args.out, "release_decode.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 1 if any(r["mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
