"""Device mesh, logical-axis rules and the one sharding context a run uses.

Every parameter of the model carries logical axis names (`layers`, `vocab`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, `expert`); batches,
activations and the KV cache use `batch` and `length` as well. A
`ParallelConfig` holds the mesh shape over the four mesh axes (`data`, `fsdp`,
`tensor`, `expert`) and the rules mapping each logical name to mesh axes.

A `ShardingContext` is the mesh plus the rules, built once from the run's
config and active for the whole run (`with context.activate(): ...`). Every
consumer reads it:

  * parameters, optimizer state, batches and the KV cache:
    `context.tree_shardings`, `context.state_shardings`,
    `context.batch_shardings`, `context.cache_shardings` (trees of logical
    axes in, NamedShardings out; this module knows nothing of the model);
  * inside jitted code, through `current_context()`: the model's
    layer-boundary constraint (`constrain`), the decoder's cache
    (`constrain_cache`), the Pallas kernels' shard_map specs
    (`ShardingContext.attention_specs`) and expert parallelism
    (`ShardingContext.moe_axes`).

`activate` sets the mesh with `jax.set_mesh` and the rules in a
`contextvars.ContextVar`, reset when the block ends (no module state outlives
it). Code that only sets a mesh with `jax.set_mesh` gets the default rules. A
jitted function is traced under the context of its first call for a given
mesh and input shardings: build jitted functions inside the context they run
under (the trainer and `sdar_jax.checkpoint.sharded_restore.setup_inference` do).

Resolving a logical name for one dimension of one array:
  * the rule's mesh axes are taken in order, skipping axes of size 1 (or
    absent from the mesh) and any already used by an earlier dimension of the
    same array (a mesh axis shards at most one dimension);
  * the longest prefix of those axes whose size product divides the dimension
    is used; the remaining axes are dropped, i.e. that dimension is replicated
    over them (logged as a warning). Batches are the exception: a global batch
    that the batch axes do not divide raises an error, because every process
    must own a whole number of rows.
The resolver is this module's own rather than `flax.linen.logical_to_mesh_sharding`
because the fallback needs each array's shape. See docs/parallelism.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

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


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


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


def parse_mesh_spec(text: str, logical_rules: Rules | None = None) -> ParallelConfig:
    """A `--mesh` flag value, e.g. "fsdp=4,tensor=2" or "data=-1,tensor=2", as a ParallelConfig.

    Axis names are those of the train config's `mesh` section (MESH_AXES).
    Axes not named have size 1, except `data`, which takes the devices left
    over (-1) unless another axis is -1, as in the train config.

    Raises:
      ParallelConfigError: a one-line message naming the bad item.
    """
    where = f"--mesh {text!r}"
    sizes: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise ParallelConfigError(f"{where}: {item.strip()!r} is not axis=size (axes: {', '.join(MESH_AXES)})")
        if name not in MESH_AXES:
            raise ParallelConfigError(f"{where}: unknown mesh axis {name!r}; expected one of {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ParallelConfigError(f"{where}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ParallelConfigError(f"{where}: size {value!r} of {name!r} is not an integer") from None
        if size < 1 and size != -1:
            raise ParallelConfigError(f"{where}: size of {name!r} must be a positive integer or -1, got {size}")
        sizes[name] = size
    if sum(size == -1 for size in sizes.values()) > 1:
        raise ParallelConfigError(f"{where}: at most one axis may be -1")
    full = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if "data" not in sizes and -1 not in sizes.values():
        full["data"] = -1
    rules = DEFAULT_LOGICAL_AXIS_RULES if logical_rules is None else logical_rules
    return ParallelConfig(**full, logical_rules=rules)


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


def describe_mesh(mesh_shape: Mapping[str, int]) -> str:
    """"data=2,fsdp=2,tensor=2,expert=1" (the `--mesh` syntax)."""
    return ",".join(f"{axis}={mesh_shape.get(axis, 1)}" for axis in MESH_AXES)


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
      mesh_shape: mesh axis name -> size (an axis it lacks counts as size 1).
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
        # Axes of size 1 shard nothing; leaving them out keeps specs readable.
        free = [axis for axis in _as_tuple(rules[name]) if axis not in used and mesh_shape.get(axis, 1) > 1]
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


def _key_name(key: Any) -> Any:
    """The plain value of a pytree key (DictKey.key, GetAttrKey.name, SequenceKey.idx)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def _path_str(path: tuple) -> str:
    return "/".join(str(_key_name(k)) for k in path)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


