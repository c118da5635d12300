"""Where accuracy goes: teacher-forced token accuracy by in-block position and by task.

For held-out prompt/response examples (encoded exactly as the trainer does,
`data.pipeline.RecordToExample`, chat template included), every response
token j is predicted with the true tokens as context, and the hits are
counted by j's position inside its block (`j % B`, blocks counted from the
sequence start as in decoding) and by task:

- AR models (`mode="ar"`): the causal forward's next-token prediction of j.
- SDAR models (`mode="diffusion"`), through the training row `[xt ; x0]`
  with the block-diffusion mask and the model's logits convention
  (`diffusion.loss.prediction_index`); two probes:
    `masked_block`  all response tokens masked: each block predicted in one
                    forward from the clean earlier blocks, the decoder's
                    first denoising step;
    `left_clean`    B forwards; in forward k the response tokens at in-block
                    offset >= k are masked and those at offset k are scored:
                    each token with every earlier token clean, the ideal
                    left-to-right order inside a block.

Prompt tokens are never masked or scored. `summarize` turns the counts into
accuracies (with binomial standard errors over tokens) for the first
position, the later positions, each position and each task.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.config import ModelConfig
from sdar_jax.data.pipeline import RecordToExample
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.diffusion import loss as loss_lib
from sdar_jax.diffusion.noise import diffusion_row
from sdar_jax.eval import metrics as metrics_lib
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec

Mode = Literal["ar", "diffusion"]
MODES = ("ar", "diffusion")
PROBES = {"ar": ("next_token",), "diffusion": ("masked_block", "left_clean")}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Examples as equal-length rows.

    tokens: [n, L] int32 (padding 0); targets: [n, L] bool, the response tokens
    scored (loss_mask of the trainer's encoding, <|im_end|> included); tasks: n names.
    """

    tokens: np.ndarray
    targets: np.ndarray
    tasks: tuple[str, ...]


def encode(tokenizer: Tokenizer, examples: Sequence[Mapping[str, Any]], block_size: int,
           length: int | None = None) -> Encoded:
    """Encodes `prompt` / `response` examples as the trainer does, padded to a block multiple."""
    if not examples:
        raise ValueError("teacher_forcing.encode: no examples")
    to_example = RecordToExample(tokenizer)
    encoded = [to_example.map({"prompt": e["prompt"], "response": e["response"],
                               "_origin": f"example {i}"}) for i, e in enumerate(examples)]
    longest = max(len(e["tokens"]) for e in encoded)
    width = length or -(-longest // block_size) * block_size
    if width < longest or width % block_size:
        raise ValueError(f"teacher_forcing.encode: length {width} must be a multiple of "
                         f"{block_size} and at least the longest example ({longest})")
    tokens = np.zeros((len(encoded), width), np.int32)
    targets = np.zeros((len(encoded), width), bool)
    for i, e in enumerate(encoded):
        tokens[i, :len(e["tokens"])] = e["tokens"]
        targets[i, :len(e["tokens"])] = e["loss_mask"]
    return Encoded(tokens, targets, tuple(str(e.get("task", "all")) for e in examples))


def _ar_hits(config: ModelConfig, params: Any, tokens: jax.Array) -> jax.Array:
    """[n, L] bool: the causal prediction of token j (from output j - 1) is right; j = 0 False."""
    n, L = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (n, L))
    logits = transformer.apply(config, params, tokens, positions, mask=MaskSpec("causal"),
                               segment_ids=jnp.ones((n, L), jnp.int32)).logits
    hits = jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]
    return jnp.concatenate([jnp.zeros((n, 1), bool), hits], axis=1)


def _diffusion_hits(config: ModelConfig, params: Any, tokens: jax.Array, masked: jax.Array,
                    block_size: int) -> jax.Array:
    """[n, L] bool: the prediction of each token of the `[xt ; x0]` row with `masked` masked."""
    n, L = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (n, L))
    segments = jnp.ones((n, L), jnp.int32)
    xt = jnp.where(masked, config.mask_token_id, tokens)
    row, row_pos, row_seg = diffusion_row(xt, tokens, positions, segments)
    shifted = config.logits_convention == "shifted"
    logits = transformer.apply(config, params, row, row_pos,
                               mask=MaskSpec("block_diffusion", block_size, config.causal_in_block),
                               segment_ids=row_seg,
                               logits_slice=(0, 2 * L) if shifted else (0, L)).logits
    if shifted:
        logits = logits[:, loss_lib.prediction_index(L, block_size, "shifted")]
    return jnp.argmax(logits, -1) == tokens


