"""Integrity records of train-checkpoint steps: what was written, checked before a restore.

orbax checksums only its shard indices, not the data (a flipped byte in a
parameter restores silently), so every step directory also records
`sdar_integrity.json`: the size and SHA-256 of each of its files
(`write_integrity_record`). `verify_step_files` checks a step against its
record and `first_non_finite` checks the restored state; a step that fails
either is a `DamagedStep`, and `CheckpointIntegrityError` lists them when no
step is intact. `sdar_jax.checkpoint.train_state` decides when to seal and
what to do with a damaged step.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

INTEGRITY_FILE = "sdar_integrity.json"
INTEGRITY_FORMAT = 1
# Step-level files orbax writes or rewrites when it commits the step (after the
# record is sealed): its bookkeeping, not needed to restore the items.
_UNRECORDED = frozenset({INTEGRITY_FILE, "_CHECKPOINT_METADATA", "commit_success.txt"})


class CheckpointIntegrityError(RuntimeError):
    """No checkpoint step in a directory is intact; `damaged` says what was wrong with each."""

    def __init__(self, directory: str, damaged: list["DamagedStep"]):
        self.directory = directory
        self.damaged = damaged
        found = "; ".join(f"step {d.step}: {d.problem}" for d in damaged)
        super().__init__(
            f"no intact checkpoint in {directory} (found {found}); move the directory away to "
            "start afresh, or restore an intact copy")


class DamagedStep(NamedTuple):
    """A step that failed verification: `problem` names the file or leaf."""

    step: int
    problem: str



def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: str) -> list[str]:
    """Paths of every file under `directory` (relative, sorted), but the step-level
    files of `_UNRECORDED`."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel not in _UNRECORDED:
                found.append(rel)
    return sorted(found)


def write_integrity_record(step_dir: str, step: int) -> None:
    """Writes `<step_dir>/sdar_integrity.json` (size + SHA-256 of every file), atomically."""
    files = {}
    for rel in _files(step_dir):
        path = os.path.join(step_dir, rel)
        files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    record = {"format": INTEGRITY_FORMAT, "step": step, "algorithm": "sha256", "files": files}
    target = os.path.join(step_dir, INTEGRITY_FILE)
    with open(target + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(target + ".tmp", target)


def verify_step_files(step_dir: str) -> str | None:
    """None when every file of the step's integrity record is there with its size and
    checksum; else what is wrong, naming the file."""
    try:
        with open(os.path.join(step_dir, INTEGRITY_FILE), encoding="utf-8") as f:
            record = json.load(f)
        files = record["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("it lists no files")
    except FileNotFoundError:
        return f"{INTEGRITY_FILE} is missing (the save was interrupted, or predates integrity records)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{INTEGRITY_FILE} is unreadable ({e})"
    for rel, entry in sorted(files.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            return f"{rel} has {size} bytes where {entry['bytes']} were written (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{rel} does not match its SHA-256 (corrupted)"
    return None


def first_non_finite(state: Any) -> str | None:
    """The path of the first floating-point leaf holding NaN/inf, or None."""
    leaves = [
        (path, x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    finite = jax.device_get([jnp.isfinite(x).all() for _, x in leaves])
    for (path, _), ok in zip(leaves, finite):
        if not ok:
            return jax.tree_util.keystr(path)
    return None
