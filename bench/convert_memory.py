"""Peak memory (RSS, from the operating system) and time of both conversions.

Writes a synthetic Hugging Face checkpoint of a preset's layer shapes for
each layer count (random finite values, one safetensors shard per layer plus
one for the embedding / head, and an index), then runs
`launch/convert_checkpoint.py hf-to-jax` and `jax-to-hf` on it, each in its
own subprocess, and reads that subprocess's peak resident set size from
`os.wait4` (the kernel's ru_maxrss of the child and everything it waited
for). A converter that streams has the same peak for 3 and 9 layers; one that
holds the model grows with it.

    python bench/convert_memory.py                       # SDAR-1.7B shapes, full vocab, bf16, 3 and 9 layers
    python bench/convert_memory.py --preset sdar-30b-a3b --layers 1 2
    python bench/convert_memory.py --preset tiny --hidden 512 --intermediate 1536 --dtype float32 --json out.json

Needs about (3 x the 9-layer checkpoint) of free disk in --workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from sdar_jax.checkpoint.dtypes import NUMPY_DTYPES, numpy_dtype
from sdar_jax.checkpoint.params import CONFIG_FILE
from sdar_jax.config import ModelConfig, get_preset, to_hf_config
from sdar_jax.convert.hf_rules import tensor_rules
from sdar_jax.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, write_safetensors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Run:
    """One subprocess: peak RSS in bytes, wall time and CPU time (user + system) in seconds."""

    peak_rss: int
    seconds: float
    cpu_seconds: float


@dataclasses.dataclass(frozen=True)
class Row:
    """Both directions for one layer count, with one checkout's converter."""

    code: str  # "this" or "baseline"
    layers: int
    hf_bytes: int
    ckpt_bytes: int
    hf_to_jax: Run
    jax_to_hf: Run


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Finite random values (|x| < 2) without a float32 detour for bfloat16."""
    if dtype.itemsize == 2:
        bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16) & np.uint16(0xBFFF)
        return bits.view(dtype)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def write_synthetic_checkpoint(
    out_dir: str, config: ModelConfig, seed: int = 0, hf_config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> int:
    """A Hugging Face directory for `config` with random tensors (streamed:
    one tensor in memory at a time); returns its tensor bytes.

    Args:
      out_dir: the directory to create.
      config: shapes and dtype (param_dtype) of the tensors.
      seed: the values' seed.
      hf_config: the config.json to write (default `to_hf_config(config)`).
      max_shard_bytes: the largest safetensors shard.
    """
    os.makedirs(out_dir)
    dtype = numpy_dtype(config.param_dtype)
    tensors = [(name, rule.hf_shape) for rule in tensor_rules(config)
               for name, _ in rule.instances(config)]
    shapes = dict(tensors)
    rng = np.random.default_rng(seed)
    write_safetensors(
        out_dir, tensors, lambda name: _random_tensor(rng, shapes[name], dtype),
        config.param_dtype, max_shard_bytes,
    )
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(dict(hf_config) if hf_config is not None else to_hf_config(config), f, indent=2)
    return sum(math.prod(shape) for _, shape in tensors) * dtype.itemsize


# Runs argv[2:] and writes its peak RSS (KiB) and CPU seconds to argv[1]. A
# child started from this small process, not from the bench (which holds a
# synthetic checkpoint's worth of pages): Linux carries a process's RSS high
# water mark across fork/vfork + exec into the child's ru_maxrss.
_WRAPPER = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "maxrss_kib": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}, f)
"""


def measure(argv: Sequence[str], env: dict[str, str], cwd: str) -> Run:
    """Runs argv in `cwd`; its peak RSS from the kernel (getrusage(RUSAGE_CHILDREN)
    around it, in a small wrapper process), wall time and CPU time."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file, log_file = os.path.join(tmp, "result.json"), os.path.join(tmp, "log")
        start = time.perf_counter()
        with open(log_file, "wb") as log:
            subprocess.run([sys.executable, "-c", _WRAPPER, result_file, *argv], env=env, cwd=cwd,
                           stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds = time.perf_counter() - start
        with open(result_file) as f:
            result = json.load(f)
        if result["code"] != 0:
            with open(log_file) as f:
                raise RuntimeError(f"{' '.join(argv)} exited {result['code']}:\n{f.read()}")
    return Run(peak_rss=result["maxrss_kib"] * 1024, seconds=seconds, cpu_seconds=result["cpu"])


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _env(repo: str) -> dict[str, str]:
    """The environment that runs `repo`'s converter (its sdar_jax first on the path)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_layers(workdir: str, config: ModelConfig, repos: Mapping[str, str], max_shard_bytes: int) -> list[Row]:
    """One synthetic checkpoint, then hf-to-jax and jax-to-hf with each repo's converter."""
    base = os.path.join(workdir, f"L{config.num_layers}")
    hf_dir = base + "-hf"
    rows = []
    try:
        hf_bytes = write_synthetic_checkpoint(hf_dir, config, max_shard_bytes=max_shard_bytes)
        for code, repo in repos.items():
            ckpt_dir, back_dir = f"{base}-{code}-ckpt", f"{base}-{code}-back"
            try:
                cli = [sys.executable, "-m", "launch.convert_checkpoint"]
                # `python -m` puts the working directory first on sys.path, so each
                # repo's converter runs from that repo.
                to_jax = measure(cli + ["hf-to-jax", "--hf", hf_dir, "--out", ckpt_dir], _env(repo), repo)
                ckpt_bytes = _dir_bytes(ckpt_dir)
                to_hf = measure(cli + ["jax-to-hf", "--ckpt", ckpt_dir, "--out", back_dir], _env(repo), repo)
            finally:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
                shutil.rmtree(back_dir, ignore_errors=True)
            rows.append(Row(code, config.num_layers, hf_bytes, ckpt_bytes, to_jax, to_hf))
            print(f"measured: {rows[-1]}", file=sys.stderr, flush=True)  # a long run's rows as they come
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    return rows


