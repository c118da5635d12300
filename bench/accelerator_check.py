"""Accelerator validation kit: proves the Pallas kernels on one GPU and measures speed, in one run.

  python bench/accelerator_check.py --out DIR            # one H100/H200 class GPU, <= 8 min wall
  python bench/accelerator_check.py --out DIR --smoke    # CPU, interpret mode, tiny shapes (< 1 min)

Writes DIR/accelerator_check.json and DIR/accelerator_check.md (rewritten after
every section, so a run cut short keeps what it measured). Sections, run in
the order correctness, attention, train_step, decode, tiles, each with a time
budget (a unit of work that would start past its section's deadline is
recorded as skipped, never silently dropped):

  environment  device, driver, Python, jax/jaxlib/flax/optax versions, commit.
  correctness  the block-diffusion training kernel (forward + dQ/dK/dV) and the
               decode kernel, compiled for the device, against the XLA
               reference at SDAR-1.7B head shapes (16 query / 8 kv heads of 128)
               for B = 4, 8, 16 in float32 and bfloat16; training rows are packed
               (3 examples per row). Error = max |kernel - reference| / max(1,
               max |reference|), reference in float32 at full matmul precision on
               the same (rounded) inputs. Tolerances (TOLERANCES below): float32
               1e-4 (both sides at "highest" matmul precision, so Triton's dots
               are IEEE, not TF32); bfloat16 2e-2 for outputs and 5e-2 for
               gradients (bf16 tiles, float32 accumulation, p rounded to bf16
               before P V: a few bf16 ulps of the result scale).
  attention    training attention fwd+bwd at L = 4k, 2k, 8k (the [xt; x0] row is
               2L), side by side on the same inputs: Pallas, the XLA dense-mask
               reference, jax.nn.dot_product_attention with the dense mask (XLA,
               and cuDNN where it accepts the mask), and cuDNN causal over the
               same row length (a standard flash kernel's speed, not the same
               mask). Ratios are against the XLA dense-mask row.
  tiles        a fixed grid of Triton tile sizes for the training kernel at 4k
               (fwd+bwd) and of the decode kernel's cache tile; reports the best.
  train_step   a full SDAR-1.7B-shaped train step (random weights, bf16 compute,
               float32 master weights, AdamW, Pallas attention), MFU counting
               useful FLOPs only (`sdar_jax.perf`).
  decode       SDAR-4B-shaped random-weight block-diffusion decoding (bf16) at
               batch 1 and 128, B = 4 with the static strategy at 4 steps (TPF is
               exactly 1, comparable across runs), tokens/s, and batch 1 against
               the weight-bandwidth roofline (one read of the weights per forward).

Compilations go to JAX's persistent cache (`--compilation-cache DIR|off`, as
the decoding CLIs), so a rerun on the same machine skips them.

Targets (judged only on an accelerator): attention at 4k >= 1.6x XLA dense;
MFU >= 45 %; batch-128 decoding >= 10,000 tokens/s; batch-1 decoding >= 70 % of
the roofline. Exit status 1 when a correctness check fails, 2 on bad flags.

Runs on the JAX an accelerator image already has (jax 0.11.x with its CUDA
plugin, flax, optax). Beyond such an image it needs only ml-collections
(sdar_jax.train imports it; pure Python, needs PyYAML and absl-py, which the
image has). It does not import grain, tensorboardX, gguf, tqdm, orbax, torch
or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax import perf
from sdar_jax.config import get_preset
from sdar_jax.decode import cli as decode_cli
from sdar_jax.ops import attention, kernel_check, masks, pallas_decode, pallas_gpu
from sdar_jax.ops.xla_attention import xla_attention

TOLERANCES = {
    "float32": {"out": 1e-4, "dq": 1e-4, "dk": 1e-4, "dv": 1e-4},
    "bfloat16": {"out": 2e-2, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2},
}
TARGETS = {"attention_4k_vs_xla": 1.6, "train_mfu": 0.45, "decode_b128_tokens_per_s": 10_000.0,
           "decode_b1_roofline_fraction": 0.70}
# (block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages); the first is the default.
TILE_GRID = (
    (128, 64, 64, 64, None, 2),
    (128, 128, 64, 64, 8, 2),
    (64, 64, 64, 64, 4, 2),
    (128, 64, 128, 64, 8, 2),
    (128, 64, 64, 128, 8, 2),
    (64, 128, 64, 64, 4, 3),
)
DECODE_TILE_GRID = (32, 64, 128)  # decode cache tile (block_k); 64 is the default


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and budgets of one run mode."""

    heads: int
    kv_heads: int
    blocks: tuple[int, ...]  # block sizes B of the correctness checks
    check_dtypes: tuple[str, ...]
    head_dim: int
    check_length: int  # L of the correctness rows (row 2L)
    check_batch: int
    decode_check_batch: int
    decode_check_cache: int
    speed_lengths: tuple[int, ...]
    sweep_length: int
    tile_grid: tuple[tuple, ...]
    decode_tile_grid: tuple[int, ...]
    train_preset: str
    train_overrides: dict
    train_batch: int
    train_length: int
    train_steps: int
    decode_preset: str
    decode_overrides: dict
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_new_tokens: int
    repeats: int
    budgets: dict  # section -> seconds


