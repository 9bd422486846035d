"""GPU figures: per method and speed switch, seconds per training iteration and the time ratio to the teacher
beside the FLOP ratio; the JVP's cost relative to one forward pass.  The GPU half of the plan in notes.md.

Defaults: the CIFAR-10 paper track's backbone (DDPM++, 55.7M parameters) at batch 128 on synthetic 32x32 data
(timing and FLOPs do not depend on the pixels, and the machine may not hold CIFAR-10).  Rows are written to
--out as they are measured, so a run cut short keeps what it measured.

    python -m benchmarks.gpu --out benchmarks/results_gpu.md
    python -m benchmarks.gpu --device cpu --config config/smoke.yaml --dataset digits --repeats 1   # wiring check
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.config import load_config, resolve_run
from common.data import Dataset

from . import jvp_cost
from .profile import top_ops
from .setup import build, teacher_for
from .timing import interleaved, median, paired_ratio

METHODS = ["cd", "ct", "ict", "ect", "ctm", "sct", "scd", "facm"]
SWITCHES = {  # fp32 keeps torch's defaults: cuDNN convolutions in TF32, matmuls in IEEE float32
    "fp32": {"amp": "none"},
    "bf16": {"amp": "bf16"},
    "bf16 + NHWC + fused Adam": {"amp": "bf16", "channels_last": True, "fused_optimizer": True},
    "bf16 + NHWC + fused Adam + compile": {"amp": "bf16", "channels_last": True, "fused_optimizer": True,
                                           "compile": True},
}


def synthetic(config, dataset: str, n: int) -> Dataset:
    """Random images of the dataset's shape in [-1, 1]: what a timing needs, without the data set."""
    spec = config.datasets[dataset].data
    shape = {"cifar10": (3, 32, 32), "imagenet64": (3, 64, 64), "mnist": (1, 28, 28),
             "fashion_mnist": (1, 28, 28), "digits": (1, 8, 8)}[spec.kind]
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.rand(n, *shape, generator=g) * 2 - 1, None, 0, spec.kind)


class Report:
    def __init__(self, path: Path, header: list[str]):
        self.path, self.lines = path, header

    def add(self, *lines: str) -> None:
        self.lines += lines
        self.path.write_text("\n".join(self.lines) + "\n")
        print(*lines, sep="\n", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/cifar10.yaml")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds per pair (medians)")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    p.add_argument("--compile-methods", nargs="*", default=["sct"],
                   help="methods timed with torch.compile (compiling each costs minutes)")
    p.add_argument("--out", default="benchmarks/results_gpu.md")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = load_config(args.config)
    with_batch = dataclasses.replace(config.datasets[args.dataset],
                                     train=dataclasses.replace(config.datasets[args.dataset].train,
                                                               batch_size=args.batch, devices=1, device=args.device))
    config = dataclasses.replace(config, datasets={**config.datasets, args.dataset: with_batch})
    data = synthetic(config, args.dataset, max(4 * args.batch, 1024))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    report = Report(Path(args.out), [
        "# GPU benchmarks (issue 8)", "",
        f"Written by `{' '.join(['python -m benchmarks.gpu', *(sys.argv[1:] if argv is None else argv)])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Device: **{gpu}** ({args.device}); torch {torch.__version__}, python {platform.python_version()}; "
        f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
        f"{torch.backends.cuda.matmul.allow_tf32}. Backbone: the `{args.dataset}` track's "
        f"({args.config}), batch {args.batch}, synthetic data. Timings are medians of {args.repeats} interleaved "
        f"(teacher, method) rounds after the first step and one warm-up round, with the device synchronized "
        f"around each call.", ""])
    started = time.time()
    _jvp_table(args, config, data, device, sync, report)
    _train_table(args, config, data, device, sync, report)
    _profiles(args, config, data, device, report)
    report.add("", f"Total {time.time() - started:.0f} s.")


