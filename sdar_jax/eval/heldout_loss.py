"""Held-out loss of a model under a training objective: the trainer's own eval step on a file.

`heldout_loss` scores a JSONL file of examples (the trainer's record formats,
e.g. `prompt` / `response` pairs trained as SFT) the way the trainer's
periodic evaluation does (`train.loop.evaluate`): the same input pipeline
(`data.pipeline.make_eval_iterator`, one pass, packed rows), the same loss
(`train.step.make_loss_fn`), noise from fixed keys (`fold_in(key(seed), i)`
for batch i), so two models scored on one file see the same masks.

kind "ar": next-token cross-entropy over the response tokens; kind "sdar":
the block-diffusion loss at one block size (the model's logits convention),
normalised as `objective.normalization` says.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from sdar_jax.config import ModelConfig
from sdar_jax.data import pipeline
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.train import loop
from sdar_jax.train import step as step_lib

KINDS = ("ar", "sdar")


def heldout_loss(params: Any, model: ModelConfig, tokenizer: Tokenizer, eval_path: str,
                 run_config: ml_collections.ConfigDict, *, kind: str, block_size: int = 1,
                 seed: int = 0) -> dict[str, float]:
    """Loss and token accuracy of the model on `eval_path` under objective `kind`.

    Args:
      params, model: the model.
      tokenizer: encodes the records.
      eval_path: held-out records (any `data.eval_path` the trainer accepts).
      run_config: a run config; its `data` section (seq_len, global_batch_size,
        long_examples, ...) and `objective.normalization` / `eps` / `max_tries`
        are used; kind and block size come from the arguments.
      kind: "ar" or "sdar".
      block_size: B of the SDAR loss (ignored for "ar").
      seed: the noise keys' seed.

    Returns:
      `step.reduce_eval`'s dict: loss, accuracy (of the scored tokens) and the
      other additive statistics.
    """
    if kind not in KINDS:
        raise ValueError(f"heldout_loss: kind {kind!r} is not one of {KINDS}")
    if kind == "sdar" and model.mask_token_id is None:
        raise ValueError("heldout_loss: the SDAR loss needs a model with a mask_token_id")
    config = copy.deepcopy(run_config)
    config.objective.kind = kind
    config.objective.block_size = block_size
    config.objective.mixed_block_sizes = None
    config.objective.block_schedule_start = None
    config.objective.distill_weight = 0.0
    config.objective.ar_loss_weight = 0.0  # the SDAR loss alone, comparable across models
    config.data.eval_path = eval_path
    batches = pipeline.make_eval_iterator(
        config.data, tokenizer, block_size if kind == "sdar" else 1, config.data.seq_len,
        config.data.global_batch_size)
    eval_fn = step_lib.compile_eval_step(config, model)
    return loop.evaluate(eval_fn, params, batches, max_batches=2**31 - 1, seed=seed, aux_coef=0.0)