FULL = Plan(
    heads=16, kv_heads=8, blocks=(4, 8, 16), check_dtypes=("bfloat16", "float32"), head_dim=128,
    check_length=1024, check_batch=2, decode_check_batch=4, decode_check_cache=2048,
    speed_lengths=(4096, 2048, 8192), sweep_length=4096, tile_grid=TILE_GRID, decode_tile_grid=DECODE_TILE_GRID,
    train_preset="sdar-1.7b", train_overrides={}, train_batch=1, train_length=4096, train_steps=5,
    decode_preset="sdar-4b", decode_overrides={}, decode_batches=(1, 128), decode_prompt=16,
    decode_new_tokens=128, repeats=5,
    # Seconds per section; a section's deadline is the run's start plus the budgets up to and
    # including it, so time an early section leaves unused passes on to the later ones.
    budgets={"correctness": 70, "attention": 80, "train_step": 110, "decode": 150, "tiles": 50},
)
SMOKE = Plan(
    heads=4, kv_heads=2, blocks=(4,), check_dtypes=("float32",), head_dim=16, check_length=32,
    check_batch=2, decode_check_batch=3, decode_check_cache=64, speed_lengths=(32,), sweep_length=32,
    tile_grid=((32, 16, 16, 32, 4, 2),), decode_tile_grid=(16,),
    train_preset="tiny", train_overrides={"num_layers": 1}, train_batch=1, train_length=32, train_steps=1,
    decode_preset="tiny", decode_overrides={"num_layers": 1}, decode_batches=(1, 2), decode_prompt=4,
    decode_new_tokens=8, repeats=1,
    # Generous: a loaded CPU must not turn the smoke test's coverage into skips.
    budgets={"correctness": 900, "attention": 900, "tiles": 900, "train_step": 900, "decode": 900},
)


# ----------------------------------------------------------------------------- plumbing


class Deadline:
    """A section's end time (monotonic clock); `expired()` guards each unit of work."""

    def __init__(self, end: float):
        self.end = end

    def expired(self) -> bool:
        return time.monotonic() > self.end


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _guarded(deadline: Deadline, fn: Callable[[], dict]) -> dict:
    """Runs one unit of work: skipped past the deadline, errors recorded, never raised."""
    if deadline.expired():
        return {"skipped": "time budget"}
    start, cpu = time.monotonic(), time.process_time()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - one failing unit must not lose the rest of the run
        result = {"error": _error(exc)}
    result["wall_s"] = round(time.monotonic() - start, 2)
    result["host_cpu_s"] = round(time.process_time() - cpu, 2)  # compile and Python work
    return result