def _times(run: Run) -> str:
    return f"{run.seconds:.1f} s / {run.cpu_seconds:.1f} s"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(rows: Sequence[Row], title: str) -> str:
    """The markdown table; then, per converter, each direction's peak growth
    from the first to the last layer count; then this / baseline ratios."""
    lines = [
        title, "",
        "| code | layers | HF checkpoint | params checkpoint | hf-to-jax peak RSS | hf-to-jax wall / CPU "
        "| jax-to-hf peak RSS | jax-to-hf wall / CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.code} | {r.layers} | {_gb(r.hf_bytes)} | {_gb(r.ckpt_bytes)} | {_gb(r.hf_to_jax.peak_rss)} | "
            f"{_times(r.hf_to_jax)} | {_gb(r.jax_to_hf.peak_rss)} | {_times(r.jax_to_hf)} |"
        )
    lines.append("")
    codes = list(dict.fromkeys(r.code for r in rows))
    for code in codes:
        mine = [r for r in rows if r.code == code]
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        for name in ("hf_to_jax", "jax_to_hf"):
            a, b = getattr(first, name).peak_rss, getattr(last, name).peak_rss
            lines.append(
                f"{code}: {name.replace('_', '-')} peak RSS {first.layers} -> {last.layers} layers: "
                f"{_gb(a)} -> {_gb(b)} ({(b / a - 1) * 100:+.1f} %)"
            )
    if "baseline" in codes:
        for this in (r for r in rows if r.code == "this"):
            base = next(r for r in rows if r.code == "baseline" and r.layers == this.layers)
            ratios = ", ".join(
                f"{name.replace('_', '-')} wall {getattr(this, name).seconds / getattr(base, name).seconds:.2f}x "
                f"CPU {getattr(this, name).cpu_seconds / getattr(base, name).cpu_seconds:.2f}x"
                for name in ("hf_to_jax", "jax_to_hf")
            )
            lines.append(f"{this.layers} layers, this / baseline: {ratios}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdar-1.7b", help="layer shapes (sdar_jax.config presets)")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9], help="layer counts to measure")
    parser.add_argument("--dtype", choices=tuple(NUMPY_DTYPES), default="bfloat16")
    parser.add_argument("--vocab", type=int, help="override the preset's vocab_size")
    parser.add_argument("--hidden", type=int, help="override hidden_size")
    parser.add_argument("--intermediate", type=int, help="override intermediate_size")
    parser.add_argument("--shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="largest shard of the synthetic checkpoint (default 5 GiB, one file here)")
    parser.add_argument("--baseline", help="another checkout (e.g. main) whose converter runs side by side")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)

    overrides = {"param_dtype": args.dtype}
    for field, value in (("vocab_size", args.vocab), ("hidden_size", args.hidden),
                         ("intermediate_size", args.intermediate)):
        if value is not None:
            overrides[field] = value
    base = get_preset(args.preset, **overrides)
    repos = {"this": REPO_ROOT}
    if args.baseline:
        repos["baseline"] = os.path.abspath(args.baseline)
    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_memory-")
    rows = []
    try:
        for layers in args.layers:
            rows += run_layers(workdir, base.replace(num_layers=layers), repos, args.shard_bytes)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    mlp = base.moe_intermediate_size if base.is_moe else base.intermediate_size
    title = f"{args.preset}: hidden {base.hidden_size}, mlp {mlp}, vocab {base.vocab_size}, {args.dtype}"
    if args.baseline:
        title += f" (baseline: {repos['baseline']})"
    print(table(sorted(rows, key=lambda r: (r.code != "this", r.layers)), title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)
    return rows


if __name__ == "__main__":
    main()
