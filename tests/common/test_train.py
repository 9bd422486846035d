"""The training loop: run folder contents, exact resume after a lost checkpoint, finished runs, bad input."""

import json

import pytest
import torch

from common import checkpoint
from common.config import load_config, resolve_run, with_overrides
from common.train import train
from core.errors import ConfigError, TrainingError

CONFIG = """
datasets:
  pts:
    data:
      kind: gmm
      n_train: 512
      gmm: {means: [[0.5, 0.0], [-0.5, 0.0]], stds: [0.1, 0.1], weights: [0.5, 0.5]}
    network: {kind: mlp, hidden: 32, depth: 2, dropout: 0.1}
    train: {iterations: 40, batch_size: 64, lr: 2e-3, ema_halflife_kimg: 0.5, log_every: 10,
            checkpoint_every: 10, keep_checkpoints: 5, device: cpu}
"""


@pytest.fixture
def run(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return resolve_run(load_config(path), "pts", "teacher", 0)


def quiet(msg):
    pass


def test_run_folder_contents(run, tmp_path):
    out = tmp_path / "run"
    train(run, out, progress_bar=False, log=quiet)
    assert json.loads((out / "config.json").read_text())["method"] == "teacher"
    lines = [json.loads(ln) for ln in (out / "stats.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [10, 20, 30, 40]
    assert all({"loss", "lr", "sec_per_iter", "kimg", "grad_norm"} <= set(ln) for ln in lines)
    state = checkpoint.load(out / "final.pt")
    assert state["step"] == 40 and state["item_shape"] == [2]
    assert set(state["model"]) == set(state["ema"])


def test_resume_is_exact(run, tmp_path):
    """Lose the last checkpoint and final.pt, rerun: the weights are bitwise those of the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(run, full, progress_bar=False, log=quiet)
    train(run, cut, progress_bar=False, log=quiet)
    for name in ("final.pt", "final.pt.sha256", "checkpoints/ckpt-00000040.pt", "checkpoints/ckpt-00000030.pt"):
        (cut / name).unlink()
    messages = []
    train(run, cut, progress_bar=False, log=messages.append)
    assert "resumed from step 20" in messages
    a, b = checkpoint.load(full / "final.pt"), checkpoint.load(cut / "final.pt")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    stats = [json.loads(ln)["step"] for ln in (cut / "stats.jsonl").read_text().splitlines()]
    assert stats == [10, 20, 30, 40]  # no duplicated history after the resume


def test_finished_run_is_not_retrained(run, tmp_path):
    out = tmp_path / "run"
    train(run, out, progress_bar=False, log=quiet)
    before = (out / "final.pt").stat().st_mtime_ns
    messages = []
    train(run, out, progress_bar=False, log=messages.append)
    assert "nothing to do" in messages[0]
    assert (out / "final.pt").stat().st_mtime_ns == before


def test_other_config_in_same_folder_is_refused(run, tmp_path):
    out = tmp_path / "run"
    train(run, out, progress_bar=False, log=quiet)
    other = type(run)(**{**run.__dict__, "train": with_overrides(run.train, {"lr": 1e-4}, "train", "t")})
    with pytest.raises(ConfigError, match="different config.*train"):
        train(other, out, progress_bar=False, log=quiet)


def test_nonfinite_losses_stop_the_run(run, tmp_path, monkeypatch):
    from methods.teacher import EDMTeacher

    monkeypatch.setattr(EDMTeacher, "loss", lambda self, model, x0, **kw: {"loss": model(x0, torch.ones(
        len(x0))).sum() * float("nan")})
    with pytest.raises(TrainingError, match=r"10 non-finite losses .* at step 9 .*lower train.lr"):
        train(run, tmp_path / "run", progress_bar=False, log=quiet)


def test_training_learns_the_exact_denoiser(run, tmp_path):
    """After 300 steps the model's denoiser is much closer to the mixture's exact one than at initialization."""
    from common.models import build_backbone, build_method
    from core.gmm import GaussianMixture

    out = tmp_path / "run"
    long = type(run)(**{**run.__dict__, "train": with_overrides(run.train, {"iterations": 300, "log_every": 50,
                                                                          "checkpoint_every": 300}, "t", "t")})
    train(long, out, progress_bar=False, log=quiet)
    gmm = GaussianMixture.from_spec(run.data.gmm)
    method = build_method(run)
    model = method.build_model(build_backbone(run.network, (2,))).eval()
    x0 = gmm.sample(2000, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((2000,), 0.3)
    x = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    exact = gmm.denoise(x, sigma[:, None])
    with torch.no_grad():
        torch.manual_seed(0)
        model.load_state_dict(method.build_model(build_backbone(run.network, (2,))).state_dict())
        err_init = (model(x, sigma) - exact).norm(dim=1).mean()
        model.load_state_dict(checkpoint.load(out / "final.pt")["ema"])
        err_final = (model(x, sigma) - exact).norm(dim=1).mean()
    assert err_final < 0.5 * err_init, (err_init, err_final)