class MoeAxes(NamedTuple):
    """Mesh axes of expert parallelism (each a tuple of mesh axes of size > 1).

    tokens: split the routed tokens (never one of `mlp`'s axes);
    experts: split the experts, the all-to-all axes;
    mlp: split each expert's intermediate dimension (results psum'd over them).
    """

    tokens: tuple[str, ...]
    experts: tuple[str, ...]
    mlp: tuple[str, ...]


_ACTIVE: contextvars.ContextVar["ShardingContext | None"] = contextvars.ContextVar(
    "sdar_jax_sharding_context", default=None
)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """The run's mesh and logical-axis rules: every sharding is derived from these two.

    mesh: a Mesh (or an AbstractMesh inside traced code / for shapes only)
      with axes among MESH_AXES.
    logical_rules: (logical name, mesh axes) pairs.
    """

    mesh: Mesh | AbstractMesh
    logical_rules: Rules = DEFAULT_LOGICAL_AXIS_RULES

    def __post_init__(self) -> None:
        object.__setattr__(self, "logical_rules", _normalize_rules(self.logical_rules))

    @classmethod
    def from_config(
        cls, config: ParallelConfig, devices: Sequence[jax.Device] | None = None
    ) -> "ShardingContext":
        """The context of a run: `make_mesh(config, devices)` and the config's rules."""
        return cls(make_mesh(config, devices), config.logical_rules)

    @property
    def rules(self) -> dict[str, MeshAxes]:
        return dict(self.logical_rules)

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Size of every axis of MESH_AXES (1 for an axis the mesh lacks)."""
        shape = dict(self.mesh.shape)
        return {axis: shape.get(axis, 1) for axis in MESH_AXES}

    def describe(self) -> str:
        return describe_mesh(self.mesh_shape)

    @contextlib.contextmanager
    def activate(self) -> Iterator["ShardingContext"]:
        """Makes this the context of everything traced inside the block (and sets its mesh)."""
        token = _ACTIVE.set(self)
        try:
            if isinstance(self.mesh, Mesh):
                with jax.set_mesh(self.mesh):
                    yield self
            else:
                with jax.sharding.use_abstract_mesh(self.mesh):
                    yield self
        finally:
            _ACTIVE.reset(token)

    # -- one array ---------------------------------------------------------

    def spec(
        self, logical_axes: Sequence[str | None], shape: Sequence[int], *, where: str = "array",
        strict: bool = False,
    ) -> PartitionSpec:
        """`logical_to_mesh_spec` under this context's rules and mesh."""
        return logical_to_mesh_spec(
            logical_axes, shape, self.rules, self.mesh_shape, where=where, strict=strict
        )

    def named(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def replicated(self) -> NamedSharding:
        """A full copy on every device (scalars, metrics, keys)."""
        return NamedSharding(self.mesh, PartitionSpec())

    # -- trees -------------------------------------------------------------

    def tree_specs(self, logical_axes: Any, shapes: Any, *, where: str = "param") -> Any:
        """PartitionSpecs for a tree of arrays from a matching tree of logical axes.

        Args:
          logical_axes: a pytree whose leaves are PartitionSpecs of logical
            names, one per dimension (e.g. `nn.get_partition_spec` of
            the boxed params).
          shapes: the matching pytree of arrays or ShapeDtypeStructs.
          where: a prefix for messages.

        Returns:
          A pytree of PartitionSpec with the structure of `logical_axes`.
        """

        def one(path: tuple, names: Any, shape: Any) -> PartitionSpec:
            name = f"{where} {_path_str(path)}"
            if len(names) == 0 and len(shape.shape):
                raise ParallelConfigError(
                    f"{name} {tuple(shape.shape)} has no logical axis names; declare them with "
                    "nn.with_logical_partitioning in its initializer"
                )
            return self.spec(tuple(names), shape.shape, where=name)

        return jax.tree_util.tree_map_with_path(one, logical_axes, shapes, is_leaf=_is_spec)

    def tree_shardings(self, logical_axes: Any, shapes: Any, *, where: str = "param") -> Any:
        """NamedShardings for a tree of arrays (see `tree_specs`)."""
        return jax.tree.map(self.named, self.tree_specs(logical_axes, shapes, where=where), is_leaf=_is_spec)

    def state_shardings(self, abstract_state: Any, logical_axes: Any, shapes: Any) -> Any:
        """NamedShardings for any pytree holding parameter-shaped leaves (a train state).

        A leaf whose key path ends with a parameter's path (e.g.
        `opt_state[0].mu/layers/mlp/up_proj/kernel` ends with
        `layers/mlp/up_proj/kernel`) and has that parameter's shape gets the
        parameter's sharding: the params themselves, optimizer moments, EMA
        copies. Every other leaf (step counters, PRNG keys, scalars, factored
        statistics) is replicated.

        Args:
          abstract_state: the state, as arrays or ShapeDtypeStructs (`jax.eval_shape`).
          logical_axes, shapes: the parameters' logical axes and shapes (see `tree_specs`).

        Returns:
          A pytree of NamedSharding with the structure of abstract_state.
        """
        specs = self.tree_specs(logical_axes, shapes)
        by_path: dict[tuple, tuple[tuple[int, ...], PartitionSpec]] = {}
        flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
        for (path, spec), shape in zip(flat_specs, jax.tree.leaves(shapes)):
            by_path[tuple(_key_name(k) for k in path)] = (tuple(shape.shape), spec)
        max_depth = max(len(p) for p in by_path)

        def leaf_sharding(path: tuple, leaf: Any) -> NamedSharding:
            names = tuple(_key_name(k) for k in path)
            shape = tuple(getattr(leaf, "shape", ()))
            for depth in range(min(max_depth, len(names)), 0, -1):
                match = by_path.get(names[-depth:])
                if match is not None and match[0] == shape:
                    return self.named(match[1])
            return self.replicated()

        return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)

    def batch_spec(self, shape: Sequence[int], *, where: str = "batch", strict: bool = True) -> PartitionSpec:
        """PartitionSpec of a [batch, ...] array: the leading axis over the `batch` rule."""
        return self.spec(("batch",) + (None,) * (len(shape) - 1), shape, where=where, strict=strict)

    def batch_shardings(self, batch: Any, *, strict: bool = True) -> Any:
        """NamedShardings for a pytree of [batch, ...] arrays (e.g. the training batch dict).

        Args:
          batch: arrays or ShapeDtypeStructs with the global batch size leading.
          strict: raise (default) when the batch axes do not divide the batch size.
        """
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.named(
                self.batch_spec(x.shape, where=f"batch {_path_str(path)}", strict=strict)
            ),
            batch,
        )

    def cache_shardings(self, cache: Any) -> Any:
        """NamedShardings for a KV cache (`k`, `v`: [layers, batch, max_len, kv_heads, head_dim];
        any struct with those fields and `replace`). The batch is sharded where the
        batch axes divide it (decoding often uses one row), kv heads per the rules."""
        def one(x: Any, name: str) -> NamedSharding:
            return self.named(self.spec(CACHE_LOGICAL_AXES, x.shape, where=f"cache.{name}"))

        return cache.replace(k=one(cache.k, "k"), v=one(cache.v, "v"))

    # -- kernels -----------------------------------------------------------

    def attention_specs(self, batch: int, heads: int, kv_heads: int) -> tuple[PartitionSpec, PartitionSpec]:
        """shard_map specs of an attention kernel: (q/k/v [batch, len, heads, head_dim], metadata
        [batch, len]). Batch over the `batch` rule, q and kv heads both over the `heads`
        rule (so each device keeps whole query groups); lengths are never split."""
        spec = self.spec(
            ("batch", None, "heads", None), (batch, 1, math.gcd(heads, kv_heads), 1), where="attention"
        )
        return PartitionSpec(spec[0], None, spec[2], None), PartitionSpec(spec[0], None)

    def moe_axes(self, num_experts: int, mlp: int) -> MoeAxes:
        """The expert-parallel layout: experts over the `expert` rule, each expert's
        intermediate dimension over the `mlp` rule, tokens over the `batch` rule
        (minus the mlp axes, over which the partial results are summed)."""
        spec = self.spec(("expert", "mlp"), (num_experts, mlp), where="moe experts")
        experts, mlp_axes = _as_tuple(spec[0]), _as_tuple(spec[1])
        sizes = self.mesh_shape
        tokens = tuple(a for a in _as_tuple(self.rules.get("batch")) if sizes[a] > 1 and a not in mlp_axes)
        return MoeAxes(tokens=tokens, experts=experts, mlp=mlp_axes)


