"""Device mesh, logical-axis rules and the shardings derived from them.

Every parameter of the model carries logical axis names (`layers`, `vocab`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, `expert`; see
`sdar_jax.model.transformer.param_logical_axes`). Activations, batches and the
KV cache use `batch` and `length` as well. A `ParallelConfig` holds the mesh
shape over the four mesh axes (`data`, `fsdp`, `tensor`, `expert`) and the
rules mapping each logical name to mesh axes, so a new parallelism layout is a
config change. From them this module derives `NamedSharding`s for parameters,
the whole train state (optimizer moments included), batches and the KV cache;
`jax.jit(..., in_shardings=..., out_shardings=...)` and GSPMD do the rest.

Resolving a logical name for one dimension of one array:
  * the rule's mesh axes are taken in order, skipping axes of size 1 and any
    already used by an earlier dimension of the same array (a mesh axis
    shards at most one dimension);
  * the longest prefix of those axes whose size product divides the dimension
    is used; the remaining axes are dropped, i.e. that dimension is replicated
    over them (logged as a warning). Batches are the exception: a global batch
    that the batch axes do not divide raises an error, because every process
    must own a whole number of rows.
The resolver is this module's own rather than `flax.linen.logical_to_mesh_sharding`
because the fallback needs each array's shape. The model itself adds no
activation sharding constraints: GSPMD propagates the batch and parameter
shardings through it (the sharded-equals-unsharded tests check the result).
See docs/parallelism.md for the default layout and a picture.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sdar_jax.config import ModelConfig

if TYPE_CHECKING:
    from sdar_jax.model.transformer import KVCache

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "expert")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# MaxText-like defaults. `data` is pure data parallelism (parameters
# replicated); `fsdp` shards the batch and the `embed` dimension of every
# parameter (ZeRO-3: weights are all-gathered per layer inside the scan);
# `tensor` shards heads, MLP width and vocabulary (Megatron-style); `expert`
# shards the experts of MoE layers and, elsewhere, acts like `fsdp`.
DEFAULT_LOGICAL_AXIS_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),
)

# Logical names of the KV cache [layers, batch, max_len, kv_heads, head_dim].
CACHE_LOGICAL_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class ParallelConfigError(ValueError):
    """A mesh or logical-axis-rule setting is invalid for this run."""


def _normalize_axes(name: str, axes: Any) -> MeshAxes:
    if axes is None:
        return None
    if isinstance(axes, str):
        axes = (axes,)
    axes = tuple(axes)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ParallelConfigError(
                f"logical_rules: rule for {name!r} names mesh axis {axis!r}; "
                f"expected axes from {MESH_AXES}"
            )
    if len(set(axes)) != len(axes):
        raise ParallelConfigError(f"logical_rules: rule for {name!r} repeats a mesh axis: {axes}")
    return axes[0] if len(axes) == 1 else (axes or None)


def _normalize_rules(rules: Any) -> Rules:
    out = []
    seen = set()
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ParallelConfigError(
                f"logical_rules: each rule must be (logical_name, mesh_axes), got {rule!r}"
            )
        name, axes = rule
        if name in seen:
            raise ParallelConfigError(f"logical_rules: logical name {name!r} has two rules")
        seen.add(name)
        out.append((name, _normalize_axes(name, axes)))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh shape and logical-axis rules.

    Each of data / fsdp / tensor / expert is the size of that mesh axis; at
    most one may be -1, meaning "all remaining devices".
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    logical_rules: Rules = DEFAULT_LOGICAL_AXIS_RULES

    def __post_init__(self) -> None:
        sizes = self.axis_sizes
        for axis, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ParallelConfigError(
                    f"ParallelConfig.{axis} must be a positive integer or -1, got {size!r}"
                )
        if sum(size == -1 for size in sizes.values()) > 1:
            raise ParallelConfigError(
                f"ParallelConfig: at most one mesh axis may be -1, got {sizes}"
            )
        object.__setattr__(self, "logical_rules", _normalize_rules(self.logical_rules))

    @property
    def axis_sizes(self) -> dict[str, int]:
        """The requested sizes (possibly with one -1), in MESH_AXES order."""
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    @property
    def rules(self) -> dict[str, MeshAxes]:
        return dict(self.logical_rules)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ParallelConfig":
        """From a dict or ml_collections.ConfigDict with the same field names
        (the run config's `mesh` section); `logical_rules=None` means the defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - fields)
        if unknown:
            raise ParallelConfigError(
                f"mesh config: unknown fields {unknown}; expected some of {sorted(fields)}"
            )
        values = {key: mapping[key] for key in mapping}
        if values.get("logical_rules") is None:
            values.pop("logical_rules", None)
        return cls(**values)


# ---------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(config: ParallelConfig, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 resolved; their product equals num_devices."""
    sizes = config.axis_sizes
    known = math.prod(size for size in sizes.values() if size != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise ParallelConfigError(
                f"mesh {sizes}: the fixed axes multiply to {known}, which does not divide "
                f"the {num_devices} devices, so -1 cannot be resolved"
            )
        sizes = {axis: (num_devices // known if size == -1 else size) for axis, size in sizes.items()}
    elif known != num_devices:
        raise ParallelConfigError(
            f"mesh {sizes} has {known} devices but {num_devices} are available; "
            "make the product match or set one axis to -1"
        )
    return sizes


def make_mesh(config: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The global device mesh with axes MESH_AXES (all of type Auto, for GSPMD).

    Args:
      config: the parallel configuration.
      devices: the devices to use; all global devices (`jax.devices()`) by default.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    return jax.make_mesh(
        tuple(shape[axis] for axis in MESH_AXES), MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices,
    )


# ---------------------------------------------------------------------------
# Logical names -> PartitionSpec


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    rules: Mapping[str, MeshAxes],
    mesh_shape: Mapping[str, int],
    *,
    where: str = "array",
    strict: bool = False,
) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names.

    Args:
      logical_axes: one logical name (or None = replicated) per dimension.
      shape: the array's shape.
      rules: logical name -> mesh axes (a name, a tuple of names, or None).
      mesh_shape: mesh axis name -> size.
      where: the array's name, for messages.
      strict: raise instead of replicating a dimension the mesh axes do not divide.

    Returns:
      A PartitionSpec with one entry per dimension.
    """
    if len(logical_axes) != len(shape):
        raise ParallelConfigError(
            f"{where}: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}"
        )
    used: set[str] = set()
    entries: list[MeshAxes] = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise ParallelConfigError(
                f"{where}: logical axis {name!r} has no rule in logical_rules "
                f"(rules exist for {sorted(rules)})"
            )
        wanted = rules[name]
        wanted = () if wanted is None else ((wanted,) if isinstance(wanted, str) else wanted)
        # Axes of size 1 shard nothing; leaving them out keeps specs readable.
        free = [axis for axis in wanted if axis not in used and mesh_shape[axis] > 1]
        chosen: list[str] = []
        for axis in free:
            if size % (math.prod(mesh_shape[a] for a in chosen) * mesh_shape[axis]):
                break
            chosen.append(axis)
        if len(chosen) < len(free):
            dropped = free[len(chosen):]
            message = (
                f"{where}: dimension {name!r} of size {size} is not divisible by mesh axes "
                f"{tuple(free)} with sizes {tuple(mesh_shape[a] for a in free)}"
            )
            if strict:
                raise ParallelConfigError(message)
            logger.warning("%s; replicating it over %s", message, tuple(dropped))
        used.update(chosen)
        entries.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
    return PartitionSpec(*entries)


def _mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


def _key_name(key: Any) -> Any:
    """The plain value of a pytree key (DictKey.key, GetAttrKey.name, SequenceKey.idx)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def _path_str(path: tuple) -> str:
    return "/".join(str(_key_name(k)) for k in path)


def param_shapes(model_config: ModelConfig) -> dict:
    """ShapeDtypeStructs of every parameter, a tree like `init_params`."""
    from sdar_jax.model import transformer  # the model imports this module

    return nn.unbox(transformer.abstract_params(model_config))


def param_specs(model_config: ModelConfig, parallel_config: ParallelConfig, mesh: Mesh) -> dict:
    """PartitionSpecs (over mesh axes) for every parameter, a tree like `init_params`."""
    from sdar_jax.model import transformer  # the model imports this module

    logical = transformer.param_logical_axes(model_config)
    shapes = param_shapes(model_config)
    rules, mesh_shape = parallel_config.rules, _mesh_shape(mesh)

    def one(path: tuple, spec: PartitionSpec, shape: jax.ShapeDtypeStruct) -> PartitionSpec:
        where = f"param {_path_str(path)}"
        if len(spec) == 0 and shape.ndim:
            raise ParallelConfigError(
                f"{where} {shape.shape} has no logical axis names; declare them with "
                "nn.with_logical_partitioning in its initializer"
            )
        return logical_to_mesh_spec(tuple(spec), shape.shape, rules, mesh_shape, where=where)

    return jax.tree_util.tree_map_with_path(
        one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def param_shardings(model_config: ModelConfig, parallel_config: ParallelConfig, mesh: Mesh) -> dict:
    """NamedShardings for every parameter, a tree like `init_params`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), param_specs(model_config, parallel_config, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, metrics, keys)."""
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(
    abstract_state: Any, model_config: ModelConfig, parallel_config: ParallelConfig, mesh: Mesh
) -> Any:
    """NamedShardings for any pytree holding parameter-shaped leaves (a train state).

    A leaf whose key path ends with a parameter's path (e.g.
    `opt_state[0].mu/layers/mlp/up_proj/kernel` ends with
    `layers/mlp/up_proj/kernel`) and has that parameter's shape gets the
    parameter's sharding: the params themselves, optimizer moments, EMA copies.
    Every other leaf (step counters, PRNG keys, scalars, factored statistics)
    is replicated.

    Args:
      abstract_state: the state, as arrays or ShapeDtypeStructs (`jax.eval_shape`).

    Returns:
      A pytree of NamedSharding with the structure of abstract_state.
    """
    specs = param_specs(model_config, parallel_config, mesh)
    shapes = param_shapes(model_config)
    by_path: dict[tuple, tuple[tuple[int, ...], PartitionSpec]] = {}
    flat_specs = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    for (path, spec), shape in zip(flat_specs, jax.tree.leaves(shapes)):
        by_path[tuple(_key_name(k) for k in path)] = (tuple(shape.shape), spec)
    max_depth = max(len(p) for p in by_path)

    def leaf_sharding(path: tuple, leaf: Any) -> NamedSharding:
        names = tuple(_key_name(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        for depth in range(min(max_depth, len(names)), 0, -1):
            match = by_path.get(names[-depth:])
            if match is not None and match[0] == shape:
                return NamedSharding(mesh, match[1])
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


# ---------------------------------------------------------------------------
# Batches and the KV cache


def batch_spec(
    parallel_config: ParallelConfig, mesh: Mesh, shape: Sequence[int], *, where: str = "batch",
    strict: bool = True,
) -> PartitionSpec:
    """PartitionSpec of a [batch, ...] array: the leading axis over the `batch` rule."""
    logical = ("batch",) + (None,) * (len(shape) - 1)
    return logical_to_mesh_spec(
        logical, shape, parallel_config.rules, _mesh_shape(mesh), where=where, strict=strict
    )


def batch_shardings(
    batch: Any, parallel_config: ParallelConfig, mesh: Mesh, *, strict: bool = True
) -> Any:
    """NamedShardings for a pytree of [batch, ...] arrays (e.g. the training batch dict).

    Args:
      batch: arrays or ShapeDtypeStructs with the global batch size leading.
      strict: raise (default) when the batch axes do not divide the batch size.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(
            mesh, batch_spec(parallel_config, mesh, x.shape, where=f"batch {_path_str(path)}", strict=strict)
        ),
        batch,
    )


def cache_shardings(cache: KVCache, parallel_config: ParallelConfig, mesh: Mesh) -> KVCache:
    """NamedShardings for a KVCache (k, v: [layers, batch, max_len, kv_heads, head_dim]).

    The batch is sharded like training batches where the batch axes divide it
    (otherwise replicated: decoding often uses one row), kv heads over `tensor`.
    """
    def one(x: Any, name: str) -> NamedSharding:
        return NamedSharding(mesh, logical_to_mesh_spec(
            CACHE_LOGICAL_AXES, x.shape, parallel_config.rules, _mesh_shape(mesh), where=f"cache.{name}"
        ))

    return cache.replace(k=one(cache.k, "k"), v=one(cache.v, "v"))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], *, where: str = "activation") -> jax.Array:
    """`with_sharding_constraint` by logical names, for use inside jitted code.

    The mesh is the one set with `jax.set_mesh` and the rules are the
    defaults (the model cannot see the run's config; the constraints it
    places only name `batch`, `length` and the cache's axes); mesh axes the
    mesh lacks count as size 1. Without
    a mesh, or on one device, `x` is returned unchanged. Dimensions the
    rules' axes do not divide are left replicated, as for parameters.

    Args:
      x: any array; logical_axes: one logical name (or None) per dimension.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    # A mesh with only some of MESH_AXES (e.g. data x expert) acts as if the others had size 1.
    sizes = {axis: dict(mesh.shape).get(axis, 1) for axis in MESH_AXES}
    spec = logical_to_mesh_spec(logical_axes, x.shape, dict(DEFAULT_LOGICAL_AXIS_RULES), sizes, where=where)
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_cache(cache: KVCache) -> KVCache:
    """Pins a KV cache made inside a jitted function to its rule-derived sharding
    (see `constrain`; k, v: [layers, batch, max_len, kv_heads, head_dim])."""
    return cache.replace(
        k=constrain(cache.k, CACHE_LOGICAL_AXES, where="cache.k"),
        v=constrain(cache.v, CACHE_LOGICAL_AXES, where="cache.v"),
    )


def process_batch_slice(sharding: NamedSharding, global_batch: int) -> slice:
    """The rows of the global batch this process must load for `sharding`.

    With the batch axes spanning processes each process owns a contiguous
    block of rows; where the batch is replicated across processes, all rows.
    """
    indices = sharding.addressable_devices_indices_map((global_batch,))
    rows = sorted({i for index in indices.values() for i in range(*index[0].indices(global_batch))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ParallelConfigError(
            f"process {jax.process_index()} owns non-contiguous batch rows {rows} under {sharding.spec}"
        )
    return slice(rows[0], rows[-1] + 1)


def shard_batch(local_batch: Any, shardings: Any, global_batch: int) -> Any:
    """Global jax.Arrays from this process's rows (see process_batch_slice).

    Args:
      local_batch: a pytree of host arrays [local_batch, ...].
      shardings: the matching pytree of NamedShardings (batch_shardings).
      global_batch: the global batch size.
    """
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x), (global_batch,) + x.shape[1:]),
        local_batch, shardings,
    )

