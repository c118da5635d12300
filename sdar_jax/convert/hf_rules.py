"""The rule table: the Hugging Face tensor of every sdar_jax parameter, checked against the model.

Each rule (`TensorRule`) names one family of Hugging Face tensors
(`model.layers.{layer}.self_attn.q_proj.weight`), the sdar_jax parameter it
fills (`layers/self_attn/q_proj/kernel`), and the shapes on both sides. A
rule whose name holds `{layer}` (and `{expert}`) fills one slice of a
parameter stacked over the leading `[layers]` (and `[experts]`) axes.
Hugging Face linear weights are `[out, in]`; rules with `transpose=True` turn
them into `[in, out]` and reshape the result, e.g. q_proj
`[heads * head_dim, hidden]` -> `[hidden, heads, head_dim]`.

The model declares the same parameters (`sdar_jax.model.transformer`: paths,
shapes, logical axes). `check_against_model(config)` compares the two: every
parameter on both sides, the same stacked shapes, and `{layer}` / `{expert}`
exactly where the model's leading logical axes are "layers" / "expert". It
runs when this module is imported, on small architectures with all-distinct
sizes that take every branch of the table (dense and MoE, tied and untied
head, with and without q/k norms), so a table that drifts from the model
fails at once, naming each difference. It is not run per conversion: the
rules are plain arithmetic on the config, and a conversion traces nothing.

To support new tensor names (another family, another MLP), add a builder to
`tensor_rules`; reading, checking, stacking and writing follow from the table.

Both conversions stream piece by piece (`Piece`: one layer's or one expert's
tensor, or a block of about PIECE_BYTES of the embedding / output head), so
peak memory does not depend on the model's size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from sdar_jax.checkpoint.dtypes import numpy_dtype
from sdar_jax.checkpoint.tree import flatten, set_path
from sdar_jax.config import ModelConfig, get_preset
from sdar_jax.model import sharding as model_sharding

# The largest block of an unstacked tensor (embedding, head) converted at once.
PIECE_BYTES = 64 * 1024**2
# The model's logical axis of a stacked parameter -> the placeholder of its index in rule names.
STACKED_AXES = {"layers": "layer", "expert": "expert"}


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

    def row_block(self, config: ModelConfig, itemsize: int) -> int | None:
        """Rows of the Hugging Face tensor converted at a time: a block of
        about PIECE_BYTES for an unstacked 2-D tensor that is larger (the
        embedding, the output head), None where the whole tensor is one piece
        (a stacked parameter's slice: one layer, one expert)."""
        if self.stack_axes(config) or len(self.hf_shape) != 2:
            return None
        if self.param_shape != (self.hf_shape[::-1] if self.transpose else self.hf_shape):
            return None
        rows = max(1, PIECE_BYTES // (self.hf_shape[1] * itemsize))
        return rows if rows < self.hf_shape[0] else None

    def pieces(self, config: ModelConfig, itemsize: int) -> Iterator["Piece"]:
        """Every region converted on its own, in file order."""
        block = self.row_block(config, itemsize)
        for name, index in self.instances(config):
            if block is None:
                yield Piece(name, self, index, None)
                continue
            for start in range(0, self.hf_shape[0], block):
                yield Piece(name, self, index, slice(start, min(start + block, self.hf_shape[0])))

    def chunk_shape(self, config: ModelConfig, itemsize: int) -> tuple[int, ...]:
        """The stored parameter's chunk: exactly one piece, so each piece is
        written without reading back (and read without reading more)."""
        block = self.row_block(config, itemsize)
        if block is not None:
            return (self.hf_shape[1], block) if self.transpose else (block, self.hf_shape[1])
        return (1,) * len(self.stack_axes(config)) + self.param_shape


@dataclasses.dataclass(frozen=True)
class Piece:
    """One region converted at a time: a whole Hugging Face tensor (a slice
    of a stacked parameter at `index`), or the rows `rows` of an unstacked
    2-D one (columns of the parameter when the rule transposes)."""

    name: str
    rule: TensorRule
    index: tuple[int, ...]
    rows: slice | None

    def param_region(self) -> tuple:
        """The index expression of this piece in the parameter."""
        if self.rows is None:
            return self.index
        return (slice(None), self.rows) if self.rule.transpose else (self.rows,)

    def to_param(self, tensor: np.ndarray) -> np.ndarray:
        """The Hugging Face region -> the parameter region."""
        if self.rows is None:
            return self.rule.to_param(tensor)
        return tensor.T if self.rule.transpose else tensor

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """The parameter region -> the Hugging Face region."""
        if self.rows is None:
            return self.rule.to_hf(value)
        return value.T if self.rule.transpose else value


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
        set_path(tree, rule.path, rule.full_shape(config))
    return tree


def hf_pieces(config: ModelConfig, dtype: str) -> dict[str, list[Piece]]:
    """Hugging Face tensor name -> its pieces, in file order."""
    itemsize = numpy_dtype(dtype).itemsize
    pieces: dict[str, list[Piece]] = {}
    for rule in tensor_rules(config):
        for piece in rule.pieces(config, itemsize):
            pieces.setdefault(piece.name, []).append(piece)
    return pieces


def check_against_model(config: ModelConfig) -> None:
    """Compares `tensor_rules(config)` with the model's own parameter tree
    (`sdar_jax.model.sharding.param_shapes_and_logical_axes`, one abstract evaluation).

    Raises:
      ValueError: listing every parameter only one side has, every stacked
        shape that differs, and every rule whose `{layer}` / `{expert}`
        placeholders are not the model's leading "layers" / "expert" axes.
    """
    shapes, axes = map(flatten, model_sharding.param_shapes_and_logical_axes(config))
    rules = {rule.path: rule for rule in tensor_rules(config)}
    problems = [f"the model's {'/'.join(p)} {list(shapes[p].shape)} has no rule"
                for p in sorted(shapes.keys() - rules.keys())]
    problems += [f"rule {rules[p].hf_name} fills {'/'.join(p)}, which the model does not have"
                 for p in sorted(rules.keys() - shapes.keys())]
    for path in sorted(shapes.keys() & rules.keys()):
        rule, shape, names = rules[path], tuple(shapes[path].shape), tuple(axes[path])
        if rule.full_shape(config) != shape:
            problems.append(f"rule {rule.hf_name} makes {'/'.join(path)} {list(rule.full_shape(config))}, "
                            f"the model {list(shape)}")
        stacked = []
        for name in names:
            if name not in STACKED_AXES:
                break
            stacked.append(STACKED_AXES[name])
        placeholders = [axis for axis, _ in rule.stack_axes(config)]
        if placeholders != stacked:
            problems.append(f"rule {rule.hf_name} stacks {'/'.join(path)} over {placeholders}, the "
                            f"model's logical axes {list(names)} over {stacked}")
    if problems:
        raise ValueError(f"the converter's rule table does not match the model of {config.model_type} "
                         "(sdar_jax.convert.hf_rules):\n  " + "\n  ".join(problems))


def _checked_architectures() -> tuple[ModelConfig, ...]:
    """Small architectures taking every branch of the table, every size distinct
    (vocab 96, hidden 40, 3 layers, 4 heads x 12 = 48, 2 kv heads x 12 = 24,
    mlp 56; 5 experts of 28), so a rule that uses the wrong size cannot pass."""
    sizes = dict(vocab_size=96, hidden_size=40, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12,
                 mask_token_id=95)
    dense = get_preset("tiny", intermediate_size=56, **sizes)
    return (
        dense,
        dense.replace(model_type="llama", qk_norm=False, tie_word_embeddings=True),
        get_preset("tiny-moe", num_experts=5, moe_intermediate_size=28, **sizes),
    )


for _architecture in _checked_architectures():  # at import: see the module docstring
    check_against_model(_architecture)
