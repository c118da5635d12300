"""SmolLM2-135M-Instruct -> SDAR: continued training at a CPU-sized budget.

The stages of `launch/adapt_smollm2.py` (which sets the paths and runs them):

  sdar4   SDAR objective, block 4, from the AR checkpoint with a mask row added
  sdar8   SDAR objective, block 8, from sdar4's export (spec §2: adapt at a
          small block, then grow it)
  ar      the AR baseline: next-token objective on the same data and steps as
          sdar4, from the same AR checkpoint

  python launch/train.py --config=configs/smollm2_adapt.py:sdar4 \
      --config.train.init_from=CKPT --config.data.train_path=TRAIN.jsonl \
      --config.data.tokenizer_dir=CKPT --config.train.workdir=DIR

The mask token: SmolLM2's vocabulary (49152 ids) has none, so the script adds
one row, id 49152 (`<|mask|>`), to the tied embedding (initialised to the
mean embedding) and to the tokenizer; `MASK_TOKEN_ID` is that id and
`VOCAB_SIZE` the extended vocabulary.

Sizes are for a shared 2-core CPU, where one SDAR step on 4 rows of 128
tokens took ~28 s: 128-token rows, a few dozen steps (the script sets the
batch and steps). The learning rate is far above the paper-scale
recipe's 1e-5 because the budget is ~10^4 tokens instead of ~10^10.
"""

import ml_collections

from sdar_jax.train.config import base_config

SMOLLM2_VOCAB_SIZE = 49152
MASK_TOKEN_ID = SMOLLM2_VOCAB_SIZE  # the added row
VOCAB_SIZE = SMOLLM2_VOCAB_SIZE + 1
MASK_TOKEN = "<|mask|>"
STAGES = {"sdar4": ("sdar", 4), "sdar8": ("sdar", 8), "ar": ("ar", None)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the stage, one of "sdar4" (default), "sdar8", "ar"."""
    stage = arg or "sdar4"
    if stage not in STAGES:
        raise ValueError(f"configs/smollm2_adapt.py: arg is {arg!r}; expected one of {tuple(STAGES)}")
    kind, block = STAGES[stage]
    config = base_config()

    # The architecture comes from train.init_from's config.json.
    config.model.overrides.update(dict(vocab_size=VOCAB_SIZE, mask_token_id=MASK_TOKEN_ID))
    if block is not None:
        config.model.overrides.block_size = block

    config.objective.kind = kind
    config.objective.block_size = block or 4  # unused by the AR objective
    config.objective.normalization = "non_prompt"

    config.data.seq_len = 128
    config.data.global_batch_size = 8
    config.data.long_examples = "split"
    config.data.read_threads = 1

    config.optimizer.peak_lr = 2e-4
    config.optimizer.warmup_steps = 3
    config.optimizer.end_lr_ratio = 0.1
    config.optimizer.weight_decay = 0.0
    config.optimizer.b2 = 0.99

    config.train.steps = 20 if stage != "sdar8" else 10
    config.train.log_every = 4
    config.train.eval_every = 10_000  # held-out numbers come from the experiment script
    config.train.checkpoint_every = 10_000  # the last step is always saved
    config.train.keep = 1
    config.train.async_checkpointing = False
    config.train.progress_bar = False
    config.required = ("train.init_from", "data.train_path", "data.tokenizer_dir", "train.workdir")
    return config
