"""Hugging Face safetensors checkpoints <-> sdar_jax parameter checkpoints.

The mapping is a table of per-tensor rules (`tensor_rules`): each rule names
one family of Hugging Face tensors (`model.layers.{layer}.self_attn.q_proj.weight`),
the sdar_jax parameter it fills (`layers/self_attn/q_proj/kernel`), and the
shapes on both sides. A rule whose name holds `{layer}` (and `{expert}`) fills
one slice of a parameter stacked over the leading `[layers]` (and `[experts]`)
axes. Hugging Face linear weights are `[out, in]`; rules with
`transpose=True` turn them into `[in, out]` and reshape the result, e.g.
q_proj `[heads * head_dim, hidden]` -> `[hidden, heads, head_dim]`.

To support new tensor names (another family, another MLP), add a builder to
`tensor_rules`; reading, checking, stacking and writing follow from the table.

Conversion streams: every tensor is read on its own (`safetensors.safe_open`)
and written into a preallocated stacked numpy array, so the peak is about one
copy of the output plus one tensor. Every header is checked against the
config before any data is read, and all mismatches are reported in one
`ConversionError`. Outputs are written under a temporary name in the target's
parent directory and renamed at the end, so a failure leaves nothing behind.

A params checkpoint (what `hf_to_jax` writes) is a directory with
`config.json` (`sdar_jax.config.to_hf_config`), an orbax checkpoint of the
param pytree under `params/`, and the source's tokenizer files, if any.

This module needs numpy, ml_dtypes, safetensors and orbax only (no torch,
no transformers, no Flax).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safe_open can read BF16)
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open
from safetensors.numpy import save_file

from sdar_jax.config import ModelConfig, load_hf_config, to_hf_config

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tokenizer and generation files copied along with the weights (both directions).
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
)
# Tensors some checkpoints carry that hold no parameters (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# safetensors dtype codes accepted as input, and the numpy dtypes we write.
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class ConversionError(ValueError):
    """The input checkpoint does not match what the config describes, or is unreadable."""


# ---------------------------------------------------------------------------
# The rule table


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One family of Hugging Face tensors and the sdar_jax parameter it fills.

    Attributes:
      hf_name: the tensor name, with `{layer}` / `{expert}` placeholders for
        tensors stacked over layers / experts.
      path: the parameter's path in the sdar_jax param tree.
      hf_shape: the shape of one Hugging Face tensor.
      param_shape: the shape of one slice of the parameter (without the
        stacked axes).
      transpose: True for linear weights (`[out, in]` in Hugging Face): the
        tensor is transposed before it is reshaped to `param_shape`.
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    transpose: bool = False

    def __post_init__(self) -> None:
        if math.prod(self.hf_shape) != math.prod(self.param_shape):
            raise ValueError(f"rule {self.hf_name}: {self.hf_shape} and {self.param_shape} differ in size")

    def stack_axes(self, config: ModelConfig) -> tuple[tuple[str, int], ...]:
        """The stacked axes (placeholder, length), outermost first."""
        axes = []
        if "{layer}" in self.hf_name:
            axes.append(("layer", config.num_layers))
        if "{expert}" in self.hf_name:
            axes.append(("expert", config.num_experts))
        return tuple(axes)

    def full_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """The shape of the whole (stacked) parameter."""
        return tuple(n for _, n in self.stack_axes(config)) + self.param_shape

    def instances(self, config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Yields (tensor name, index into the stacked parameter) for every tensor."""
        axes = self.stack_axes(config)
        for index in np.ndindex(*(n for _, n in axes)):
            names = {axis: i for (axis, _), i in zip(axes, index)}
            yield self.hf_name.format(**names), tuple(int(i) for i in index)

    def to_param(self, tensor: np.ndarray) -> np.ndarray:
        """One Hugging Face tensor [hf_shape] -> one parameter slice [param_shape]."""
        return (tensor.T if self.transpose else tensor).reshape(self.param_shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """One parameter slice [param_shape] -> one Hugging Face tensor [hf_shape]."""
        if self.transpose:
            return value.reshape(self.hf_shape[::-1]).T
        return value.reshape(self.hf_shape)


def _linear(hf_name: str, path: tuple[str, ...], out_shape: tuple[int, ...],
            in_shape: tuple[int, ...]) -> TensorRule:
    """An HF Linear weight [prod(out), prod(in)] -> kernel [*in, *out]."""
    return TensorRule(
        hf_name, path + ("kernel",), (math.prod(out_shape), math.prod(in_shape)),
        in_shape + out_shape, transpose=True,
    )


def _norm(hf_name: str, path: tuple[str, ...], size: int) -> TensorRule:
    return TensorRule(hf_name, path + ("scale",), (size,), (size,))


def _embedding_rules(cfg: ModelConfig) -> list[TensorRule]:
    shape = (cfg.vocab_size, cfg.hidden_size)
    rules = [
        TensorRule("model.embed_tokens.weight", ("embed_tokens", "embedding"), shape, shape),
        _norm("model.norm.weight", ("norm",), cfg.hidden_size),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(_linear("lm_head.weight", ("lm_head",), (cfg.vocab_size,), (cfg.hidden_size,)))
    return rules


def _attention_rules(cfg: ModelConfig) -> list[TensorRule]:
    pre, path = "model.layers.{layer}.", ("layers", "self_attn")
    hidden, d = (cfg.hidden_size,), cfg.head_dim
    rules = [
        _norm(pre + "input_layernorm.weight", ("layers", "input_layernorm"), cfg.hidden_size),
        _norm(pre + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm"),
              cfg.hidden_size),
        _linear(pre + "self_attn.q_proj.weight", path + ("q_proj",), (cfg.num_heads, d), hidden),
        _linear(pre + "self_attn.k_proj.weight", path + ("k_proj",), (cfg.num_kv_heads, d), hidden),
        _linear(pre + "self_attn.v_proj.weight", path + ("v_proj",), (cfg.num_kv_heads, d), hidden),
        _linear(pre + "self_attn.o_proj.weight", path + ("o_proj",), hidden, (cfg.num_heads, d)),
    ]
    if cfg.qk_norm:
        rules += [
            _norm(pre + "self_attn.q_norm.weight", path + ("q_norm",), d),
            _norm(pre + "self_attn.k_norm.weight", path + ("k_norm",), d),
        ]
    return rules


def _dense_mlp_rules(cfg: ModelConfig) -> list[TensorRule]:
    pre, path = "model.layers.{layer}.mlp.", ("layers", "mlp")
    hidden, mlp = (cfg.hidden_size,), (cfg.intermediate_size,)
    return [
        _linear(pre + "gate_proj.weight", path + ("gate_proj",), mlp, hidden),
        _linear(pre + "up_proj.weight", path + ("up_proj",), mlp, hidden),
        _linear(pre + "down_proj.weight", path + ("down_proj",), hidden, mlp),
    ]


def _moe_mlp_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Qwen3-MoE as saved on disk: a router `mlp.gate` [experts, hidden] and
    per-expert SwiGLU weights (transformers 5 fuses them only in memory)."""
    pre, path = "model.layers.{layer}.mlp.", ("layers", "mlp")
    hidden, mlp = (cfg.hidden_size,), (cfg.moe_intermediate_size,)
    expert = pre + "experts.{expert}."
    return [
        _linear(pre + "gate.weight", path + ("router",), (cfg.num_experts,), hidden),
        _linear(expert + "gate_proj.weight", path + ("gate_proj",), mlp, hidden),
        _linear(expert + "up_proj.weight", path + ("up_proj",), mlp, hidden),
        _linear(expert + "down_proj.weight", path + ("down_proj",), hidden, mlp),
    ]


def tensor_rules(config: ModelConfig) -> tuple[TensorRule, ...]:
    """Every tensor of a Hugging Face checkpoint of `config`, as rules.

    Param tree: embed_tokens/embedding [vocab, hidden]; norm/scale [hidden];
    lm_head/kernel [hidden, vocab] (untied only); layers/... stacked on a
    leading [layers] axis: {input,post_attention}_layernorm/scale [L, hidden],
    self_attn/q_proj/kernel [L, hidden, heads, head_dim], k_proj, v_proj
    [L, hidden, kv_heads, head_dim], o_proj [L, heads, head_dim, hidden],
    q_norm, k_norm /scale [L, head_dim] (qk_norm only); dense mlp/{gate,up}_proj
    [L, hidden, mlp], down_proj [L, mlp, hidden]; MoE mlp/router/kernel
    [L, hidden, experts], mlp/{gate,up}_proj [L, experts, hidden, moe_mlp],
    down_proj [L, experts, moe_mlp, hidden].
    """
    mlp = _moe_mlp_rules(config) if config.is_moe else _dense_mlp_rules(config)
    rules = tuple(_embedding_rules(config) + _attention_rules(config) + mlp)
    paths = [r.path for r in rules]
    if len(set(paths)) != len(paths):
        raise ValueError(f"tensor_rules: two rules fill the same parameter in {paths}")
    return rules


def param_shapes(config: ModelConfig) -> dict:
    """The param tree of `config` with shape tuples as leaves (from the rules)."""
    tree: dict = {}
    for rule in tensor_rules(config):
        _set_path(tree, rule.path, rule.full_shape(config))
    return tree


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise ConversionError(f"params have no entry {'/'.join(path)}")
        tree = tree[key]
    return tree


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for "float32" or "bfloat16" (bfloat16 from ml_dtypes)."""
    if name not in NUMPY_DTYPES:
        raise ConversionError(f"dtype {name!r} is not supported; expected one of {tuple(NUMPY_DTYPES)}")
    return NUMPY_DTYPES[name]


# ---------------------------------------------------------------------------
# Reading a Hugging Face directory


def _pickle_message(path: str) -> str:
    return (
        f"{path}: PyTorch pickle checkpoints (.bin/.pt/.pth/.ckpt) are refused: unpickling can run "
        "arbitrary code and cannot be streamed. Convert it to safetensors first, e.g. "
        "`transformers.AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
        "safe_serialization=True)` in a trusted environment, or download the model's "
        "*.safetensors files."
    )


def find_safetensors(hf_dir: str | os.PathLike) -> dict[str, str]:
    """Maps every tensor name to the safetensors file holding it.

    Reads `model.safetensors.index.json` when present, else every
    `*.safetensors` file in the directory.

    Raises:
      ConversionError: the directory or a listed shard is missing, only pickle
        files are present, or a tensor appears in two files.
    """
    hf_dir = os.fspath(hf_dir)
    if os.path.isfile(hf_dir) and hf_dir.endswith(PICKLE_SUFFIXES):
        raise ConversionError(_pickle_message(hf_dir))
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    entries = sorted(os.listdir(hf_dir))
    index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index_path}: not a safetensors index ({e!r})") from e
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(hf_dir, f))})
        if missing:
            raise ConversionError(f"{index_path}: lists shard files that do not exist: {missing}")
        return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    files = [e for e in entries if e.endswith(".safetensors")]
    if not files:
        pickles = [e for e in entries if e.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ConversionError(_pickle_message(os.path.join(hf_dir, pickles[0])))
        raise ConversionError(f"{hf_dir}: no *.safetensors files and no {SAFETENSORS_INDEX}")
    located: dict[str, str] = {}
    for file in files:
        path = os.path.join(hf_dir, file)
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if name in located:
                    raise ConversionError(f"tensor {name!r} appears in both {located[name]} and {path}")
                located[name] = path
    return located


@dataclasses.dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...


def _read_headers(located: Mapping[str, str]) -> dict[str, _Header]:
    headers: dict[str, _Header] = {}
    by_file: dict[str, list[str]] = {}
    for name, path in located.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="numpy") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ConversionError(f"{path}: the index lists tensor {name!r}, the file lacks it")
                sl = f.get_slice(name)
                headers[name] = _Header(tuple(sl.get_shape()), sl.get_dtype())
    return headers


