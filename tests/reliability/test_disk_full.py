"""Disk full and read-only outputs: a one-line error naming the file, and nothing already written lost or
half-written.  Real tiny tmpfs mounts where this machine allows them (root in CI); a failing fsync otherwise."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from common import checkpoint, fsutil
from common.cli import main
from core.errors import OutputError
from tests.reliability.conftest import assert_bitwise_equal, final_states, run_cli, train_cmd


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder; skipped where mounting is not permitted."""
    mounted = []

    def mount(options: str):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_during_training_keeps_the_last_checkpoint_and_resumes_exactly(config_file, reference, tmpfs,
                                                                                   tmp_path):
    disk = tmpfs("size=160k")
    out = disk / "run"
    proc = run_cli(train_cmd(config_file, out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "cannot write" in err, err
    steps = checkpoint.list_steps(out / "checkpoints")
    assert steps, "no checkpoint survived"
    assert checkpoint.load(steps[0][1])["step"] == steps[0][0]  # the newest one is complete and valid
    assert not list(out.rglob("*.tmp"))  # no half-written temporary file left behind
    assert (out / "config.json").read_text().startswith("{")
    # the user frees space (here: moves the run to a disk with room) and reruns the same command
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    proc = run_cli(train_cmd(config_file, moved))
    assert proc.returncode == 0 and f"resumed from step {steps[0][0]}" in proc.stdout, proc.stderr[-2000:]
    assert_bitwise_equal(reference, final_states(moved))


def test_read_only_output_folder(config_file, tmpfs, tmp_path, capsys):
    ro = tmpfs("ro,size=64k")
    code = main(["train", "--config", str(config_file), "--dataset", "pts", "--method", "ct", "--out",
                 str(ro / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not writable (Read-only file system)" in err, err
    samples = tmp_path / "missing.npz"
    code = main(["evaluate", "--samples", str(samples), "--out", str(ro / "m.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"cannot write {ro / 'm.json'}: Read-only file system" in err, err  # before reading input


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    """Wherever mounting is not allowed: the same failure, injected at fsync (as a full disk reports it)."""
    path = tmp_path / "metrics.json"
    fsutil.atomic_write_json(path, {"fd": 1.5})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*metrics.json: No space left on device"):
        fsutil.atomic_write_json(path, {"fd": 2.5})
    with pytest.raises(OutputError, match="No space left on device"):
        checkpoint.save(tmp_path / "ckpt-00000001.pt", {"step": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary or half-written file
