"""The decoding knobs as command-line flags, shared by the launchers that decode.

`add_decoding_args(parser)` adds every field of `DecodeConfig` as a flag
(the same names and defaults as `launch/generate.py`);
`decode_config_from_args(args, config, stop_ids)` turns the parsed flags
into a validated `DecodeConfig`, filling the defaults that depend on the
checkpoint (mode from the mask token, block length from `block_size`, steps
= block length). `resolve_stop_ids` picks the stop ids: the flag, else the
tokenizer's, else the config's eos, and checks them against the vocabulary.

Also shared by the launchers: `check_writable` (an output path is checked
before any work) and the persistent compilation cache
(`add_cache_args` / `enable_compilation_cache`): JAX's own on-disk cache,
on by default under `$XDG_CACHE_HOME/sdar_jax/jax` (else
`~/.cache/sdar_jax/jax`); `--compilation-cache DIR` or the environment
variable `SDAR_JAX_COMPILATION_CACHE` moves it, the value `off` disables it.

`add_mesh_args` / `start_run` give generate and evaluate `--mesh` and the
multi-host start-up of `launch/train.py` (`sdar_jax.distributed`);
`few_rows_layout` stores the large projection kernels out-major when every
forward of the run multiplies few rows on CPU (batch 1 to 4 at B=4).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from sdar_jax import parallel
from sdar_jax.config import ModelConfig
from sdar_jax.decode import strategies
from sdar_jax.decode.decoder import MODES, DecodeConfig


class DecodingArgsError(ValueError):
    """A decoding flag has a bad value; the message names the flag."""


def add_decoding_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """Adds the decoding flags (an argument group "decoding") to `parser`."""
    d = DecodeConfig()
    g = parser.add_argument_group("decoding")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="diffusion (SDAR) or ar (plain AR); default: diffusion when the config "
                        "has a mask token, else ar")
    g.add_argument("--block-length", type=int, default=None,
                   help="block length B (default: the config's block_size, else 4)")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps per block (default: B); for said/said_chlg the per-block "
                        "step budget")
    # No argparse `choices`: a bad name gets DecodeConfig's one-line error listing the valid ones.
    g.add_argument("--strategy", default=d.strategy,
                   help=f"remasking strategy, one of {', '.join(strategies.STRATEGY_NAMES)}")
    g.add_argument("--threshold", type=float, default=d.threshold,
                   help="confidence threshold of low_confidence_dynamic, in (0, 1]")
    g.add_argument("--eb-bound", type=float, default=d.eb_bound,
                   help="entropy bound of entropy_bounded (nats)")
    g.add_argument("--said-stages", type=int, default=d.said_stages, help="SAID stages K")
    g.add_argument("--said-rec-steps", type=int, default=d.said_rec_steps,
                   help="steps of SAID's reconstruction stage")
    g.add_argument("--said-threshold", type=float, default=None,
                   help="dynamic confidence threshold inside SAID stages (default: static)")
    g.add_argument("--chlg-threshold", type=float, default=d.chlg_threshold,
                   help="CHLG threshold tau (said_chlg)")
    g.add_argument("--chlg-extra-steps", type=int, default=d.chlg_extra_steps,
                   help="CHLG extra steps for positions below tau (said_chlg)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=d.top_p, help="1 = off")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--stop-ids", default=None,
                   help="comma-separated stop token ids (default: the tokenizer's stop ids, else "
                        "the config's eos)")


def resolve_stop_ids(args: argparse.Namespace, tokenizer: Any, config: ModelConfig) -> tuple[int, ...]:
    """--stop-ids (each in [0, vocab_size)), else the tokenizer's stop ids, else
    (config.eos_token_id,), else ()."""
    if args.stop_ids is not None:
        try:
            ids = tuple(int(s) for s in args.stop_ids.split(",") if s.strip())
        except ValueError as e:
            raise DecodingArgsError(
                f"--stop-ids {args.stop_ids!r}: expected comma-separated ints") from e
        for i in ids:
            if not 0 <= i < config.vocab_size:
                raise DecodingArgsError(
                    f"--stop-ids: id {i} is outside the vocabulary [0, {config.vocab_size}) "
                    f"(vocab_size {config.vocab_size})")
        return ids
    if tokenizer is not None and tokenizer.stop_token_ids:
        return tuple(tokenizer.stop_token_ids)
    return () if config.eos_token_id is None else (config.eos_token_id,)


def decode_config_from_args(args: argparse.Namespace, config: ModelConfig,
                            stop_ids: tuple[int, ...]) -> DecodeConfig:
    """The DecodeConfig of parsed `add_decoding_args` flags for a checkpoint's `config`."""
    mode = args.mode or ("diffusion" if config.mask_token_id is not None else "ar")
    if mode == "diffusion" and config.mask_token_id is None:
        raise DecodingArgsError(
            "--mode diffusion needs a checkpoint with a mask token (mask_token_id in config.json); "
            "this one has none: use --mode ar")
    if args.block_length is not None and args.block_length < 1:
        raise DecodingArgsError(f"--block-length must be >= 1, got {args.block_length}")
    block_length = args.block_length if args.block_length is not None else (config.block_size or 4)
    try:
        return DecodeConfig(
            mode=mode, block_length=block_length,
            steps=args.steps if args.steps is not None else block_length,
            strategy=args.strategy, threshold=args.threshold, eb_bound=args.eb_bound,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, stop_ids=stop_ids, said_stages=args.said_stages,
            said_rec_steps=args.said_rec_steps, said_threshold=args.said_threshold,
            chlg_threshold=args.chlg_threshold, chlg_extra_steps=args.chlg_extra_steps,
        )
    except ValueError as e:
        raise DecodingArgsError(str(e)) from e