def check_tensors(config: ModelConfig, headers: Mapping[str, Any]) -> list[str]:
    """Every mismatch between the tensors present and what `config` needs.

    Args:
      config: the model config.
      headers: tensor name -> object with `.shape` (tuple) and `.dtype`
        (safetensors code, e.g. "BF16").

    Returns:
      One line per problem (missing, unexpected, wrong shape, unsupported
      dtype), sorted by kind then name; empty when everything matches.
    """
    expected: dict[str, TensorRule] = {}
    for rule in tensor_rules(config):
        for name, _ in rule.instances(config):
            expected[name] = rule
    problems = []
    for name in sorted(expected.keys() - headers.keys()):
        problems.append(f"missing tensor {name} (shape {list(expected[name].hf_shape)})")
    for name in sorted(headers.keys() - expected.keys()):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a stored copy of the tied embedding; checked to be equal when read
        problems.append(f"unexpected tensor {name} (shape {list(headers[name].shape)})")
    want_shapes = {name: rule.hf_shape for name, rule in expected.items() if name in headers}
    if config.tie_word_embeddings and "lm_head.weight" in headers:
        want_shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for name, want in sorted(want_shapes.items()):
        header = headers[name]
        if tuple(header.shape) != tuple(want):
            problems.append(f"wrong shape for {name}: got {list(header.shape)}, expected {list(want)}")
        if header.dtype not in FLOAT_DTYPES:
            problems.append(
                f"unsupported dtype for {name}: got {header.dtype}, expected one of {FLOAT_DTYPES}"
            )
    return problems


