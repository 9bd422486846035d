"""Resumable long jobs: work in shards of a fixed number of images, each written atomically with what made it.

A job killed at its time limit (sampling 50,000 images, Inception features of a whole split) reruns the same
command and keeps every shard whose recorded key (run config, weights, seeds, range, image hashes ...) equals
what it would compute now and whose arrays read back with the expected shapes; any other shard is redone.
The shard folder sits beside the output and is removed once the output is written.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np

from .fsutil import atomic_write

SHARD_IMAGES = 1000  # target images per shard: minutes of CPU Inception, seconds on a GPU


def shard_size(batch_size: int, target: int | None = None) -> int:
    """A multiple of the batch size near `target` (default SHARD_IMAGES), so shard boundaries fall on batch
    boundaries: the batches (and therefore the bits) are the same as without shards."""
    return batch_size * max(1, math.ceil((target or SHARD_IMAGES) / batch_size))


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def folder_beside(out: str | Path, suffix: str) -> Path:
    out = Path(out)
    return out.with_name(out.name + suffix)


def path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.npz"


def _normal(key: dict) -> dict:
    """The key as it reads back from JSON (tuples become lists), so equal keys compare equal."""
    return json.loads(json.dumps(key, sort_keys=True))


def write(file: Path, arrays: dict[str, np.ndarray], key: dict, info: dict | None = None) -> None:
    """Atomically: the arrays, the key they were computed from, and `info` (timings; never compared)."""
    payload = {**arrays, "key": np.array(json.dumps(key, sort_keys=True)),
               "info": np.array(json.dumps(info or {}, sort_keys=True))}
    buf = io.BytesIO()
    np.savez(buf, **payload)
    atomic_write(file, lambda f: f.write(buf.getvalue()))


def read(file: Path, key: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, info) of a shard made from `key` whose arrays have `shapes`; None if missing, damaged or other."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as f:
            if json.loads(str(f["key"])) != _normal(key):
                return None
            arrays = {name: f[name] for name in shapes}
            info = json.loads(str(f["info"]))
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    if any(arrays[name].shape != tuple(shape) for name, shape in shapes.items()):
        return None
    return arrays, info


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
