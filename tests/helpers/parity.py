"""Shared pieces of the logit-parity tests: reference masks written in numpy
from the spec (independent of sdar_jax.ops.masks), packed rows, the sdar_jax
side of a comparison, and conversion through the command-line code path."""

from __future__ import annotations

import os

import numpy as np

from launch import convert_checkpoint
from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.config import ModelConfig
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec


def reference_mask(kind: str, positions: np.ndarray, segments: np.ndarray, block: int) -> np.ndarray:
    """The attention mask of SDAR.md §1, in numpy.

    Args:
      kind: "causal", "block_causal" or "block_diffusion" (a row [xt ; x0]
        whose first half is noisy).
      positions: [batch, seq] position ids.
      segments: [batch, seq] packing segment ids.
      block: the block size.

    Returns:
      [batch, seq, seq] bool, True where query i may attend to key j.
    """
    qp, kp = positions[:, :, None], positions[:, None, :]
    same = segments[:, :, None] == segments[:, None, :]
    if kind == "causal":
        return same & (kp <= qp)
    qb, kb = qp // block, kp // block
    if kind == "block_causal":
        return same & (kb <= qb)
    if kind != "block_diffusion":
        raise ValueError(f"unknown mask kind {kind!r}")
    noisy = np.arange(positions.shape[1]) < positions.shape[1] // 2
    qn, kn = noisy[None, :, None], noisy[None, None, :]
    allowed = np.where(qn, np.where(kn, kb == qb, kb < qb), ~kn & (kb <= qb))
    return same & allowed


def packed_layout(lengths: list[int], rng: np.random.Generator, vocab: int):
    """One row of packed examples.

    Returns:
      (tokens [seq], positions [seq] restarting at 0 per example,
       segment ids [seq] = 1, 2, ...), seq = sum(lengths).
    """
    positions = np.concatenate([np.arange(n) for n in lengths])
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    tokens = rng.integers(0, vocab, size=positions.shape)
    return tokens, positions, segments


def sdar_logits(config: ModelConfig, params: dict, tokens: np.ndarray, positions: np.ndarray,
                kind: str, block: int = 1, segments: np.ndarray | None = None) -> np.ndarray:
    """sdar_jax logits [batch, seq, vocab] float32 under MaskSpec(kind, block)."""
    seg = None if segments is None else np.asarray(segments, np.int32)
    out = transformer.apply(
        config, params, np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
        mask=MaskSpec(kind, block), segment_ids=seg,
    )
    return np.asarray(out.logits)


def convert_with_cli(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike,
                     *extra: str) -> tuple[ModelConfig, dict]:
    """`convert_checkpoint.py hf-to-jax` then load_params_checkpoint."""
    argv = ["hf-to-jax", "--hf", os.fspath(hf_dir), "--out", os.fspath(ckpt_dir), *extra]
    status = convert_checkpoint.main(argv)
    if status != 0:
        raise AssertionError(f"hf-to-jax exited with {status}")
    return load_params_checkpoint(ckpt_dir)


def export_with_cli(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *extra: str) -> None:
    """`convert_checkpoint.py jax-to-hf`."""
    argv = ["jax-to-hf", "--ckpt", os.fspath(ckpt_dir), "--out", os.fspath(out_dir), *extra]
    status = convert_checkpoint.main(argv)
    if status != 0:
        raise AssertionError(f"jax-to-hf exited with {status}")