def _default_dtype(headers: Mapping[str, _Header]) -> str:
    dtypes = {h.dtype for h in headers.values()}
    return "bfloat16" if dtypes == {"BF16"} else "float32"


def hf_to_params(hf_dir: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face safetensors directory into sdar_jax params.

    Args:
      hf_dir: a directory with `config.json` and `model.safetensors` or
        shards with `model.safetensors.index.json`.
      dtype: "float32" or "bfloat16" for the params; None keeps bfloat16 when
        every tensor is BF16 and uses float32 otherwise.

    Returns:
      (config with param_dtype set, param tree of numpy arrays in the stacked
      layout of `tensor_rules`).

    Raises:
      ConversionError: listing every missing, unexpected, misshapen or
        wrongly typed tensor, or naming the unreadable input.
    """
    hf_dir = os.fspath(hf_dir)
    located = find_safetensors(hf_dir)
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ConversionError(f"{hf_dir}: no {CONFIG_FILE}")
    headers = _read_headers(located)
    dtype = dtype or _default_dtype(headers)
    out_dtype = numpy_dtype(dtype)
    config = load_hf_config(config_path, param_dtype=dtype)
    problems = check_tensors(config, headers)
    if problems:
        raise ConversionError(
            f"{hf_dir}: {len(problems)} tensor(s) do not match {config_path}:\n  " + "\n  ".join(problems)
        )

    rules = tensor_rules(config)
    params: dict = {}
    targets: dict[str, tuple[np.ndarray, TensorRule, tuple[int, ...]]] = {}
    for rule in rules:
        array = np.empty(rule.full_shape(config), out_dtype)
        _set_path(params, rule.path, array)
        for name, index in rule.instances(config):
            targets[name] = (array, rule, index)
    by_file: dict[str, list[str]] = {}
    for name in targets:
        by_file.setdefault(located[name], []).append(name)
    for path, names in sorted(by_file.items()):
        with safe_open(path, framework="numpy") as f:
            for name in names:
                array, rule, index = targets[name]
                array[index] = rule.to_param(f.get_tensor(name))
    if config.tie_word_embeddings and "lm_head.weight" in located:
        with safe_open(located["lm_head.weight"], framework="numpy") as f:
            head = f.get_tensor("lm_head.weight").astype(out_dtype)
        if not np.array_equal(head, params["embed_tokens"]["embedding"]):
            raise ConversionError(
                f"{hf_dir}: config ties the embeddings but lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
    return config, params


# ---------------------------------------------------------------------------
# Writing a Hugging Face directory


def _plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_safetensors(
    out_dir: str,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    dtype: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes tensors as Hugging Face safetensors into an existing directory.

    One `model.safetensors` when everything fits in `max_shard_bytes`, else
    `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
    Tensors are produced one at a time, in order; peak extra memory is one shard.

    Args:
      out_dir: the directory to write into.
      tensors: (name, shape) of every tensor, in file order.
      produce: name -> the tensor's values (any float dtype, that shape).
      dtype: "float32" or "bfloat16", the dtype written.
      max_shard_bytes: the largest shard (a larger single tensor gets its own).
    """
    out_dtype = numpy_dtype(dtype)
    shapes = dict(tensors)
    sizes = [(name, math.prod(shape) * out_dtype.itemsize) for name, shape in tensors]
    shards = _plan_shards(sizes, max_shard_bytes)
    file_names = (
        [SAFETENSORS_SINGLE] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file_name, names in zip(file_names, shards):
        arrays = {}
        for name in names:
            value = np.asarray(produce(name))
            if tuple(value.shape) != tuple(shapes[name]):
                raise ConversionError(f"tensor {name} has shape {list(value.shape)}, expected {list(shapes[name])}")
            arrays[name] = np.ascontiguousarray(value.astype(out_dtype))
            weight_map[name] = file_name
        save_file(arrays, os.path.join(out_dir, file_name), metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def write_hf_weights(
    out_dir: str, config: ModelConfig, params: Mapping, dtype: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes params as Hugging Face safetensors (see write_safetensors)."""
    slices: dict[str, tuple[TensorRule, Any, tuple[int, ...]]] = {}
    for rule in tensor_rules(config):
        value = _get_path(params, rule.path)
        if tuple(value.shape) != rule.full_shape(config):
            raise ConversionError(
                f"param {'/'.join(rule.path)} has shape {list(value.shape)}, "
                f"expected {list(rule.full_shape(config))}"
            )
        for name, index in rule.instances(config):
            slices[name] = (rule, value, index)

    def produce(name: str) -> np.ndarray:
        rule, value, index = slices[name]
        return rule.to_hf(np.asarray(value[index]))

    tensors = [(name, rule.hf_shape) for name, (rule, _, _) in slices.items()]
    write_safetensors(out_dir, tensors, produce, dtype, max_shard_bytes)


# ---------------------------------------------------------------------------
# Atomic output directories


class AtomicDir:
    """Context manager: a temporary directory next to `target`, renamed to
    `target` on success and removed on failure (no half-written outputs).

    `with AtomicDir(out) as tmp:` yields the temporary path to write into.
    An existing `target` is refused unless `overwrite`.
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = os.path.abspath(os.fspath(target))
        self.overwrite = overwrite
        self.path = ""

    def __enter__(self) -> str:
        if os.path.exists(self.target) and not self.overwrite:
            raise ConversionError(f"{self.target}: already exists (choose a new output directory)")
        parent = os.path.dirname(self.target)
        if not os.path.isdir(parent):
            raise ConversionError(f"{parent}: output's parent directory does not exist")
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        os.chmod(self.path, 0o755)
        if os.path.exists(self.target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.old-",
                                   dir=os.path.dirname(self.target))
            os.rename(self.target, os.path.join(old, "out"))
            os.rename(self.path, self.target)
            shutil.rmtree(old)
        else:
            os.rename(self.path, self.target)


def copy_aux_files(src_dir: str, dst_dir: str) -> None:
    for name in AUX_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))


def _write_config(out_dir: str, config: ModelConfig) -> None:
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(to_hf_config(config), f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------
# Params checkpoints (orbax)


def _params_dtype(params: Mapping) -> str:
    dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    for name, dt in NUMPY_DTYPES.items():
        if dtypes == {dt}:
            return name
    raise ConversionError(f"params mix or use unsupported dtypes {sorted(map(str, dtypes))}; "
                          f"expected all {tuple(NUMPY_DTYPES)[0]} or all {tuple(NUMPY_DTYPES)[1]}")


def _write_params(out_dir: str, config: ModelConfig, params: Mapping) -> None:
    _write_config(out_dir, config)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, PARAMS_SUBDIR), params)
        ckptr.wait_until_finished()


def _check_param_shapes(config: ModelConfig, params_or_shapes: Mapping, source: str) -> None:
    want = _flatten(param_shapes(config))
    got = {path: tuple(leaf.shape) for path, leaf in _flatten(params_or_shapes).items()}
    problems = [f"missing param {'/'.join(p)} {list(want[p])}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected param {'/'.join(p)} {list(got[p])}" for p in sorted(got.keys() - want.keys())]
    problems += [
        f"wrong shape for {'/'.join(p)}: got {list(got[p])}, expected {list(want[p])}"
        for p in sorted(want.keys() & got.keys()) if got[p] != want[p]
    ]
    if problems:
        raise ConversionError(f"{source}: params do not match the config:\n  " + "\n  ".join(problems))


def save_params_checkpoint(
    out_dir: str | os.PathLike, config: ModelConfig, params: Mapping, *, overwrite: bool = False,
    aux_dir: str | os.PathLike | None = None,
) -> None:
    """Writes `config.json` + an orbax checkpoint of `params` under `params/`.

    Args:
      out_dir: the checkpoint directory to create (must not exist unless
        `overwrite`); written under a temporary name and renamed at the end.
      config: the model config; its param_dtype is set from the params.
      params: the param tree (numpy or jax arrays, possibly sharded), all
        float32 or all bfloat16, shaped as `param_shapes(config)`.
      overwrite: replace an existing `out_dir`.
      aux_dir: a directory whose tokenizer/generation files (AUX_FILES) are
        copied along.
    """
    _check_param_shapes(config, params, "save_params_checkpoint")
    config = config.replace(param_dtype=_params_dtype(params))
    if jax.process_count() > 1:
        _save_params_multihost(out_dir, config, params, overwrite, aux_dir)
        return
    with AtomicDir(out_dir, overwrite) as tmp:
        _write_params(tmp, config, params)
        if aux_dir is not None:
            copy_aux_files(os.fspath(aux_dir), tmp)


def _save_params_multihost(
    out_dir: str | os.PathLike, config: ModelConfig, params: Mapping, overwrite: bool,
    aux_dir: str | os.PathLike | None,
) -> None:
    """`save_params_checkpoint` when several processes hold the params' shards.

    Every process must write into the same directory (orbax saves each
    process's shards and waits for all of them), so the temporary directory
    has a fixed name; process 0 creates it, writes config.json and the aux
    files, and renames it once every process's shards are written.
    """
    from jax.experimental import multihost_utils

    target = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(target) and not overwrite:  # checked on every process: all raise together
        raise ConversionError(f"{target}: already exists (choose a new output directory)")
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-multihost")
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_config(tmp, config)
        if aux_dir is not None:
            copy_aux_files(os.fspath(aux_dir), tmp)
    multihost_utils.sync_global_devices(f"save_params_checkpoint {target}: directory made")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, PARAMS_SUBDIR), params)
        ckptr.wait_until_finished()
    multihost_utils.sync_global_devices(f"save_params_checkpoint {target}: params written")
    if primary:
        os.chmod(tmp, 0o755)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    multihost_utils.sync_global_devices(f"save_params_checkpoint {target}: renamed")


