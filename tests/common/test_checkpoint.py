"""Checkpoints: round trip, checksum catches corruption and truncation, fallback to the previous one."""

import pytest
import torch

from common import checkpoint
from core.errors import CheckpointError


def state(v):
    return {"step": v, "w": torch.full((3, 3), float(v)), "nested": {"lr": 0.1, "ids": [1, 2]}}


def test_round_trip(tmp_path):
    p = tmp_path / "a.pt"
    digest = checkpoint.save(p, state(4))
    assert (tmp_path / "a.pt.sha256").read_text().strip() == digest
    back = checkpoint.load(p)
    assert back["step"] == 4 and torch.equal(back["w"], state(4)["w"]) and back["nested"]["ids"] == [1, 2]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar"])
def test_damage_is_detected(tmp_path, damage):
    p = tmp_path / "a.pt"
    checkpoint.save(p, state(1))
    data = p.read_bytes()
    if damage == "flip":
        p.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    else:
        (tmp_path / "a.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match=str(p)):
        checkpoint.load(p)


def test_latest_falls_back_and_prunes(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(checkpoint.step_path(tmp_path, step), state(step))
    newest = checkpoint.step_path(tmp_path, 30)
    newest.write_bytes(newest.read_bytes()[:50])
    messages = []
    got = checkpoint.load_latest(tmp_path, log=messages.append)
    assert got["step"] == 20 and "falling back" in messages[0]
    checkpoint.prune(tmp_path, keep=1)
    assert [s for s, _ in checkpoint.list_steps(tmp_path)] == [30]


def test_no_valid_checkpoint_is_an_error(tmp_path):
    p = checkpoint.step_path(tmp_path, 5)
    checkpoint.save(p, state(5))
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        checkpoint.load_latest(tmp_path, log=lambda m: None)
    assert checkpoint.load_latest(tmp_path / "empty") is None
