"""Exact resume after SIGKILL: kill a real `cmbench train` process at several points (inside checkpoint writes,
mid-append of the stats log, at random times), rerun the same command, and the final weights, EMA, target
network and optimizer state are bitwise those of an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess

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

# In order, on one run folder; each kill leaves the files the next attempt must cope with.
HOOK_KILLS = [
    "ckpt-fsync:2",   # dies writing ckpt-14 (temporary file written and fsynced, not renamed)
    "stats-torn:20",  # resumes from 7, dies with half a stats line at step 27
    "ckpt-rename:2",  # resumes from 21, dies between ckpt-35's new .sha256 and its data
]
TIMER_KILLS = 2  # then SIGKILL from outside at random moments of training
FINAL_KILL = "final-rename:1"  # dies between final.pt's new .sha256 and final.pt itself


def test_sigkill_anywhere_then_resume_is_bitwise_exact(config_file, reference, tmp_path, capsys):
    out = tmp_path / "run"
    kills = []
    for hook in HOOK_KILLS:
        proc = run_cli(train_cmd(config_file, out, hook=hook))
        assert proc.returncode == -signal.SIGKILL, (hook, proc.returncode, proc.stderr[-2000:])
        kills.append(hook)
    assert not (out / "checkpoints" / "ckpt-00000035.pt").exists()  # the kill left a sidecar without data
    assert list((out / "checkpoints").glob(".ckpt-*.tmp"))  # and a full-size temporary file

    rng = random.Random(7)
    for i in range(TIMER_KILLS):
        before = stats_lines(out)
        proc = subprocess.Popen(train_cmd(config_file, out), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        started = wait_for(lambda n=before: stats_lines(out) > n + 1, proc)  # it is training (lines past the resume)
        if started:
            delay = rng.uniform(0.0, 0.3)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            kills.append(f"timer:{i}")
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-2000:]
        if proc.returncode == 0:
            break  # finished before the kill: nothing left to interrupt

    if not (out / "final.pt").exists():
        proc = run_cli(train_cmd(config_file, out, hook=FINAL_KILL))
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        kills.append(FINAL_KILL)
        assert (out / "final.pt.sha256").exists() and not (out / "final.pt").exists()
        assert (out / "run_info.json").exists()  # written before final.pt, so the finished run keeps it

    proc = run_cli(train_cmd(config_file, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_bitwise_equal(reference, final_states(out))
    assert not list(out.rglob("*.tmp"))  # the temporary files the kills left behind were removed
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))  # no torn or doubled row
    with capsys.disabled():
        print(f"\nkill points: {len(kills)} ({', '.join(kills)}); resumed run bitwise identical: yes")
    assert len(kills) >= len(HOOK_KILLS) + 1
