"""The `sdar_jax` model of lm-evaluation-harness (lm-eval 0.4.x).

Importing this module registers the model with lm-eval's registry (lm-eval
0.4 has no plugin entry points, so something must import it first).
`python -m sdar_jax.eval.lm_eval_cli` (or `sdar-lm-eval` once sdar_jax is
pip installed) is lm-eval's own command line with the model registered; from
Python, `import sdar_jax.eval.lm_eval_backend` and then
`lm_eval.simple_evaluate(model="sdar_jax", ...)`.

Model arguments: `ckpt` (a params checkpoint directory), `tokenizer`
(default: the checkpoint directory), every decoding flag of
`launch/generate.py` under its `sdar_jax.decode.cli` name with `_` for `-`
(`mode`, `block_length`, `steps`, `strategy`, `threshold`, `eb_bound`,
`said_stages`, `said_rec_steps`, `said_threshold`, `chlg_threshold`,
`chlg_extra_steps`, `temperature`, `top_k`, `top_p`, `max_new_tokens` (the
default of requests that give no `max_gen_toks`), `stop_ids` (ints separated
by `;` or spaces)), validated by `DecodeConfig` (a bad value is a one-line
error), and `mc_samples` (Monte-Carlo samples of the diffusion ELBO, default
16), `num_buckets` (prompt-length buckets per generation group, default 3),
`seed`, `progress` and `mesh` (`AXIS:SIZE` pairs joined by `/`, e.g.
`fsdp:4/tensor:2`, over `data`, `fsdp`, `tensor`, `expert`; unnamed axes are 1
except `data`, which takes the remaining devices). lm-eval's `--batch_size`
is the decoder's batch (an integer; default 1); `--device` is not used (JAX
picks the devices: `JAX_PLATFORMS`, and `mesh` to use several).

Requests:
- `generate_until`: grouped by their generation settings (`max_gen_toks`,
  sampling), each group decoded by `sdar_jax.eval.runner.evaluate` (the
  batched jitted decoder, one compilation per prompt-length bucket; the same
  path as `launch/evaluate.py`); generation stops at the tokenizer's stop ids
  and the text is cut at the first of the request's `until` strings.
  `do_sample` / `temperature` / `top_p` / `top_k` of a request override the
  model arguments; any other generation key is an error.
- `loglikelihood` / `loglikelihood_rolling`: `sdar_jax.eval.loglikelihood`,
  exact teacher forcing in `mode=ar`, the Monte-Carlo ELBO in `mode=diffusion`
  (rolling windows as lm-eval's HF model makes them, over the model's
  `max_position_embeddings`).
- Chat: `--apply_chat_template` renders lm-eval's chat history with the
  tokenizer's template.

Decoding totals (TPF, forwards, generated tokens, tokens/s, decode and
compile seconds) are logged after each `generate_until` call and returned by
`get_model_info()`, which lm-eval writes into the results' `config`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator, Sequence

try:
    import lm_eval.models  # noqa: F401  lm-eval registers its own models only into an empty registry
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("sdar_jax's lm-eval backend needs lm-eval: pip install -e .[lm-eval] "
                      f"(importing it failed: {e})") from e

from sdar_jax import parallel
from sdar_jax.checkpoint import sharded_restore
from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.decode.cli import add_decoding_args, decode_config_from_args, resolve_stop_ids
from sdar_jax.decode.decoder import DecodeConfig
from sdar_jax.data.tokenizer import load_tokenizer
from sdar_jax.eval import loglikelihood, runner
from sdar_jax.model import transformer

MODEL_NAME = "sdar_jax"
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
# lm-eval's other names of max_gen_toks (normalize_gen_kwargs reads them).
_MAX_TOKENS_ALIASES = ("max_new_tokens", "max_tokens", "max_completion_tokens")

logger = logging.getLogger(__name__)


class ModelArgsError(ValueError):
    """A bad `--model_args` value; the message names the argument."""


def _decoding_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=MODEL_NAME, add_help=False, exit_on_error=False)
    add_decoding_args(parser)
    return parser


def decoding_arg_names() -> tuple[str, ...]:
    """The decoding model arguments: `sdar_jax.decode.cli`'s flags with `_` for `-`."""
    return tuple(a.dest for a in _decoding_parser()._actions if a.option_strings)


