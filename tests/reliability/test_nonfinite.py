"""Non-finite losses and gradients: counted, logged, the step skipped (never replaced); too many in a row stop the
run with an error naming the step and the last finite loss, and MLflow shows the run as FAILED."""

from __future__ import annotations

import json

import pytest
import torch

from common import checkpoint
from common.cli import main
from common.config import load_config, resolve_run, with_overrides
from common.records import FAILURE
from common.train import train
from core.errors import TrainingError
from methods.teacher import EDMTeacher

ITERATIONS = 30


def _poison(monkeypatch, nan_loss: set[int], nan_grad: set[int]) -> dict[int, float]:
    """Make the teacher's loss NaN at some steps and its gradient NaN (loss finite) at others."""
    original = EDMTeacher.loss
    finite: dict[int, float] = {}

    def loss(self, model, x0, **kw):
        terms = original(self, model, x0, **kw)
        step = round(kw["progress"] * ITERATIONS)
        if step in nan_loss:
            terms["loss"] = terms["loss"] * float("nan")
        elif step in nan_grad:  # d sqrt(u)/du = inf at u = 0, times du/dp = 0: NaN gradients, finite loss
            terms["loss"] = terms["loss"] + torch.sqrt(next(model.parameters()).sum() * 0)
        else:
            finite[step] = float(terms["loss"].detach())
        return terms

    monkeypatch.setattr(EDMTeacher, "loss", loss)
    return finite


@pytest.fixture
def run(config_file):
    r = resolve_run(load_config(config_file), "pts", "teacher", 0)
    t = with_overrides(r.train, {"iterations": ITERATIONS, "log_every": 10, "checkpoint_every": 10,
                                 "max_nonfinite": 3}, "train", "t")
    return type(r)(**{**r.__dict__, "train": t})


def test_isolated_nonfinite_steps_are_counted_and_skipped(run, tmp_path, monkeypatch):
    _poison(monkeypatch, nan_loss={3, 4, 17}, nan_grad={6, 22, 23})  # at most 3 in a row: the run goes on
    out = tmp_path / "run"
    train(run, out, progress_bar=False, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["nonfinite_total"] for r in rows] == [3, 4, 6]
    state = checkpoint.load(out / "final.pt")
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[key].values())
    assert not (out / FAILURE).exists()


def test_nonfinite_in_a_row_stops_with_step_and_last_finite_loss(run, tmp_path, monkeypatch, capsys):
    finite = _poison(monkeypatch, nan_loss={12, 14}, nan_grad={13})  # 12, 13, 14: three in a row
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train(run, out, progress_bar=False, log=lambda m: None)
    message = str(info.value)
    assert f"3 non-finite losses or gradients in a row at step 14 of teacher/pts (last finite loss " \
           f"{finite[11]:.4g})" in message
    record = json.loads((out / FAILURE).read_text())
    assert record["status"] == "FAILED" and record["step"] == 14 and record["nonfinite_total"] == 3
    assert not (out / "final.pt").exists()
    assert checkpoint.load_latest(out / "checkpoints", log=lambda m: None)["step"] == 10  # earlier work kept

    from mlflow.tracking import MlflowClient

    from common.tracking import ingest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, ids = ingest([out], [], [], [], uri, "reliability", str(tmp_path / "artifacts"), log=lambda m: None)
    mlflow_run = MlflowClient(uri).get_run(ids["pts/teacher/seed0"])
    assert mlflow_run.info.status == "FAILED"
    assert "at step 14" in mlflow_run.data.tags["cmbench.error"]
    assert [m.value for m in MlflowClient(uri).get_metric_history(mlflow_run.info.run_id, "train/nonfinite_total")
            ] == [0.0]  # the curve up to the failure is kept


def test_nonfinite_stop_through_the_cli_is_one_line(config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(EDMTeacher, "loss", lambda self, model, x0, **kw: {"loss": model(x0, torch.ones(len(x0)))
                                                                           .sum() * float("nan")})
    code = main(["train", "--config", str(config_file), "--dataset", "pts", "--method", "teacher",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "10 non-finite losses or gradients in a row at step 9 of teacher/pts (last finite loss nan)" in err
