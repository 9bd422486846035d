"""`python -m tests.reliability.killhook SPEC <cmbench args>`: the cmbench CLI, SIGKILLed by itself at a chosen point.

A kill from outside at a random time rarely lands inside a checkpoint write (a few ms out of a run); this puts it
there on purpose.  The kill is a real SIGKILL of the real process; nothing else is changed.  SPEC is KIND:N,
kill at the N-th (1-based) occurrence of:

- ckpt-fsync   fsync of a step checkpoint's temporary file (written, not yet renamed)
- ckpt-rename  rename of a step checkpoint's data file (its new .sha256 already in place, the data not)
- final-rename rename of final.pt's data file
- stats-torn   append to stats.jsonl: half the line is written, then the kill (a torn last line)
"""

from __future__ import annotations

import os
import re
import signal
import sys

_CKPT = re.compile(r"ckpt-\d{8}\.pt")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    kind, n = spec.split(":")
    left = [int(n)]

    def hit() -> bool:
        left[0] -= 1
        return left[0] == 0

    if kind == "ckpt-fsync":
        fsync = os.fsync

        def patched_fsync(fd):
            name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
            if _CKPT.search(os.path.basename(name)) and name.endswith(".tmp") and ".sha256" not in name and hit():
                _die()
            return fsync(fd)

        os.fsync = patched_fsync
    elif kind in ("ckpt-rename", "final-rename"):
        replace = os.replace
        pattern = _CKPT if kind == "ckpt-rename" else re.compile(r"final\.pt")

        def patched_replace(src, dst):
            if pattern.fullmatch(os.path.basename(str(dst))) and hit():
                _die()
            return replace(src, dst)

        os.replace = patched_replace
    elif kind == "stats-torn":
        from common import fsutil

        append_line = fsutil.append_line

        def patched_append(path, line):
            if str(path).endswith("stats.jsonl") and hit():
                with open(path, "a") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                _die()
            return append_line(path, line)

        fsutil.append_line = patched_append  # before common.train imports it
    else:
        raise SystemExit(f"unknown kill spec {spec}")


if __name__ == "__main__":
    install(sys.argv[1])
    from common.cli import main

    sys.exit(main(sys.argv[2:]))