@functools.partial(jax.jit, static_argnames=("config", "mode", "block_size"))
def _probe_hits(params: Any, tokens: jax.Array, targets: jax.Array, *, config: ModelConfig,
                mode: Mode, block_size: int) -> dict[str, jax.Array]:
    """Per probe, [n, L] bool hits on the scored tokens (False elsewhere)."""
    if mode == "ar":
        return {"next_token": _ar_hits(config, params, tokens) & targets}
    offset = jnp.arange(tokens.shape[1]) % block_size
    whole = _diffusion_hits(config, params, tokens, targets, block_size) & targets
    left = jnp.zeros_like(targets)
    for k in range(block_size):
        hits = _diffusion_hits(config, params, tokens, targets & (offset >= k), block_size)
        left = left | (hits & targets & (offset == k))
    return {"masked_block": whole, "left_clean": left}


def count_hits(params: Any, config: ModelConfig, data: Encoded, *, mode: Mode, block_size: int,
               batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per probe, [n, L] bool hits (False off the scored tokens), batched and jitted once.

    Args:
      params, config: the model.
      data: from `encode`.
      mode: "ar" or "diffusion" (see the module docstring).
      block_size: B of the in-block positions (and of the diffusion mask).
      batch_size: rows per forward; the last batch is padded with unscored rows.
    """
    if mode not in MODES:
        raise ValueError(f"teacher_forcing: mode {mode!r} is not one of {MODES}")
    if mode == "diffusion" and config.mask_token_id is None:
        raise ValueError("teacher_forcing: mode 'diffusion' needs a model with a mask_token_id")
    n = len(data.tokens)
    pad = -n % batch_size
    tokens = np.concatenate([data.tokens, np.zeros((pad, data.tokens.shape[1]), np.int32)])
    targets = np.concatenate([data.targets, np.zeros((pad, data.tokens.shape[1]), bool)])
    out: dict[str, list[np.ndarray]] = {p: [] for p in PROBES[mode]}
    for start in range(0, len(tokens), batch_size):
        hits = _probe_hits(params, tokens[start:start + batch_size],
                           targets[start:start + batch_size], config=config, mode=mode,
                           block_size=block_size)
        for probe, h in jax.device_get(hits).items():
            out[probe].append(np.asarray(h))
    return {probe: np.concatenate(h)[:n] for probe, h in out.items()}


def _acc(hits: np.ndarray, scored: np.ndarray) -> dict[str, float]:
    acc = metrics_lib.Accuracy(correct=int(hits[scored].sum()), total=int(scored.sum()))
    if acc.total == 0:
        return {"accuracy": float("nan"), "stderr": float("nan"), "tokens": 0}
    return {"accuracy": acc.accuracy, "stderr": acc.stderr, "tokens": acc.total}


def summarize(hits: Mapping[str, np.ndarray], data: Encoded, block_size: int) -> dict[str, Any]:
    """Per probe: accuracy (with stderr and token count) over all scored tokens, the first
    in-block position, the later ones, each position, and each task."""
    offset = np.arange(data.tokens.shape[1]) % block_size
    tasks = np.asarray(data.tasks)
    summary = {}
    for probe, h in hits.items():
        scored = data.targets.copy()
        if probe == "next_token":
            scored[:, 0] = False
        summary[probe] = {
            "all": _acc(h, scored),
            "first": _acc(h, scored & (offset == 0)),
            "later": _acc(h, scored & (offset > 0)),
            "by_position": [_acc(h, scored & (offset == k)) for k in range(block_size)],
            "by_task": {t: _acc(h, scored & (tasks == t)[:, None]) for t in dict.fromkeys(data.tasks)},
        }
    return summary


def teacher_forced_accuracy(params: Any, config: ModelConfig, tokenizer: Tokenizer,
                            examples: Sequence[Mapping[str, Any]], *, mode: Mode,
                            block_size: int, batch_size: int = 64) -> dict[str, Any]:
    """`summarize` of `count_hits` on `examples` (dicts with prompt, response, task)."""
    data = encode(tokenizer, examples, block_size)
    hits = count_hits(params, config, data, mode=mode, block_size=block_size,
                      batch_size=batch_size)
    return summarize(hits, data, block_size)


def table_rows(name: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (model, probe, all / first / later / per-task %) for `report.format_table`."""
    rows = []
    for probe, s in summary.items():
        row = {"model": name, "probe": probe}
        for key in ("all", "first", "later"):
            row[key] = 100 * s[key]["accuracy"]
        for task, acc in s["by_task"].items():
            row[f"task_{task}"] = 100 * acc["accuracy"]
        rows.append(row)
    return rows
