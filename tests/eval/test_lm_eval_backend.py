"""The `sdar_jax` lm-eval backend: the real `lm_eval` CLI equals launch/evaluate.py; requests and errors.

Skipped when lm-eval is not installed (`pip install -e .[lm-eval]`; .ci/run installs it).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[lm-eval])")

from lm_eval.api.instance import Instance  # noqa: E402

from sdar_jax.checkpoint.params import save_params_checkpoint  # noqa: E402
from sdar_jax.config import get_preset  # noqa: E402
from sdar_jax.data import tasks  # noqa: E402
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR  # noqa: E402
from sdar_jax.eval import lm_eval_backend, loglikelihood  # noqa: E402
from sdar_jax.model import transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS_DIR = os.path.join(ROOT, "sdar_jax", "eval", "lm_eval_tasks")
DOC_IDS = [0, 1, 100, 101, 200, 201, 300, 301]  # two problems of each task, several prompt lengths
DECODING = {"block_length": 4, "steps": 4, "threshold": 0.9, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny SDAR checkpoint whose (sharpened) weights give prompt-dependent outputs."""
    cfg = get_preset("tiny", vocab_size=103, num_layers=1, mask_token_id=4, eos_token_id=1,
                     bos_token_id=1, max_position_embeddings=128)
    params = transformer.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
    path = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    save_params_checkpoint(path, cfg, params, aux_dir=CHAR_TOKENIZER_DIR)
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    return lm_eval_backend.SdarJaxLM(ckpt=str(ckpt), batch_size=4, progress=False, **DECODING)


