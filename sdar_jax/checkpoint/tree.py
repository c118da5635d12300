"""Nested-dict param trees addressed by path tuples, e.g. ("layers", "mlp", "gate_proj", "kernel")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sdar_jax.checkpoint.errors import ConversionError


def set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    """Puts `value` at `path`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: Sequence[str]) -> Any:
    """The entry at `path`; ConversionError naming the path when there is none."""
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise ConversionError(f"params have no entry {'/'.join(path)}")
        tree = tree[key]
    return tree


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """path -> leaf for every leaf (anything that is not a Mapping)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out
