"""Progress of long loops (sampling, Inception features): rate and ETA, so a 50,000-image job is never silent.

On a terminal a tqdm bar; otherwise (a SLURM or Snakemake log file) one line every `every` seconds and one at the
end.  The rate counts only the work done by this process, so a resumed job's ETA is not flattered by the shards
an earlier attempt left behind.
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """`update(k)` after k items are done; `skip(k)` for k items found done (resumed); `close()` at the end."""

    def __init__(self, total: float, desc: str, unit: str = "img", every: float = 30.0, stream=None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = self.skipped = self.fresh = 0.0
        self.start = self.last = clock()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def skip(self, k: float) -> None:
        self.done += k
        self.skipped += k
        if self.bar is not None:
            self.bar.update(k)

    def update(self, k: float) -> None:
        self.done += k
        self.fresh += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.clock() - self.last >= self.every and self.done < self.total:  # the end has its own line
            self._line()

    def rate(self) -> float:
        """Items per second done by this process (0 before any)."""
        elapsed = self.clock() - self.start
        return self.fresh / elapsed if elapsed > 0 else 0.0

    def _line(self, final: bool = False) -> None:
        self.last = self.clock()
        rate = self.rate()
        left = self.total - self.done
        eta = "done" if left <= 0 else f"ETA {_duration(left / rate)}" if rate > 0 else "ETA unknown"
        resumed = f", {self.skipped:g} found done" if self.skipped else ""
        when = f" in {_duration(self.clock() - self.start)}" if final else ""
        print(f"{self.desc}: {self.done:g}/{self.total:g} {self.unit}{resumed}{when}, {rate:.3g} {self.unit}/s, "
              f"{eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
