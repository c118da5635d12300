"""SmolLM2-135M-Instruct -> SDAR: continued training at a CPU-sized budget.

The stages of `launch/adapt_smollm2.py` (`sdar_jax.adaptation` sets the paths and runs them):

  sdar    SDAR objective from the AR checkpoint with a mask row added, with the
          recipe of docs/adaptation.md (as `configs/demo.py:sdar`): the
          `shifted` logits convention (masked position i is read from position
          i - 1's output, so the AR head's next-token predictions are reused
          from the first step), causal attention inside blocks with an AR
          term on the clean half (the next-token reading every decoding step
          uses keeps being trained) and mixed B (each step draws its block
          size from {4, 8}), so one model decodes at both block lengths
  ar      the AR baseline: next-token objective on the same data and steps,
          from the same AR checkpoint

  python launch/train.py --config=configs/smollm2_adapt.py:sdar \
      --config.train.init_from=CKPT --config.data.train_path=TRAIN.jsonl \
      --config.data.tokenizer_dir=CKPT --config.train.workdir=DIR

The mask token: SmolLM2's vocabulary (49152 ids) has none, so the script adds
one row, id 49152 (`<|mask|>`), to the tied embedding (initialised to the
mean embedding) and to the tokenizer; `MASK_TOKEN_ID` is that id and
`VOCAB_SIZE` the extended vocabulary.

Sizes are for a 2-core CPU: 128-token rows, a few dozen steps (the script
sets the batch and steps). The learning rate is far above the paper-scale
recipe's 1e-5 because the budget is ~10^4 tokens instead of ~10^10.
"""

import ml_collections

from sdar_jax.train.config import base_config

SMOLLM2_VOCAB_SIZE = 49152
MASK_TOKEN_ID = SMOLLM2_VOCAB_SIZE  # the added row
VOCAB_SIZE = SMOLLM2_VOCAB_SIZE + 1
MASK_TOKEN = "<|mask|>"
BLOCK_SIZES = (4, 8)  # mixed B: the SDAR stage trains, and is evaluated, at both
STAGES = ("sdar", "ar")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the stage, "sdar" (default) or "ar"."""
    stage = arg or "sdar"
    if stage not in STAGES:
        raise ValueError(f"configs/smollm2_adapt.py: arg is {arg!r}; expected one of {STAGES}")
    config = base_config()

    # The architecture comes from train.init_from's config.json.
    config.model.overrides.update(dict(vocab_size=VOCAB_SIZE, mask_token_id=MASK_TOKEN_ID))
    config.objective.kind = stage
    config.objective.block_size = BLOCK_SIZES[0]  # unused by the AR objective
    if stage == "sdar":
        # Written into the export's config.json, which the decoder honours.
        config.model.overrides.logits_convention = "shifted"
        config.model.overrides.block_attention = "causal"
        config.model.overrides.block_size = BLOCK_SIZES[0]
        config.objective.mixed_block_sizes = BLOCK_SIZES
        config.objective.ar_loss_weight = 1.0
    config.objective.normalization = "non_prompt"

    config.data.seq_len = 128
    config.data.global_batch_size = 4
    config.data.long_examples = "split"
    config.data.read_threads = 1

    config.optimizer.peak_lr = 2e-4
    config.optimizer.warmup_steps = 3
    config.optimizer.end_lr_ratio = 0.1
    config.optimizer.weight_decay = 0.0
    config.optimizer.b2 = 0.99

    config.train.steps = 20
    config.train.log_every = 4
    config.train.eval_every = 10_000  # held-out numbers come from the experiment script
    config.train.checkpoint_every = 10_000  # the last step is always saved
    config.train.keep = 1
    config.train.async_checkpointing = False
    config.train.progress_bar = False
    config.required = ("train.init_from", "data.train_path", "data.tokenizer_dir", "train.workdir")
    return config