def check_writable(path: str, flag: str) -> None:
    """Raises DecodingArgsError naming `flag` and `path` unless a file can be written there.

    Nothing is created: the path must not be a directory and must be
    writable if it exists; else its nearest existing ancestor must be a
    writable directory (missing parents are created when writing).
    """
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise DecodingArgsError(f"{flag} {path!r} is a directory; expected a file path")
    if os.path.exists(target):
        if not os.access(target, os.W_OK):
            raise DecodingArgsError(f"{flag} {path!r} is not writable")
        return
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DecodingArgsError(f"{flag} {path!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DecodingArgsError(f"{flag} {path!r}: directory {parent!r} is not writable")


CACHE_ENV = "SDAR_JAX_COMPILATION_CACHE"


def default_cache_dir() -> str:
    """$SDAR_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/sdar_jax/jax, else ~/.cache/sdar_jax/jax."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sdar_jax", "jax")


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    """Adds --compilation-cache DIR|off."""
    parser.add_argument(
        "--compilation-cache", default=None, metavar="DIR|off",
        help=f"persistent JAX compilation cache directory, or 'off' (default: ${CACHE_ENV}, "
             "else $XDG_CACHE_HOME/sdar_jax/jax, else ~/.cache/sdar_jax/jax)")


def enable_compilation_cache(args: argparse.Namespace) -> str | None:
    """Points JAX's persistent compilation cache at the chosen directory (every
    compilation is cached, however fast); returns it, or None when off."""
    import jax

    directory = args.compilation_cache or default_cache_dir()
    if directory.lower() == "off":
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise DecodingArgsError(f"--compilation-cache {directory!r}: {e.strerror}") from e
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def few_rows_layout(model: Any, decode_config: DecodeConfig, num_slots: int,
                    stored_layout: bool) -> Any:
    """`model` (an InferenceModel) with `transformer.out_major_kernels` applied when the run
    decodes few rows per forward (`num_slots` x B, or `num_slots` for AR, at most
    `layers.FEW_ROWS`) on the CPU backend without a mesh, unless `stored_layout`; else as it is.
    """
    import jax

    from sdar_jax.model import layers, transformer

    rows = num_slots * (decode_config.block_length if decode_config.mode == "diffusion" else 1)
    if stored_layout or model.context is not None or jax.default_backend() != "cpu" \
            or rows > layers.FEW_ROWS:
        return model
    return model._replace(params=transformer.out_major_kernels(model.params, model.config,
                                                               free_stored=True))


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """Adds --mesh AXIS=SIZE,... and --stored-layout (how the params are placed for decoding)."""
    parser.add_argument(
        "--stored-layout", action="store_true",
        help="decode with the params as stored (the layers as one scanned stack, kernels "
             "[in, out]) instead of re-laid out at load for decoding: per-layer buffers and, "
             "for few rows per forward on CPU without --mesh, the large kernels out-major "
             "(faster forwards; docs/benchmarks.md)")
    parser.add_argument(
        "--mesh", default=None, metavar="AXIS=SIZE,...",
        help="decode on a device mesh, e.g. fsdp=4,tensor=2 or data=-1,tensor=8 (axes data, fsdp, "
             "tensor, expert as in the train config; -1: the devices left over; unnamed axes are 1 "
             "except data). Params are restored straight into their shardings. On several hosts run "
             "the same command on every host (start-up as launch/train.py); process 0 writes the "
             "outputs. Default: one device")


def start_run(args: argparse.Namespace) -> None:
    """Checks --mesh and joins a multi-process run (`sdar_jax.distributed`, as launch/train.py);
    call before any JAX computation.

    Raises:
      DecodingArgsError: a bad --mesh value or multi-process settings (one line).
    """
    from sdar_jax.distributed import DistributedConfigError, initialize_distributed

    if args.mesh is not None:
        try:
            parallel.parse_mesh_spec(args.mesh)
        except parallel.ParallelConfigError as e:
            raise DecodingArgsError(str(e)) from e
    try:
        initialize_distributed()
    except DistributedConfigError as e:
        raise DecodingArgsError(f"multi-process start-up: {e}") from e