def _command(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


def environment(plan_name: str) -> dict:
    device = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "mode": plan_name,
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "driver": _command(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(_command(["git", "status", "--porcelain", "--untracked-files=no"])),
    }


# ----------------------------------------------------------------------------- correctness


def _training_check(plan: Plan, dtype: str, block: int, interpret: bool) -> dict:
    mask = masks.block_diffusion(block)
    ids = kernel_check.training_inputs(block, mask=mask, batch=plan.check_batch, length=plan.check_length,
                                       n_segments=3)
    row = 2 * plan.check_length
    q, k, v, dout = kernel_check.qkv(block, plan.check_batch, row, row, plan.heads, plan.kv_heads,
                                     plan.head_dim, jnp.dtype(dtype))
    kernel = jax.jit(lambda q, k, v, dout: kernel_check.output_and_grads(
        lambda q, k, v: attention.attention(q, k, v, ids, impl="pallas", backend="gpu", interpret=interpret),
        q, k, v, dout))
    precision = "highest" if dtype == "float32" else None
    with jax.default_matmul_precision(precision):
        got = kernel(q, k, v, dout)
    errors = kernel_check.relative_errors(got, kernel_check.reference(q, k, v, dout, ids))
    return _judge(dict(zip(("out", "dq", "dk", "dv"), errors)), dtype)


def _decode_check(plan: Plan, dtype: str, block: int, interpret: bool) -> dict:
    ids = kernel_check.decode_inputs(block, batch=plan.decode_check_batch, block_size=block,
                                     max_len=plan.decode_check_cache)
    q, k, v, _ = kernel_check.qkv(block, plan.decode_check_batch, block, plan.decode_check_cache, plan.heads,
                                  plan.kv_heads, plan.head_dim, jnp.dtype(dtype))
    kernel = jax.jit(lambda q, k, v: pallas_decode.decode_attention(q, k, v, ids, interpret=interpret))
    precision = "highest" if dtype == "float32" else None
    with jax.default_matmul_precision(precision):
        got = kernel(q, k, v).astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), ids)
    return _judge({"out": kernel_check.relative_errors([got], [want])[0]}, dtype)


def _judge(errors: dict, dtype: str) -> dict:
    tolerance = {name: TOLERANCES[dtype][name] for name in errors}
    return {"errors": errors, "tolerance": tolerance, "pass": all(errors[n] <= tolerance[n] for n in errors)}


def correctness(plan: Plan, deadline: Deadline, interpret: bool) -> list[dict]:
    rows = []
    for dtype in plan.check_dtypes:
        for block in plan.blocks:
            for kind, check in (("training fwd+bwd", _training_check), ("decode", _decode_check)):
                result = _guarded(deadline, lambda: check(plan, dtype, block, interpret))
                rows.append({"kernel": kind, "dtype": dtype, "block": block, **result})
    return rows


# ----------------------------------------------------------------------------- attention speed


def _speed_inputs(plan: Plan, length: int, dtype=jnp.bfloat16):
    mask = masks.block_diffusion(4)
    ids = kernel_check.training_inputs(0, mask=mask, batch=1, length=length, n_segments=1)
    q, k, v, dout = kernel_check.qkv(0, 1, 2 * length, 2 * length, plan.heads, plan.kv_heads, plan.head_dim,
                                     dtype)
    return q, k, v, dout, ids


def _fwd_bwd(fn: Callable, dout: jnp.ndarray) -> Callable:
    return jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), dout.astype(jnp.float32)),
                            argnums=(0, 1, 2)))


