"""Preemption signals: SIGTERM and SIGUSR1 ask the training loop to checkpoint at the next step boundary and exit.

SLURM sends SIGTERM at preemption and at the time limit (then SIGKILL after KillWait, often 30 s), and, with
`sbatch --signal=USR1@180`, SIGUSR1 three minutes before the limit, which leaves time for a checkpoint.  The loop
then exits with PREEMPTED_EXIT_STATUS (core.errors); Snakemake's `retries` (or a SLURM requeue) reruns the same
command, which resumes exactly.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by a signal handler; read by the loop once per step (a handler must not write checkpoints itself)."""

    def __init__(self):
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_on_signals():
    """Within the block, SIGTERM/SIGUSR1 set the yielded StopRequest instead of killing the process."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield request
        return

    def handler(signum, frame):
        request.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