def load_params_checkpoint(
    ckpt_dir: str | os.PathLike, dtype: str | None = None, shardings: Any = None,
) -> tuple[ModelConfig, dict]:
    """Reads a params checkpoint written by `save_params_checkpoint`.

    Args:
      ckpt_dir: the checkpoint directory.
      dtype: cast the params to "float32" / "bfloat16" while restoring; None
        keeps the stored dtype.
      shardings: a pytree like the params whose leaves are
        `jax.sharding.Sharding`s (e.g. NamedSharding): every array is restored
        directly with its sharding. None puts everything on the first local
        device.

    Returns:
      (config with param_dtype set to the restored dtype, params of jax arrays).
    """
    ckpt_dir = os.fspath(ckpt_dir)
    params_dir = os.path.join(os.path.abspath(ckpt_dir), PARAMS_SUBDIR)
    if not os.path.isdir(params_dir):
        raise ConversionError(f"{ckpt_dir}: not a params checkpoint (no {PARAMS_SUBDIR}/ directory)")
    config = load_hf_config(ckpt_dir)
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(params_dir)
        # orbax >= 0.11 wraps the tree in StepMetadata.item_metadata; older returns it directly.
        stored = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        _check_param_shapes(config, stored, ckpt_dir)
        stored_dtype = _params_dtype(stored)
        dtype = dtype or stored_dtype
        target_dtype = numpy_dtype(dtype)
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, stored)
        elif jax.tree.structure(shardings) != jax.tree.structure(stored):
            raise ConversionError(
                f"{ckpt_dir}: shardings tree {jax.tree.structure(shardings)} does not match the "
                f"stored params {jax.tree.structure(stored)}"
            )
        target = jax.tree.map(
            lambda meta, sharding: jax.ShapeDtypeStruct(meta.shape, target_dtype, sharding=sharding),
            stored, shardings,
        )
        params = ckptr.restore(params_dir, target)
    return config.replace(param_dtype=dtype), params


