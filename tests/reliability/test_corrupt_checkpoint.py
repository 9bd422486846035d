"""Corrupt or truncated checkpoints inside the training loop: detected by checksum, the loop falls back to the
previous one and says so, and the resumed run is still bitwise exact; with none valid, a clear one-line error."""

from __future__ import annotations

import pytest

from common import checkpoint
from common.cli import main
from common.config import load_config, resolve_run
from common.train import train
from tests.reliability.conftest import ITERATIONS, assert_bitwise_equal


@pytest.fixture
def run(config_file):
    return resolve_run(load_config(config_file), "pts", "teacher", 0)


def _states(out):
    return {"final": checkpoint.load(out / "final.pt"),
            "last": checkpoint.load(checkpoint.step_path(out / "checkpoints", ITERATIONS))}


def _flip(path, at=200):
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_corrupt_newest_and_final_fall_back_and_resume_exactly(run, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(run, full, progress_bar=False, log=lambda m: None)
    train(run, cut, progress_bar=False, log=lambda m: None)
    newest, previous = [p for _, p in checkpoint.list_steps(cut / "checkpoints")]  # 60 and 56 (keep 2)
    _flip(newest)  # a bit flip
    _flip(cut / "final.pt")
    messages = []
    train(run, cut, progress_bar=False, log=messages.append)
    text = "\n".join(messages)
    assert f"warning: checkpoint {cut / 'final.pt'} is corrupt" in text and "training again" in text
    assert f"warning: checkpoint {newest} is corrupt" in text and "falling back to an earlier checkpoint" in text
    assert "resumed from step 56" in messages
    assert_bitwise_equal(_states(full), _states(cut))


def test_truncated_newest_falls_back(run, tmp_path):
    out = tmp_path / "run"
    train(run, out, progress_bar=False, log=lambda m: None)
    (out / "final.pt").unlink()
    newest = checkpoint.step_path(out / "checkpoints", ITERATIONS)
    newest.write_bytes(newest.read_bytes()[:1000])
    messages = []
    train(run, out, progress_bar=False, log=messages.append)
    assert any(f"checkpoint {newest} is corrupt" in m for m in messages) and "resumed from step 56" in messages


def test_no_valid_checkpoint_is_one_clear_line(config_file, run, tmp_path, capsys):
    out = tmp_path / "run"
    train(run, out, progress_bar=False, log=lambda m: None)
    (out / "final.pt").unlink()
    for _, path in checkpoint.list_steps(out / "checkpoints"):
        path.write_bytes(path.read_bytes()[:-10])  # both truncated
    code = main(["train", "--config", str(config_file), "--dataset", "pts", "--method", "teacher", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"cmbench train: error: no valid checkpoint in {out / 'checkpoints'} (all 2 failed their "
                      f"checks); delete the folder to start over")