def _stop_ids_text(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return ",".join(str(value).strip("[]()").replace(";", " ").replace(",", " ").split())


def parse_decoding_args(values: dict[str, Any]) -> argparse.Namespace:
    """The decoding model arguments as `sdar_jax.decode.cli` flags would parse them.

    Args:
      values: model argument name -> value (lm-eval already made numbers of numeric strings).

    Returns:
      The Namespace of `add_decoding_args` (defaults for missing names).
    """
    parser = _decoding_parser()
    argv = []
    for name, value in values.items():
        if value is None:
            continue
        text = _stop_ids_text(value) if name == "stop_ids" else str(value)
        argv += ["--" + name.replace("_", "-"), text]
    try:
        args, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ModelArgsError(f"model argument {e.argument_name}: {e.message}") from e
    if rest:
        raise ModelArgsError(f"unexpected decoding arguments {rest}")
    return args


def parse_mesh(spec: str) -> parallel.ParallelConfig:
    """`fsdp:4/tensor:2` -> ParallelConfig(fsdp=4, tensor=2) (data left at its default, -1)."""
    sizes = {}
    for part in str(spec).split("/"):
        axis, sep, size = part.partition(":")
        if not sep or axis.strip() not in parallel.MESH_AXES:
            raise ModelArgsError(f"mesh={spec!r}: expected AXIS:SIZE pairs joined by '/', with AXIS "
                                 f"one of {parallel.MESH_AXES}; got {part!r}")
        try:
            sizes[axis.strip()] = int(size)
        except ValueError as e:
            raise ModelArgsError(f"mesh={spec!r}: size {size!r} of {axis} is not an integer") from e
    try:
        return parallel.ParallelConfig.from_mapping(sizes)
    except parallel.ParallelConfigError as e:
        raise ModelArgsError(f"mesh={spec!r}: {e}") from e


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any non-empty string of `until`."""
    cut = len(text)
    for stop in until:
        if stop:
            idx = text.find(stop)
            if idx >= 0:
                cut = min(cut, idx)
    return text[:cut]


@dataclasses.dataclass
class DecodeTotals:
    """Decoding counts summed over every `generate_until` call."""

    requests: int = 0
    generated_tokens: int = 0
    num_committed: int = 0
    num_forwards: int = 0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0

    def add(self, summary: dict[str, Any], requests: int) -> None:
        self.requests += requests
        self.generated_tokens += int(summary["generated_tokens"])
        self.num_committed += int(summary["num_committed"])
        self.num_forwards += int(summary["num_forwards"])
        self.decode_seconds += float(summary["decode_seconds"])
        self.compile_seconds += float(summary["compile_seconds"])

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "tpf": self.num_committed / max(self.num_forwards, 1),
            "tokens_per_second": (self.generated_tokens / self.decode_seconds
                                  if self.decode_seconds > 0 else float("nan")),
        }


@register_model(MODEL_NAME)
class SdarJaxLM(TemplateLM):
    """An sdar_jax params checkpoint as an lm-eval model (see the module docstring)."""

    def __init__(self, ckpt: str, tokenizer: str | None = None, *, mc_samples: int = 16,
                 num_buckets: int = 3, seed: int = 0, progress: bool = True,
                 mesh: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, device: str | None = None,
                 **decoding: Any) -> None:
        super().__init__()
        unknown = sorted(set(decoding) - set(decoding_arg_names()))
        if unknown:
            raise ModelArgsError(
                f"unknown model arguments {unknown}; expected ckpt, tokenizer, mc_samples, "
                f"num_buckets, seed, progress, mesh or a decoding argument {decoding_arg_names()}")
        self.batch_size = _positive_int("batch_size (--batch_size)", batch_size)
        del max_batch_size  # only meaningful with batch_size=auto, which is refused above
        # lm-eval always passes a torch device name (cuda:0 by default); JAX picks the devices
        # (JAX_PLATFORMS, and `mesh` for more than one).
        del device
        if not os.path.isdir(str(ckpt)):
            raise ModelArgsError(f"ckpt={ckpt!r}: no such directory (expected a params checkpoint)")
        # With a mesh the params are restored straight into their shardings, never whole.
        self.sharding_context = None
        self.mesh_spec = mesh
        if mesh is None:
            self.model_config, params = load_params_checkpoint(str(ckpt))
        else:
            pconfig = parse_mesh(mesh)
            try:
                setup = sharded_restore.setup_inference(str(ckpt), pconfig)
            except parallel.ParallelConfigError as e:
                raise ModelArgsError(f"mesh={mesh!r}: {e}") from e
            self.model_config, params, self.sharding_context = setup.config, setup.params, setup.context
        self.tokenizer = load_tokenizer(str(tokenizer or ckpt))
        self._tokenizer_dir = os.path.abspath(str(tokenizer or ckpt))
        args = parse_decoding_args(decoding)
        self.decode_config = decode_config_from_args(
            args, self.model_config, resolve_stop_ids(args, self.tokenizer, self.model_config))
        self.mc_samples = _positive_int("mc_samples", mc_samples)
        self.num_buckets = _positive_int("num_buckets", num_buckets)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.likelihood = loglikelihood.LikelihoodSettings(
            mode=self.decode_config.mode, block_length=self.decode_config.block_length,
            mc_samples=self.mc_samples, batch_size=self.batch_size, seed=self.seed)
        # Decoded and scored many times: the per-layer layout reads each weight in place.
        self.params = transformer.unstack_layers(params, free_stacked=True)
        self.totals = DecodeTotals()

    # ---- lm-eval's tokenizer interface ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model_config.eos_token_id
        if eos is None:
            raise ModelArgsError("the tokenizer and config.json name no eos token (lm-eval's "
                                 "end-of-text / empty-context prefix)")
        return eos

    @property
    def max_length(self) -> int:
        return self.model_config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_dir.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        del add_special_tokens, kwargs  # sdar_jax tokenizers add no special tokens
        return self.tokenizer.encode(string)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"sdar_jax": {
            "decode_config": dataclasses.asdict(self.decode_config),
            "mc_samples": self.mc_samples, "mesh": self.mesh_spec,
            "decode_totals": self.totals.as_dict(),
        }}

    @contextlib.contextmanager
    def _on_mesh(self) -> Iterator[None]:
        if self.sharding_context is None:
            yield
        else:
            with self.sharding_context.activate():
                yield

    # ---- requests --------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        del disable_tqdm, kwargs
        with self._on_mesh():
            scores = loglikelihood.score_requests(
                self.params, self.model_config, [(ctx, cont) for _, ctx, cont in requests],
                self.likelihood, pad_id=self._pad_id)
        results = []
        for (key, _, _), score in zip(requests, scores):
            result = (score.logprob, score.is_greedy)
            if key is not None:  # rolling windows are cached per string, not per window
                self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id,
                                                self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append((None, *window))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, self._loglikelihood_tokens(pairs, disable_tqdm)):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _request_decode_config(self, gen_kwargs: dict[str, Any]) -> tuple[DecodeConfig, list[str]]:
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS) - set(_MAX_TOKENS_ALIASES))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported by {MODEL_NAME}; "
                             f"expected some of {GENERATION_KEYS}")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.decode_config.max_new_tokens)
        changes: dict[str, Any] = {"max_new_tokens": int(kwargs["max_gen_toks"])}
        if "do_sample" in gen_kwargs or "temperature" in gen_kwargs:
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0
            if kwargs["do_sample"] and temperature == 0.0:
                raise ValueError(f"generation kwargs {gen_kwargs}: do_sample needs temperature > 0")
            changes["temperature"] = temperature
        for key in ("top_p", "top_k"):
            if key in kwargs:
                changes[key] = kwargs[key]
        try:
            config = dataclasses.replace(self.decode_config, **changes)
        except (TypeError, ValueError) as e:
            raise ValueError(f"generation kwargs {gen_kwargs}: {e}") from e
        return config, [str(u) for u in kwargs["until"]]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[DecodeConfig, list[int]] = {}
        untils = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            config, until = self._request_decode_config(dict(gen_kwargs))
            groups.setdefault(config, []).append(i)
            untils.append(until)
        outputs: list[str | None] = [None] * len(requests)
        settings = runner.EvalSettings(
            style="exact", batch_size=self.batch_size, num_buckets=self.num_buckets, chat=False,
            seed=self.seed, progress=self.progress and not disable_tqdm)
        for config, members in groups.items():
            # The runner scores each text against `answer`; lm-eval does its own scoring.
            examples = [{"prompt": requests[i].args[0], "answer": ""} for i in members]
            with self._on_mesh():
                result = runner.evaluate(self.params, self.model_config, self.tokenizer, examples,
                                         config, settings)
            self.totals.add(result.summary, len(members))
            for i, record in zip(members, result.records):
                text = cut_at_stop_strings(record["samples"][0]["text"], untils[i])
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        totals = self.totals.as_dict()
        logger.info("%s decode totals: requests=%d TPF=%.3f forwards=%d generated_tokens=%d "
                    "tokens/s=%.1f decode=%.2fs compile=%.2fs", MODEL_NAME, totals["requests"],
                    totals["tpf"], totals["num_forwards"], totals["generated_tokens"],
                    totals["tokens_per_second"], totals["decode_seconds"], totals["compile_seconds"])
        return outputs

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelArgsError(f"{name} must be an integer >= 1, got {value!r}")
    return value