def _train_table(args, config, data, device, sync, report) -> None:
    teacher = teacher_for(config, args.dataset, data, device)
    flops = {}
    for name in ["teacher", *args.methods]:  # FLOPs are the same under every switch: count once, in float32
        bench = build(config, args.dataset, name, data, teacher, device)
        with FlopCounterMode(display=False) as counter:
            for r in range(2):
                bench.loss_and_backward(r)
        flops[name] = counter.get_total_flops() / 2
        del bench
    n_params = sum(p.numel() for p in build(config, args.dataset, "teacher", data, teacher, device).model.parameters())
    report.add(f"## Training iteration per method and switch ({n_params / 1e6:.1f}M parameters)", "",
               "time ratio = median of paired (method / teacher) iteration times under the same switch; goal "
               "(as on CPU): time ratio / FLOP ratio <= 1.15. first step = the first training iteration (includes "
               "compilation under compile). loss drift = |loss - fp32 loss| / |fp32 loss| on a held-out batch after "
               f"the same {args.repeats + 2} training steps from the same weights (the networks' last layers start "
               "at zero, so a loss at initialization cannot show precision).", "",
               "| method | switch | GFLOP/iter | FLOP ratio | s/iter | TFLOP/s | time ratio | time / FLOP ratio "
               "| first step s | loss drift | peak GiB |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    fp32_loss: dict[str, float] = {}
    for switch in args.switches:
        overrides = SWITCHES[switch]
        if device.type != "cuda" and overrides.get("fused_optimizer"):
            overrides = {k: v for k, v in overrides.items() if k != "fused_optimizer"}
        base = build(config, args.dataset, "teacher", data, teacher, device, **overrides)
        base.step(0)
        for name in ["teacher", *args.methods]:
            if overrides.get("compile") and name not in ["teacher", *args.compile_methods]:
                continue
            try:
                _train_row(args, config, data, device, sync, report, teacher, flops, base, name, switch, overrides,
                           fp32_loss)
            except Exception as e:  # a switch that fails for one method is a finding: record it, go on
                report.add(f"| {name} | {switch} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del base
        gc.collect()


def _train_row(args, config, data, device, sync, report, teacher, flops, base, name, switch, overrides, fp32_loss):
    held_out = 10_000  # a round index no timing uses: its batch and noise are new to every network
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if overrides.get("fused_optimizer") and resolve_run(config, args.dataset, name, 0).train.optimizer != "adam":
        overrides = {k: v for k, v in overrides.items() if k != "fused_optimizer"}  # torch fuses Adam only
        switch = switch.replace("fused Adam", "(no fused RAdam)")
    bench = build(config, args.dataset, name, data, teacher, device, **overrides)
    sync()
    first = time.perf_counter()
    bench.step(0)
    sync()
    first = time.perf_counter() - first
    # the teacher row times its own fresh network, so every row's network takes the same steps
    pair = {"teacher": bench.step} if name == "teacher" else {"teacher": base.step, name: bench.step}
    times = interleaved(pair, args.repeats, warmup=1, sync=sync)
    ratio = 1.0 if name == "teacher" else paired_ratio(times[name], times["teacher"])
    with torch.no_grad():
        loss = float(bench.loss(held_out))
    if overrides.get("amp") == "none":
        fp32_loss[name] = loss
    ref = fp32_loss.get(name, float("nan"))
    s = median(times[name])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    f_ratio = flops[name] / flops["teacher"]
    report.add(f"| {name} | {switch} | {flops[name] / 1e9:.0f} | {f_ratio:.2f} | {s:.4f} | "
               f"{flops[name] / s / 1e12:.1f} | {ratio:.2f} | {ratio / f_ratio:.2f} | {first:.2f} | "
               f"{abs(loss - ref) / abs(ref):.1e} | {peak:.1f} |")


def _profiles(args, config, data, device, report) -> None:
    """Where the time of a teacher and an sCT iteration goes (the JVP method's gap), in float32."""
    teacher = teacher_for(config, args.dataset, data, device)
    for name in ("teacher", "sct"):
        bench = build(config, args.dataset, name, data, teacher, device, amp="none")
        bench.step(0)
        rows = top_ops(bench.step, rounds=2, k=10, cuda=device.type == "cuda")
        where = "GPU" if device.type == "cuda" else "CPU"
        report.add("", f"Profile of one {name} iteration, fp32 (top operators by self {where} time):", "",
                   "| operator | share | calls/iter |", "|---|---:|---:|",
                   *(f"| `{op[:90]}` | {share:.1%} | {calls} |" for op, share, calls in rows))
        del bench


def _jvp_table(args, config, data, device, sync, report) -> None:
    rows = jvp_cost.measure(config, args.dataset, args.batch, max(args.repeats, 5), data=data, device=device,
                            sync=sync)
    report.add("", f"## JVP of the sCM network, batch {args.batch} (float32; sCM reports about one forward)", "",
               "| implementation | calls | seconds | / forward | relative error vs float64 |",
               "|---|---|---:|---:|---:|",
               *(f"| {r.name} | {r.calls} | {r.seconds:.4f} | {r.vs_forward:.2f} | {r.rel_error:.1e} |"
                 for r in rows))


if __name__ == "__main__":
    main()