def current_context() -> ShardingContext | None:
    """The context of the code being traced: the mesh set with `jax.set_mesh` (or
    `ShardingContext.activate`) and the active rules (the defaults when only a mesh
    is set). None without a mesh or on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    active = _ACTIVE.get()
    return ShardingContext(mesh, DEFAULT_LOGICAL_AXIS_RULES if active is None else active.logical_rules)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], *, where: str = "activation") -> jax.Array:
    """`with_sharding_constraint` by logical names under the current context (jitted code).

    Without a mesh, or on one device, `x` is returned unchanged. Dimensions the
    rules' axes do not divide are left replicated, as for parameters.

    Args:
      x: any array; logical_axes: one logical name (or None) per dimension.
    """
    context = current_context()
    if context is None:
        return x
    return jax.lax.with_sharding_constraint(x, context.spec(logical_axes, x.shape, where=where))


def constrain_cache(cache: Any) -> Any:
    """Pins a KV cache made inside a jitted function to its rule-derived sharding
    (see `constrain`; k, v: [layers, batch, max_len, kv_heads, head_dim])."""
    return cache.replace(
        k=constrain(cache.k, CACHE_LOGICAL_AXES, where="cache.k"),
        v=constrain(cache.v, CACHE_LOGICAL_AXES, where="cache.v"),
    )


# ---------------------------------------------------------------------------
# Batches on several processes


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


def check_process_layout(
    sharding: NamedSharding, global_batch: int, *, process_index: int | None = None,
    process_count: int | None = None,
) -> slice:
    """Checks that this process's devices hold the rows the data pipeline gives it.

    The pipeline hands process p of n the rows [p·G/n, (p+1)·G/n) of each
    global batch of G rows; `sharding` (the batch's) must put exactly those
    rows on p's devices, which holds when the batch axes are a multiple of n.

    Args:
      sharding: the batch arrays' NamedSharding (leading axis = batch).
      global_batch: G.
      process_index, process_count: this process and the run's process count
        (default: jax's).

    Returns:
      The process's rows.

    Raises:
      ParallelConfigError: naming the mesh axes, when the layouts disagree.
    """
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    mesh = describe_mesh(dict(sharding.mesh.shape))
    batch_axes = _as_tuple(sharding.spec[0]) if len(sharding.spec) else ()
    if global_batch % n:
        raise ParallelConfigError(
            f"global batch {global_batch} is not divisible by the {n} processes (mesh {mesh})"
        )
    per = global_batch // n
    want = slice(p * per, (p + 1) * per)
    try:
        owned = process_batch_slice(sharding, global_batch)
    except ParallelConfigError as error:
        raise ParallelConfigError(f"mesh {mesh}: {error}") from None
    if owned != want:
        shards = math.prod(dict(sharding.mesh.shape)[a] for a in batch_axes)
        raise ParallelConfigError(
            f"process {p} of {n}: the data pipeline gives it batch rows [{want.start}, {want.stop}) "
            f"but its devices hold rows [{owned.start}, {owned.stop}) on mesh {mesh}, whose batch "
            f"axes {batch_axes or '()'} make {shards} shard(s); make the product of the batch axes "
            f"a multiple of {n} (e.g. move devices from tensor to data or fsdp)"
        )
    return owned


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