# ---------------------------------------------------------------------------
# The two conversions


def hf_to_jax(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None, *,
    overwrite: bool = False,
) -> ModelConfig:
    """Hugging Face safetensors directory -> params checkpoint (see module doc).

    Tokenizer files of `hf_dir` are copied into the checkpoint. Returns the config.
    """
    config, params = hf_to_params(hf_dir, dtype)
    save_params_checkpoint(out_dir, config, params, overwrite=overwrite, aux_dir=hf_dir)
    return config


def jax_to_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None, *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
) -> ModelConfig:
    """Params checkpoint -> Hugging Face directory (safetensors + config.json)
    that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Args:
      ckpt_dir: a params checkpoint.
      out_dir: the directory to create.
      dtype: tensor dtype to write; None keeps the checkpoint's.
      max_shard_bytes: the largest shard; more shards get an index file.
      overwrite: replace an existing `out_dir`.

    Returns:
      The config written.
    """
    config, params = load_params_checkpoint(ckpt_dir)
    dtype = dtype or config.param_dtype
    config = config.replace(param_dtype=dtype)
    with AtomicDir(out_dir, overwrite) as tmp:
        write_hf_weights(tmp, config, params, dtype, max_shard_bytes)
        _write_config(tmp, config)
        copy_aux_files(os.fspath(ckpt_dir), tmp)
    return config
