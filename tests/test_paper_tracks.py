"""The paper tracks' real backbones on CPU: config/cifar10.yaml's DDPM++ takes two optimizer steps of every method
at batch 2 with the track's hyperparameters (random images stand in for CIFAR-10, which is never downloaded), and
config/imagenet64.yaml's ADM runs one forward with a JVP.  Parameter counts are checked against the papers'.

References: DDPM++ for CIFAR-10 has 55.7M parameters (EDM's SongUNet, ECT README 55.7M, sCM ~56M); ADM for
class-conditional ImageNet-64 has 296M (EDM's DhariwalUNet: 295.9M).  Tolerance 1%: the heads some methods add
(CTM's s-embedding 0.3M, sCM's log-variance head 17k) stay inside it.
"""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from common.config import load_config, resolve_run
from common.models import build_backbone, build_method
from common.train import _make_optimizer
from core.jvp import jvp

ROOT = Path(__file__).resolve().parents[1]
CIFAR = load_config(ROOT / "config/cifar10.yaml")
IMAGENET = load_config(ROOT / "config/imagenet64.yaml")
DDPMPP_PARAMS, ADM_PARAMS, TOLERANCE = 55.7e6, 295.9e6, 0.01


def _count(network, item_shape) -> int:
    with torch.device("meta"):  # counts without allocating 300M parameters
        return sum(p.numel() for p in build_backbone(network, item_shape).parameters())


def test_paper_backbones_have_the_papers_parameter_counts():
    cifar = _count(resolve_run(CIFAR, "cifar10", "teacher", 0).network, (3, 32, 32))
    adm = _count(resolve_run(IMAGENET, "imagenet64", "teacher", 0).network, (3, 64, 64))
    assert abs(cifar / DDPMPP_PARAMS - 1) < TOLERANCE, cifar
    assert abs(adm / ADM_PARAMS - 1) < TOLERANCE, adm


def _paper_run(method: str):
    run = resolve_run(CIFAR, "cifar10", method, 0, "config/cifar10.yaml")
    if method == "ctm":  # up to K_max teacher Heun steps per iteration: 2 instead of 17 keeps the test short
        run = dataclasses.replace(run, method_params={**run.method_params, "K_max": 2})
    return run


@pytest.fixture(scope="module")
def teacher():
    """The EDM teacher on the CIFAR-10 backbone (random weights: the test is about the plumbing, not quality)."""
    run = _paper_run("teacher")
    torch.manual_seed(0)
    method = build_method(run)
    return method, method.build_model(build_backbone(run.network, (3, 32, 32))).eval()


@pytest.mark.parametrize("method_name", list(CIFAR.methods))
def test_every_method_takes_two_steps_on_the_cifar10_paper_backbone(teacher, method_name):
    """What the loop does per step (common/train.py), at batch 2: the paper's optimizer, init, target network."""
    run = _paper_run(method_name)
    method = build_method(run)
    torch.manual_seed(1)
    model = method.build_model(build_backbone(run.network, (3, 32, 32)))
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / DDPMPP_PARAMS - 1) < TOLERANCE, n_params
    t_method, t_model = teacher
    if (run.train.init or method.default_init) == "teacher":
        _, unexpected = model.backbone.load_state_dict(t_model.backbone.state_dict(), strict=False)
        assert not unexpected  # the method's network extends the teacher's
    target = copy.deepcopy(model).requires_grad_(False) if method.target_decay(0.0) is not None else None
    optimizer = _make_optimizer(run, model.parameters())
    g = torch.Generator().manual_seed(2)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    for step in range(2):
        x0 = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        terms = method.loss(model, x0, progress=step / 2, teacher=t_method.as_teacher(t_model) if
                            method.needs_teacher else None, target=target)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(terms["loss"]) and all(torch.isfinite(gr).all() for gr in grads)
        # the loss reaches (almost) every parameter tensor through the backbone (CTM's zero-initialized s-branch
        # and sCM's unused heads may not, at first)
        assert sum(bool(gr.abs().sum() > 0) for gr in grads) > 0.9 * len(before)
        optimizer.step()
    # the optimizer moved the weights (RAdam's first steps are SGD-like: tensors with tiny gradients may not move)
    assert sum(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)) > 0


def test_imagenet64_adm_backbone_runs_a_forward_and_a_jvp():
    torch.manual_seed(0)
    net = build_backbone(resolve_run(IMAGENET, "imagenet64", "sct", 0).network, (3, 64, 64)).eval()
    assert abs(sum(p.numel() for p in net.parameters()) / ADM_PARAMS - 1) < TOLERANCE
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([0.3])
    labels = torch.nn.functional.one_hot(torch.tensor([7]), 1000).float()
    # one call: the forward (the primal) and the JVP along (dx, dt), as sCT's loss takes it (~3 forwards of cost)
    out, tangent = jvp(lambda a, b: net(a, b, labels=labels), (x, t), (torch.randn_like(x), torch.ones_like(t)))
    assert out.shape == tangent.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all() and tangent.abs().sum() > 0


def _dry_run_jobs(args: list[str]) -> dict[str, int]:
    """{rule: jobs} from the job table of `snakemake -n` in the repository (no data needed)."""
    import subprocess
    import sys

    snakemake = Path(sys.executable).parent / "snakemake"
    proc = subprocess.run([str(snakemake), "-n", "--cores", "1", "all", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = proc.stdout[proc.stdout.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]
    return {name: int(count) for name, count in (line.split() for line in table) if name != "total"}


@pytest.mark.parametrize("track", ["cifar10", "imagenet64"])
def test_rehearsal_budgets_run_the_full_tracks_graph(track):
    """`--config budget=rehearsal` (and rehearsal_gpu) schedule the same rules, the same number of jobs of each, as
    the full track: what the cluster runs is what a rehearsal ran."""
    full = _dry_run_jobs(["--configfile", f"config/{track}.yaml"])
    assert {"prepare", "feature_net", "inception_reference", "train_teacher", "train_method", "sample", "evaluate",
            "report", "track"} <= set(full)
    for budget in ("rehearsal", "rehearsal_gpu"):
        assert _dry_run_jobs(["--configfile", f"config/{track}.yaml", "--config", f"budget={budget}"]) == full


@pytest.mark.parametrize("track", [CIFAR, IMAGENET], ids=["cifar10", "imagenet64"])
def test_paper_tracks_train_in_float32_on_cuda(track):
    """fp32 by default (docs/cluster.md, "Precision") and `device: cuda`, which refuses to fall back to CPU."""
    for name in track.datasets:
        for method in track.methods:
            train = resolve_run(track, name, method, 0).train
            assert (train.amp, train.device) == ("none", "cuda"), (name, method)


def test_a_reference_larger_than_the_data_stops_the_dry_run(tmp_path):
    """The full track's sizes are checked against CIFAR-10's known split sizes before any job runs."""
    import subprocess
    import sys

    import yaml

    data = yaml.safe_load((ROOT / "config/cifar10.yaml").read_text())
    data["datasets"]["cifar10"]["inception"]["n_reference"] = 60000
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1", "all",
                           "--configfile", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "datasets.cifar10.inception.n_reference = 60000 but the cifar10 train split has 50000 images" in (
        proc.stdout + proc.stderr)
