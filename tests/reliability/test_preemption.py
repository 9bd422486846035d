"""Preemption: SIGTERM and SIGUSR1 to a real `cmbench train` process make it checkpoint at the next step boundary
and exit with PREEMPTED_EXIT_STATUS; rerunning the command finishes bitwise identical to an uninterrupted run."""

from __future__ import annotations

import re
import signal
import subprocess

from common import checkpoint
from core.errors import PREEMPTED_EXIT_STATUS
from tests.reliability.conftest import (
    ITERATIONS,
    ROOT,
    assert_bitwise_equal,
    env,
    final_states,
    run_cli,
    stats_lines,
    train_cmd,
    wait_for,
)


def _preempt(config_file, out, sig) -> int:
    """Start training, send `sig` once it is past its resume point; return the step it checkpointed."""
    before = stats_lines(out)
    proc = subprocess.Popen(train_cmd(config_file, out), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda n=before: stats_lines(out) > n + 1, proc), "finished before the signal could be sent"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_STATUS, (proc.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(rf"cmbench train: error: {sig.name} received: checkpoint written at step (\d+) of "
                     rf"{ITERATIONS} in .*; rerun the same command to resume", lines[0])
    assert m, lines[0]
    step = int(m.group(1))
    assert 0 < step < ITERATIONS and before < step
    assert checkpoint.load(checkpoint.step_path(out / "checkpoints", step))["step"] == step
    return step


def test_sigterm_and_sigusr1_checkpoint_exit_and_resume_exactly(config_file, reference, tmp_path):
    out = tmp_path / "run"
    first = _preempt(config_file, out, signal.SIGTERM)
    second = _preempt(config_file, out, signal.SIGUSR1)
    assert second > first
    proc = run_cli(train_cmd(config_file, out))
    assert proc.returncode == 0 and f"resumed from step {second}" in proc.stdout, proc.stderr[-2000:]
    assert_bitwise_equal(reference, final_states(out))
    print(f"preempted at steps {first} (SIGTERM) and {second} (SIGUSR1), exit status {PREEMPTED_EXIT_STATUS}; "
          f"resumed run bitwise identical: yes")