def attention_speed(plan: Plan, deadline: Deadline, interpret: bool) -> list[dict]:
    rows = []
    on_gpu = jax.default_backend() == "gpu"
    for length in plan.speed_lengths:
        q, k, v, dout, ids = _speed_inputs(plan, length)
        dense = ids.dense()
        pairs = perf.allowed_pairs(ids.spec, ids.q_positions, ids.q_segment_ids)
        useful = 3.5 * 4.0 * plan.head_dim * plan.heads * pairs  # fwd + bwd (bwd = 2.5x fwd)
        methods: dict[str, Callable] = {
            "pallas": lambda q, k, v: attention.attention(q, k, v, ids, impl="pallas", backend="gpu",
                                                          interpret=interpret),
            "xla dense mask": lambda q, k, v: xla_attention(q, k, v, ids),
            "jax.nn (xla)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense[:, None],
                                                                         implementation="xla"),
        }
        if on_gpu:
            methods["jax.nn (cudnn, mask)"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, mask=dense[:, None], implementation="cudnn")
            methods["cudnn causal (other mask)"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn")
        times = {}
        for name, fn in methods.items():
            result = _guarded(deadline, lambda: {"seconds": perf.median_seconds(_fwd_bwd(fn, dout), q, k, v,
                                                                                repeats=plan.repeats)})
            times[name] = result.get("seconds")
            rows.append({"L": length, "row": 2 * length, "method": name, **result})
        base = times.get("xla dense mask")
        for row in rows:
            if row["L"] == length and row.get("seconds"):
                row["dense_fraction"] = round(pairs / dense.size, 4)
                row["useful_tflops"] = useful / row["seconds"] / 1e12
                row["vs_xla"] = base / row["seconds"] if base else None
    return rows


# ----------------------------------------------------------------------------- tile sweep


def tile_sweep(plan: Plan, deadline: Deadline, interpret: bool) -> dict:
    q, k, v, dout, ids = _speed_inputs(plan, plan.sweep_length)
    training = []
    for grid in plan.tile_grid:
        blocks = pallas_gpu.BlockSizes(*grid)
        fn = lambda q, k, v, blocks=blocks: attention.attention(
            q, k, v, ids, impl="pallas", backend="gpu", interpret=interpret,
            tuning=attention.KernelTuning(gpu_blocks=blocks))
        result = _guarded(deadline, lambda: {"seconds": perf.median_seconds(_fwd_bwd(fn, dout), q, k, v,
                                                                            repeats=plan.repeats)})
        training.append({"blocks": dataclasses.asdict(blocks), **result})
    decode_ids = kernel_check.decode_inputs(0, batch=plan.decode_check_batch, block_size=4,
                                            max_len=plan.decode_check_cache)
    dq, dk, dv, _ = kernel_check.qkv(0, plan.decode_check_batch, 4, plan.decode_check_cache, plan.heads,
                                     plan.kv_heads, plan.head_dim, jnp.bfloat16)
    decode = []
    for block_k in plan.decode_tile_grid:
        fn = jax.jit(lambda q, k, v, block_k=block_k: pallas_decode.decode_attention(
            q, k, v, decode_ids, block_k=block_k, interpret=interpret))
        result = _guarded(deadline, lambda: {"seconds": perf.median_seconds(fn, dq, dk, dv, repeats=plan.repeats)})
        decode.append({"block_k": block_k, **result})

    def best(rows):
        timed = [r for r in rows if r.get("seconds")]
        return min(timed, key=lambda r: r["seconds"]) if timed else None

    return {"L": plan.sweep_length, "training": training, "training_best": best(training),
            "decode_batch": plan.decode_check_batch, "decode_cache": plan.decode_check_cache,
            "decode": decode, "decode_best": best(decode)}


# ----------------------------------------------------------------------------- train step


def _train_batch(plan: Plan, vocab: int, block: int) -> dict:
    pos, seg = kernel_check.packed_rows(0, plan.train_batch, plan.train_length, block, n_segments=2)
    tokens = np.random.default_rng(0).integers(0, vocab - 1, pos.shape).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg),
            "loss_mask": jnp.ones(pos.shape, bool)}


