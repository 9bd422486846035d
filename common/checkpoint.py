"""Checkpoints: plain tensors and data (never pickled code), written atomically with a checksum.

Each file `X.pt` is a `torch.save` archive loadable with `weights_only=True`, beside `X.pt.sha256`.  The
archive is written to a temporary file, fsynced, then the checksum, then both are renamed into place, so a
kill at any moment leaves either the old complete pair or the new one, never a half-written file that
passes the check.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import torch

from core.errors import CheckpointError

from .fsutil import atomic_write_bytes

_STEP_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


def save(path: str | Path, state: dict) -> str:
    """Write `state` atomically; return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path.with_name(path.name + ".sha256"), (digest + "\n").encode())
    atomic_write_bytes(path, data)
    return digest


def load(path: str | Path, map_location="cpu") -> dict:
    """Read and verify a checkpoint; CheckpointError names the file if it is missing, truncated or altered."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}: it may be incomplete")
    expected = sidecar.read_text().strip()
    found = hashlib.sha256(data).hexdigest()
    if found != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt (sha256 {found[:12]} != recorded {expected[:12]})")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # a valid checksum over an unreadable archive: written by something else
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None


def step_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt-{step:08d}.pt"


def list_steps(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoints in `folder`, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def load_latest(folder: Path, map_location="cpu", log=print) -> dict | None:
    """The newest valid checkpoint; a corrupt one is reported and skipped in favour of the previous one."""
    candidates = list_steps(folder)
    for _, path in candidates:
        try:
            return load(path, map_location)
        except CheckpointError as e:
            log(f"warning: {e}; falling back to an earlier checkpoint")
    if candidates:
        raise CheckpointError(f"no valid checkpoint in {folder} (all {len(candidates)} failed their checks); "
                              f"delete the folder to start over")
    return None


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files that a killed writer left (`.<name>.<random>.tmp`); return how many.

    A kill inside a checkpoint write leaves a full-size temporary file; a run preempted every day would otherwise
    fill the disk with them.  Only one trainer owns a run folder (Snakemake's lock), so none is being written now.
    """
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def prune(folder: Path, keep: int) -> None:
    for _, path in list_steps(folder)[keep:]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
