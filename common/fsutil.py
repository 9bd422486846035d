"""Atomic file writes: a temporary file in the same folder, fsync, rename, fsync the folder.

A kill or a full disk at any moment leaves the old file or the new one, never half of one; every writer of
results, checkpoints and prepared data goes through here.  A failed write is an OutputError naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from core.errors import OutputError


def _output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {e.strerror or e} (disk full or read-only? free space or choose "
                       f"another output folder; files already there are intact)")


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse to open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Call `write(file_object)` on a temporary file, then move it to `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _output_error(path, e) from None
        raise
    fsync_dir(path.parent)


def check_writable(path: str | Path) -> None:
    """Fail before any compute if the output file `path` could not be created (its folder is made if needed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _output_error(path, e) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_line(path: str | Path, line: str) -> None:
    """Append one line (logs such as stats.jsonl); a kill can leave a torn last line, which readers skip."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise _output_error(Path(path), e) from None


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