def train_step(plan: Plan, deadline: Deadline, peak: perf.DevicePeak | None) -> dict:
    from sdar_jax.train import config as run_config  # ml-collections: only this section needs it
    from sdar_jax.train import optimizer as optimizer_lib
    from sdar_jax.train import state as state_lib
    from sdar_jax.train import step as step_lib

    results: dict = {}
    notes: list[str] = []
    for remat in ("none", "full"):  # "full" only if the un-rematerialised step does not fit
        model = get_preset(plan.train_preset, dtype="bfloat16", param_dtype="float32", remat_policy=remat,
                           attention_impl="pallas", **plan.train_overrides)
        config = run_config.base_config()
        tx = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
        schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.train.steps)
        batch = _train_batch(plan, model.vocab_size, model.block_size)

        def run():
            state = jax.jit(lambda key: state_lib.create_train_state(model, tx, key))(jax.random.key(0))
            step = step_lib.compile_train_step(config, model, tx, schedule)
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            first = time.perf_counter() - start
            samples = []
            for _ in range(plan.train_steps):
                start = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                samples.append(time.perf_counter() - start)
            seconds = float(np.median(samples))
            row = 2 * plan.train_length
            positions = jnp.concatenate([batch["positions"]] * 2, axis=1)
            segments = jnp.concatenate([batch["segment_ids"]] * 2, axis=1)
            pairs = perf.allowed_pairs(masks.block_diffusion(model.block_size), positions, segments)
            flops = perf.train_step_flops(model, row_tokens=plan.train_batch * row,
                                          logit_tokens=plan.train_batch * plan.train_length, pairs=pairs)
            return {"remat": remat, "batch": plan.train_batch, "L": plan.train_length,
                    "params": model.num_params, "first_step_s": first, "step_s": seconds,
                    "loss": float(metrics["loss"]), "useful_tflop_per_step": flops.total / 1e12,
                    "useful_tflops": flops.total / seconds / 1e12,
                    "mfu": flops.total / seconds / peak.bf16_flops if peak else None}

        results = _guarded(deadline, run)
        error = results.get("error", "")
        if "RESOURCE_EXHAUSTED" not in error and "out of memory" not in error.lower():
            break
        notes.append(f"remat {remat} did not fit: {error}")
    return {**results, "notes": notes} if notes else results


# ----------------------------------------------------------------------------- decode


