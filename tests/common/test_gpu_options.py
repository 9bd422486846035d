"""GPU speed switches, checked on CPU for correctness: each result equals the plain path within a stated tolerance
(benchmarks/results.md has the timings and the GPU plan; no timing is asserted here)."""

import pytest
import torch
import yaml

from common import checkpoint
from common.config import Config, from_dict, resolve_run
from common.models import build_backbone, build_method
from common.train import train
from core.errors import ConfigError
from methods.teacher import EDMTeacher

UNET = {"kind": "unet", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}
BASE = {"datasets": {
    "pts": {"data": {"kind": "gmm", "n_train": 512, "gmm": {"means": [[0.5, 0.0], [-0.5, 0.0]], "stds": [0.1, 0.1],
                                                            "weights": [0.5, 0.5]}},
            "network": {"kind": "mlp", "hidden": 32, "depth": 2},
            "train": {"iterations": 6, "batch_size": 64, "log_every": 3, "checkpoint_every": 100, "device": "cpu"}},
    "digits": {"data": {"kind": "digits"}, "network": UNET,
               "train": {"iterations": 2, "batch_size": 16, "log_every": 1, "checkpoint_every": 100,
                         "device": "cpu"}},
}}


def make_run(dataset="pts", method="teacher", train=None, network=None):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["methods"] = {method: {"train": train or {}, "network": network or {}}}
    return resolve_run(from_dict(Config, data, "", "tests"), dataset, method, 0, source="tests")


def final_weights(run, out):
    train(run, out, progress_bar=False, log=lambda m: None)
    return checkpoint.load(out / "final.pt")["model"]


def test_fused_adam_trains_like_plain_adam(tmp_path):
    """Same gradients, fused kernel: the trained weights agree to float32 rounding."""
    plain = final_weights(make_run(), tmp_path / "plain")
    fused = final_weights(make_run(train={"fused_optimizer": True}), tmp_path / "fused")
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-5, atol=1e-6)


def test_fused_optimizer_needs_adam():
    with pytest.raises(ConfigError, match="fused_optimizer"):
        make_run(train={"fused_optimizer": True, "optimizer": "radam"})


def test_switches_off_leave_the_run_config_unchanged():
    """Off by default and left out of config.json, so runs made before the switches existed stay valid."""
    assert "channels_last" not in make_run().to_json() and "fused_optimizer" not in make_run().to_json()


def _loss_and_grads(method, model, x0, **kw):
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    loss = method.loss(model, x0, progress=0.5, **kw)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _unet_model(method_name, network=None):
    run = make_run("digits", method_name, network=network)
    method = build_method(run)
    torch.manual_seed(0)
    return method, method.build_model(build_backbone(run.network, (1, 8, 8)))


def test_channels_last_gives_the_same_loss_and_gradients():
    method, model = _unet_model("teacher")
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    loss, grads = _loss_and_grads(method, model, x0)
    model.to(memory_format=torch.channels_last)
    assert model.backbone.state_dict()[next(k for k, v in model.backbone.state_dict().items() if v.ndim == 4)] \
        .is_contiguous(memory_format=torch.channels_last)
    loss_cl, grads_cl = _loss_and_grads(method, model, x0)
    torch.testing.assert_close(loss_cl, loss, rtol=1e-5, atol=1e-6)
    for g_cl, g in zip(grads_cl, grads, strict=True):
        torch.testing.assert_close(g_cl, g, rtol=1e-4, atol=1e-5)


def test_channels_last_in_the_loop(tmp_path):
    weights = final_weights(make_run("digits", train={"channels_last": True}), tmp_path / "cl")
    conv = next(v for v in weights.values() if v.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and all(v.isfinite().all() for v in weights.values())


@pytest.mark.parametrize("method_name, network", [("teacher", {}), ("sct", {"logvar_head": True}),
                                                  ("facm", {"second_time_input": True})])
def test_bf16_autocast_matches_float32(method_name, network):
    """bf16 autocast (8 mantissa bits) against float32, JVP methods included: the loss within 5% and the
    gradient direction within cos 0.99."""
    method, model = _unet_model(method_name, network)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    kw = {}
    if method.needs_teacher:
        teacher_net = EDMTeacher().build_model(build_backbone(make_run("digits").network, (1, 8, 8)))
        kw["teacher"] = EDMTeacher().as_teacher(teacher_net)
    loss, grads = _loss_and_grads(method, model, x0, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf, grads_bf = _loss_and_grads(method, model, x0, **kw)
    assert abs(float(loss_bf) - float(loss)) <= 0.05 * abs(float(loss))
    flat, flat_bf = torch.cat([g.flatten() for g in grads]), torch.cat([g.float().flatten() for g in grads_bf])
    assert torch.nn.functional.cosine_similarity(flat, flat_bf, dim=0) > 0.99


def test_compiled_graph_gives_the_same_loss_and_jvp():
    """torch.compile (dynamo + AOTAutograd; the 'aot_eager' backend skips inductor's C++ build, minutes on CPU) of
    sCT's network: the loss, whose tangent is a JVP through the compiled module, equals eager mode."""
    run = make_run("pts", "sct", network={"logvar_head": True})
    method = build_method(run)
    torch.manual_seed(0)
    model = method.build_model(build_backbone(run.network, (2,)))
    x0 = torch.randn(64, 2)
    loss, grads = _loss_and_grads(method, model, x0)
    model.compile(backend="aot_eager")
    loss_c, grads_c = _loss_and_grads(method, model, x0)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-6)