def _load_evaluate_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli_lm_eval",
                                                  os.path.join(ROOT, "launch", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the real lm_eval entry point against launch/evaluate.py ---------------------------------------

@pytest.mark.slow
def test_lm_eval_cli_on_the_local_task_equals_evaluate_py(ckpt, tmp_path):
    model_args = ",".join([f"ckpt={ckpt}", "progress=false"] + [f"{k}={v}" for k, v in DECODING.items()])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [sys.executable, "-m", "sdar_jax.eval.lm_eval_cli", "--model", "sdar_jax",
         "--model_args", model_args, "--tasks", "sdar_tasks", "--include_path", TASKS_DIR,
         "--apply_chat_template", "--batch_size", "4",
         "--samples", json.dumps({"sdar_tasks": DOC_IDS}),
         "--log_samples", "--output_path", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sdar_jax decode totals: requests=8 TPF=" in proc.stderr  # reported beside the table
    (results_path,) = glob.glob(str(out / "*" / "results_*.json"))
    (samples_path,) = glob.glob(str(out / "*" / "samples_sdar_tasks_*.jsonl"))
    results = json.loads(open(results_path).read())
    lm_samples = {s["doc_id"]: s for s in map(json.loads, open(samples_path))}
    totals = results["config"]["sdar_jax"]["decode_totals"]
    assert totals["requests"] == len(DOC_IDS) and totals["num_forwards"] > 0

    split = tasks.load_split("test")
    data = tmp_path / "docs.jsonl"
    tasks.write_jsonl(data, [split[i] for i in DOC_IDS])
    evaluate_out = tmp_path / "evaluate.jsonl"
    cli = _load_evaluate_cli()
    rc = cli.main(["--ckpt", str(ckpt), "--data", str(data), "--chat", "--batch-size", "4",
                   "--output", str(evaluate_out), "--no-progress"]
                  + [f"--{k.replace('_', '-')}={v}" for k, v in DECODING.items()])
    assert rc == 0
    records = [json.loads(line) for line in evaluate_out.read_text().splitlines()]
    summary = json.loads((tmp_path / "evaluate.summary.json").read_text())

    texts = [r["samples"][0]["text"] for r in records]
    assert len(set(texts)) > 1  # the outputs depend on the prompt, so equality below is a check
    assert [lm_samples[i]["filtered_resps"][0] for i in DOC_IDS] == texts
    assert [lm_samples[i]["acc"] for i in DOC_IDS] == [float(r["samples"][0]["correct"]) for r in records]
    assert results["results"]["sdar_tasks"]["acc,none"] == pytest.approx(summary["accuracy"])
    # The same decoding work: forwards and committed positions of each row are the runner's.
    assert totals["num_forwards"] == summary["num_forwards"]
    assert totals["generated_tokens"] == summary["generated_tokens"]


def test_task_grading_is_evaluate_py_grading():
    spec = importlib.util.spec_from_file_location("sdar_tasks_utils", os.path.join(TASKS_DIR, "utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    split = utils.load_test_split(ckpt="ignored")["test"]
    assert len(split) == 400 and split[0] == tasks.load_split("test")[0]
    for doc in split.select(DOC_IDS):
        assert utils.process_results(doc, [doc["response"]]) == {"acc": 1.0}
        assert utils.process_results(doc, ["#### 1" + doc["answer"]]) == {"acc": 0.0}


# ---- requests ----------------------------------------------------------------------------------------

def _generate(lm, prompts, gen_kwargs):
    return lm.generate_until([Instance("generate_until", {}, (p, dict(gen_kwargs)), i)
                              for i, p in enumerate(prompts)])


def test_generate_until_cuts_at_until_and_groups_by_settings(lm):
    prompts = ["12+34=?", "5+6=?", "sort 3 1 2"]
    full = _generate(lm, prompts, {"until": [], "max_gen_toks": 8})
    assert all(full)
    stop = full[0][2:4]
    cut = _generate(lm, prompts, {"until": [stop], "max_gen_toks": 8})
    assert cut == [t[:t.find(stop)] if stop in t else t for t in full]
    # Two generation lengths in one call: two groups, each decoded as alone.
    mixed = lm.generate_until([
        Instance("generate_until", {}, (prompts[0], {"until": [], "max_gen_toks": 4}), 0),
        Instance("generate_until", {}, (prompts[1], {"until": [], "max_gen_toks": 8}), 1)])
    assert mixed == [_generate(lm, prompts[:1], {"until": [], "max_gen_toks": 4})[0], full[1]]
    assert lm.get_model_info()["sdar_jax"]["decode_totals"]["requests"] == 3 + 3 + 2 + 1


def test_generate_until_rejects_unknown_and_contradictory_settings(lm):
    with pytest.raises(ValueError, match="num_beams"):
        _generate(lm, ["1+1=?"], {"until": [], "num_beams": 4})
    with pytest.raises(ValueError, match="do_sample needs temperature > 0"):
        _generate(lm, ["1+1=?"], {"until": [], "do_sample": True, "temperature": 0.0})
    with pytest.raises(ValueError, match="top_p"):
        _generate(lm, ["1+1=?"], {"until": [], "do_sample": True, "temperature": 1.0, "top_p": 1.5})


def test_chat_template_is_the_tokenizers(lm):
    history = [{"role": "user", "content": "12+34=?"}]
    assert lm.apply_chat_template(history) == lm.tokenizer.apply_chat_template(
        history, add_generation_prompt=True)
    assert lm.chat_template(True) == lm.tokenizer.chat_template


def test_loglikelihood_requests_are_the_scorers(ckpt, lm):
    requests = [("12+34=", "46"), ("", "5+6=11"), ("sort 3 1 2 ", "1 2 3")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    pairs = []
    for context, continuation in requests:
        if context:
            whole = lm.tok_encode(context + continuation)
            ctx = lm.tok_encode(context.rstrip())
            pairs.append((ctx, whole[len(ctx):]))
        else:
            pairs.append(([lm.eot_token_id], lm.tok_encode(continuation)))
    expected = loglikelihood.score_requests(lm.params, lm.model_config, pairs, lm.likelihood)
    np.testing.assert_allclose([g[0] for g in got], [e.logprob for e in expected], rtol=1e-6)
    assert [g[1] for g in got] == [e.is_greedy for e in expected]
    assert all(lp < 0 for lp, _ in got)


def test_loglikelihood_rolling_in_ar_mode_is_the_whole_string(ckpt):
    ar = lm_eval_backend.SdarJaxLM(ckpt=str(ckpt), mode="ar", batch_size=2, progress=False)
    text = "12+34=46"
    (rolling,) = ar.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = ar.tok_encode(text)
    (expected,) = loglikelihood.score_requests(ar.params, ar.model_config, [([ar.eot_token_id], ids)],
                                               ar.likelihood)
    assert rolling == pytest.approx(expected.logprob, rel=1e-6)


# ---- model arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1.5}, "threshold must be in"),
    ({"threshold": "high"}, "model argument --threshold: invalid float value: 'high'"),
    ({"strategy": "fastest"}, "unknown strategy 'fastest'"),
    ({"blocklength": 4}, "unknown model arguments \\['blocklength'\\]"),
    ({"batch_size": "auto"}, "batch_size \\(--batch_size\\) must be an integer >= 1, got 'auto'"),
    ({"mesh": "fsdp=2"}, "mesh='fsdp=2': expected AXIS:SIZE pairs"),
    ({"mesh": "fsdp:3"}, "mesh='fsdp:3'"),
])
def test_bad_model_args_are_one_line_errors(ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        lm_eval_backend.SdarJaxLM(ckpt=str(ckpt), **kwargs)
    assert "\n" not in str(info.value)


def test_every_decoding_flag_is_a_model_argument(ckpt):
    lm = lm_eval_backend.SdarJaxLM(
        ckpt=str(ckpt), mode="diffusion", block_length=4, steps=2, strategy="said", said_stages=2,
        said_rec_steps=1, said_threshold=0.8, chlg_threshold=0.7, chlg_extra_steps=2, eb_bound=0.2,
        threshold=0.5, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=12, stop_ids="1;3")
    dc = lm.decode_config
    assert (dc.steps, dc.strategy, dc.said_threshold, dc.chlg_extra_steps, dc.top_k, dc.top_p,
            dc.max_new_tokens, dc.stop_ids) == (2, "said", 0.8, 2, 5, 0.9, 12, (1, 3))
    assert set(lm_eval_backend.decoding_arg_names()) >= {"block_length", "eb_bound", "stop_ids"}


@pytest.mark.slow
def test_sharded_generation_and_scores_equal_unsharded(ckpt, lm):
    sharded = lm_eval_backend.SdarJaxLM(ckpt=str(ckpt), batch_size=4, progress=False,
                                        mesh="fsdp:2/tensor:2", **DECODING)
    assert sharded.sharding_context.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    prompts = ["12+34=?", "5+6=?", "sort 3 1 2"]
    gen = {"until": [], "max_gen_toks": 8}
    assert _generate(sharded, prompts, gen) == _generate(lm, prompts, gen)
    reqs = [Instance("loglikelihood", {}, ("12+34=", "46"), 0)]
    np.testing.assert_allclose(sharded.loglikelihood(reqs)[0][0], lm.loglikelihood(reqs)[0][0], rtol=1e-5)