def decode_speed(plan: Plan, deadline: Deadline, peak: perf.DevicePeak | None) -> list[dict]:
    from sdar_jax.decode.decoder import DecodeConfig, generate
    from sdar_jax.model import transformer

    model = get_preset(plan.decode_preset, dtype="bfloat16", param_dtype="bfloat16", attention_impl="pallas",
                       **plan.decode_overrides)
    dc = DecodeConfig(block_length=4, steps=4, strategy="low_confidence_static",
                      max_new_tokens=plan.decode_new_tokens)
    holder: dict[str, Any] = {}

    def init():
        holder["params"] = jax.jit(transformer.init_params, static_argnums=0)(model, jax.random.key(0))
        jax.block_until_ready(holder["params"])
        return {}

    rows = [{"stage": "init params", **_guarded(deadline, init)}]
    if "params" not in holder:
        return rows
    rng = np.random.default_rng(0)
    for batch in plan.decode_batches:
        prompts = jnp.asarray(rng.integers(2, model.vocab_size - 1, (batch, plan.decode_prompt)), jnp.int32)
        lengths = jnp.full((batch,), plan.decode_prompt, jnp.int32)

        def run():
            call = lambda: generate(holder["params"], model, prompts, lengths, jax.random.key(0), dc)
            seconds = perf.median_seconds(call, repeats=max(1, plan.repeats - 2 if batch == 1 else plan.repeats // 2))
            out = call()
            tokens = int(np.asarray(out.lengths).sum())
            tpf = float(np.asarray(out.tokens_per_forward).mean())
            row = {"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                   "tpf": tpf}
            if peak:
                roof = perf.bandwidth_roofline_tokens_per_s(model, itemsize=2, hbm_bytes_per_s=peak.hbm_bytes_per_s,
                                                            tokens_per_forward=tpf)
                if batch == 1:  # the bound of a weight-bandwidth-bound forward; large batches are not
                    row["roofline_tokens_per_s"] = roof
                    row["roofline_fraction"] = tokens / seconds / roof
            return row

        rows.append({"stage": f"batch {batch}", **_guarded(deadline, run)})
    return rows


# ----------------------------------------------------------------------------- report


def judge_targets(report: dict) -> dict:
    """Each target's measured value and whether it is met (None where not measured)."""
    measured: dict[str, float | None] = dict.fromkeys(TARGETS)
    for row in report.get("attention", []):
        if row["L"] == 4096 and row["method"] == "pallas" and row.get("vs_xla"):
            measured["attention_4k_vs_xla"] = row["vs_xla"]
    measured["train_mfu"] = report.get("train_step", {}).get("mfu")
    for row in report.get("decode", []):
        if row.get("batch") == 128:
            measured["decode_b128_tokens_per_s"] = row.get("tokens_per_s")
        if row.get("batch") == 1:
            measured["decode_b1_roofline_fraction"] = row.get("roofline_fraction")
    return {name: {"target": TARGETS[name], "measured": value,
                   "met": None if value is None else value >= TARGETS[name]} for name, value in measured.items()}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1e4:
            return f"{x:.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def _status(row: dict) -> str:
    return row.get("error") or row.get("skipped") or ""


def markdown(report: dict) -> str:
    env = report["environment"]
    out = [f"# Accelerator check ({env['mode']})", "",
           f"{env['date_utc']} UTC, {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)), "
           f"driver {env['driver'] or '-'}, Python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
           f"flax {env['flax']}, optax {env['optax']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}.",
           ""]
    if env["platform"] == "cpu":
        out += ["Interpret mode on CPU: the numbers show the code paths run, not kernel speed.", ""]
    if "correctness" in report:
        out += ["## Correctness (relative max error vs the XLA reference)", "",
                "| kernel | dtype | B | out | dq | dk | dv | pass | note |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for r in report["correctness"]:
            e = r.get("errors", {})
            out.append(f"| {r['kernel']} | {r['dtype']} | {r['block']} | " + " | ".join(
                _fmt(e.get(n)) for n in ("out", "dq", "dk", "dv")) + f" | {r.get('pass', '-')} | {_status(r)} |")
        out.append("")
    if "attention" in report:
        out += ["## Training attention fwd+bwd (bf16, batch 1, block 4)", "",
                "| L | row | method | ms | useful TFLOP/s | vs xla dense | note |", "|---:|---:|---|---:|---:|---:|---|"]
        for r in report["attention"]:
            ms = r["seconds"] * 1e3 if r.get("seconds") else None
            out.append(f"| {r['L']} | {r['row']} | {r['method']} | {_fmt(ms)} | {_fmt(r.get('useful_tflops'))} | "
                       f"{_fmt(r.get('vs_xla'))} | {_status(r)} |")
        out.append("")
    if "tiles" in report:
        t = report["tiles"]
        out += [f"## Tile sweep (training fwd+bwd at L={t['L']}; decode at batch {t['decode_batch']}, "
                f"cache {t['decode_cache']})", "", "| kernel | tiles | ms | note |", "|---|---|---:|---|"]
        for r in t["training"]:
            b = r["blocks"]
            tiles = f"q{b['block_q']} k{b['block_k']} bwd q{b['block_q_bwd']} k{b['block_k_bwd']} " \
                    f"w{b['num_warps']} s{b['num_stages']}"
            out.append(f"| training | {tiles} | {_fmt(r['seconds'] * 1e3 if r.get('seconds') else None)} | {_status(r)} |")
        for r in t["decode"]:
            out.append(f"| decode | block_k {r['block_k']} | "
                       f"{_fmt(r['seconds'] * 1e3 if r.get('seconds') else None)} | {_status(r)} |")
        best = t.get("training_best")
        out += ["", f"Best training tiles: {best['blocks'] if best else '-'}; best decode block_k: "
                    f"{t['decode_best']['block_k'] if t.get('decode_best') else '-'}.", ""]
    if "train_step" in report:
        r = report["train_step"]
        out += ["## Train step", "", "| remat | batch x L | step s | useful TFLOP/s | MFU | note |",
                "|---|---|---:|---:|---:|---|",
                f"| {r.get('remat', '-')} | {r.get('batch', '-')} x {r.get('L', '-')} | {_fmt(r.get('step_s'))} | "
                f"{_fmt(r.get('useful_tflops'))} | {_fmt(r.get('mfu'))} | {_status(r)} {'; '.join(r.get('notes', []))} |", ""]
    if "decode" in report:
        out += ["## Decoding (B=4, static 4 steps)", "",
                "| stage | tokens | s | tokens/s | TPF | roofline tokens/s | fraction | note |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in report["decode"]:
            out.append(f"| {r['stage']} | {_fmt(r.get('tokens'))} | {_fmt(r.get('seconds'))} | "
                       f"{_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('tpf'))} | {_fmt(r.get('roofline_tokens_per_s'))} | "
                       f"{_fmt(r.get('roofline_fraction'))} | {_status(r)} |")
        out.append("")
    if "targets" in report:
        out += ["## Targets", "", "| target | wanted | measured | met |", "|---|---:|---:|---|"]
        for name, t in report["targets"].items():
            out.append(f"| {name} | {_fmt(t['target'])} | {_fmt(t['measured'])} | {_fmt(t['met'])} |")
        out.append("")
    out.append(f"Total wall: {_fmt(report.get('wall_s'))} s.")
    return "\n".join(out) + "\n"


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(out_dir: str, report: dict) -> None:
    _write_atomic(os.path.join(out_dir, "accelerator_check.json"), json.dumps(report, indent=1, default=str) + "\n")
    _write_atomic(os.path.join(out_dir, "accelerator_check.md"), markdown(report))


def run(out_dir: str, *, smoke: bool, budget_s: float, sections: tuple[str, ...],
        peak: perf.DevicePeak | None = None) -> dict:
    """Runs `sections` and writes the report after each; `peak` overrides the device table."""
    plan = SMOKE if smoke else FULL
    start = time.monotonic()
    run_end = start + budget_s
    interpret = jax.default_backend() != "gpu"
    report: dict[str, Any] = {"environment": environment("smoke" if smoke else "full")}
    peak = peak or perf.device_peak(report["environment"]["device_kind"])
    report["peak"] = dataclasses.asdict(peak) if peak else None
    steps = {
        "correctness": lambda d: correctness(plan, d, interpret),
        "attention": lambda d: attention_speed(plan, d, interpret),
        "tiles": lambda d: tile_sweep(plan, d, interpret),
        "train_step": lambda d: train_step(plan, d, peak),
        "decode": lambda d: decode_speed(plan, d, peak),
    }
    scheduled = start
    for name in sections:
        scheduled += plan.budgets[name]
        report[name] = steps[name](Deadline(min(scheduled, run_end)))
        report["wall_s"] = time.monotonic() - start
        if not interpret:
            report["targets"] = judge_targets(report)
        write_report(out_dir, report)
    return report


SECTIONS = ("correctness", "attention", "train_step", "decode", "tiles")  # in run order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for accelerator_check.{json,md}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of all sections (default 470; 3600 with --smoke)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU, with --hbm-tbps (default: the published figures "
                             "of a device in sdar_jax.perf.DEVICE_PEAKS)")
    parser.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth for the roofline")
    decode_cli.add_cache_args(parser)  # a rerun on the same machine skips the compiles
    args = parser.parse_args(argv)
    given = [x for x in (args.peak_tflops, args.hbm_tbps) if x is not None]
    if len(given) == 1 or any(x <= 0 for x in given):
        print("accelerator_check: give both --peak-tflops and --hbm-tbps, positive, or neither", file=sys.stderr)
        return 2
    peak = perf.DevicePeak(args.peak_tflops * 1e12, args.hbm_tbps * 1e12) if given else None
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=args.out, prefix=".probe-")
        probe.close()
    except OSError as exc:
        print(f"accelerator_check: --out {args.out!r} is not a writable directory: {exc}", file=sys.stderr)
        return 2
    try:
        decode_cli.enable_compilation_cache(args)
    except decode_cli.DecodingArgsError as exc:
        print(f"accelerator_check: {exc}", file=sys.stderr)
        return 2
    if not args.smoke and jax.default_backend() != "gpu":
        print(f"accelerator_check: the full mode needs a GPU, JAX's backend is {jax.default_backend()!r}; "
              "use --smoke on CPU", file=sys.stderr)
        return 2
    budget_s = args.budget_s if args.budget_s is not None else (3600.0 if args.smoke else 470.0)
    report = run(args.out, smoke=args.smoke, budget_s=budget_s, sections=tuple(args.sections), peak=peak)
    print(markdown(report))
    failed = [r for r in report.get("correctness", []) if r.get("pass") is False or "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
