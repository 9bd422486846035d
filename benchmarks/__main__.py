"""`python -m benchmarks` (or `make bench`): measure, then write benchmarks/results.md.

Default run: a few minutes on 2 cores.  `--quick-track` adds the end-to-end `snakemake --cores 2 all` run in a clean
copy of the repository (about 25 minutes); run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from common.config import load_config

from . import fid_path, jvp_cost, machine, quick_track, sampling, train_cost
from .profile import top_ops
from .setup import build, teacher_for

HERE = Path(__file__).resolve().parent
METHODS = ["cd", "ct", "ict", "ect", "ctm", "sct", "scd", "facm"]
TRAIN_GOAL, SAMPLE_GOAL = 1.15, 1.05


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--config", default=str(HERE.parent / "config/config.yaml"))
    p.add_argument("--dataset", default="digits", help="dataset of the training, JVP and sampling figures")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (fixed: ratios need it)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per comparison (medians)")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--quick-track", action="store_true", help="also run the quick track end to end (~25 min)")
    p.add_argument("--out", default=str(HERE / "results.md"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's BLAS too (the FD's eigvals)
    config = load_config(args.config)
    load_before = machine.load_average()
    started = time.time()
    print(f"benchmarks on {args.dataset}, {args.threads} thread(s), {args.repeats} rounds")
    train_rows = train_cost.measure(config, args.dataset, args.methods, args.repeats)
    profiles = _gap_profiles(config, args.dataset, train_rows)
    print("  JVP")
    jvp_rows = jvp_cost.measure(config, args.dataset, config.datasets[args.dataset].train.batch_size, args.repeats)
    sample_rows = sampling.measure(config, args.dataset, ["teacher", *args.methods], args.repeats)
    if args.dataset != "gmm" and "gmm" in config.datasets:  # the MLP: a tiny network, where overhead shows most
        sample_rows += sampling.measure(config, "gmm", ["teacher", "cd", "ctm", "sct", "facm"], args.repeats)
    print("  FD-CNN feature path")
    fid_rows = fid_path.measure(config, args.dataset, args.repeats)
    quick = quick_track.measure() if args.quick_track else None
    load_after = machine.load_average()
    text = render(args, train_rows, profiles, jvp_rows, sample_rows, fid_rows, quick, (load_before, load_after),
                  time.time() - started)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def _gap_profiles(config, dataset, rows):
    """The top operators of every method whose time ratio exceeds its FLOP ratio by more than the goal."""
    out = {}
    data = teacher = None
    for row in rows[1:]:
        if row.vs_flops <= TRAIN_GOAL:
            continue
        if data is None:
            base = build(config, dataset, "teacher")
            data, teacher = base.data, teacher_for(config, dataset, base.data)
            out["teacher"] = top_ops(base.step)
        out[row.method] = top_ops(build(config, dataset, row.method, data, teacher).step)
    return out


def _ok(ratio: float, goal: float) -> str:
    return "yes" if ratio <= goal else "**no**"


def render(args, train_rows, profiles, jvp_rows, sample_rows, fid_rows, quick, loads, seconds) -> str:
    info = machine.describe()
    busy = loads[0] > 0.5 or loads[1] > args.threads + 0.5  # our own run accounts for `threads` of the load
    lines = [
        "# Benchmarks (issue 8)", "",
        f"Written by `python -m benchmarks --dataset {args.dataset} --threads {args.threads} --repeats "
        f"{args.repeats}{' --quick-track' if args.quick_track else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {seconds / 60:.1f} min.", "",
        "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info.items()],
        f"| 1-min load average (start, end) | {loads[0]:.2f}, {loads[1]:.2f} |", "",
    ]
    if busy:
        lines += ["**Measured under contention**: other processes were using the CPU (load average above). Absolute "
                  "seconds are noisy; the ratios are medians of paired, interleaved measurements (A, B, A, B, ...), "
                  "which cancel most of the drift.", ""]
    lines += [
        f"## Training cost per method ({args.dataset}, every method at the teacher's batch size)", "",
        "time ratio = median over interleaved rounds of (method iteration / teacher iteration), a full iteration of "
        "the training loop (loss, backward, gradient clip, optimizer, EMA, target network); FLOP ratio = "
        "torch.utils.flop_counter over loss + backward (matmul/conv/attention; a JVP counts, teacher calls of "
        "distillation methods count), averaged over the same batches. Goal: time ratio / FLOP ratio <= "
        f"{TRAIN_GOAL}.", "",
        "| method | s/iter (median) | time ratio | GFLOP/iter | FLOP ratio | time / FLOP ratio | goal |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in train_rows:
        if r.method == "teacher":
            lines.append(f"| teacher | {r.teacher_s:.4f} | 1 | {r.gflops:.3f} | 1 | 1 | |")
        else:
            lines.append(f"| {r.method} | {r.method_s:.4f} | {r.time_ratio:.2f} | {r.gflops:.3f} | "
                         f"{r.flop_ratio:.2f} | {r.vs_flops:.2f} | {_ok(r.vs_flops, TRAIN_GOAL)} |")
    for name, ops in profiles.items():
        lines += ["", f"Profile of one {name} iteration (top operators by self CPU time):", "",
                  "| operator | share | calls/iter |", "|---|---:|---:|",
                  *[f"| `{op}` | {share:.1%} | {calls} |" for op, share, calls in ops]]
    lines += [
        "", f"## JVP implementations (sCM's F on the {args.dataset} backbone, sCT's tangent)", "",
        "Relative error = ||J - J_ref|| / ||J_ref|| against torch.func.jvp in float64; cost = median of paired "
        "(JVP time / no-grad forward time).", "",
        "| implementation | what it runs | s (median) | cost / forward | rel. error |", "|---|---|---:|---:|---:|",
        *[f"| {r.name} | {r.calls} | {r.seconds:.4f} | {r.vs_forward:.2f} | {r.rel_error:.1e} |" for r in jvp_rows],
        "", "## Sampling overhead (each dataset's eval batch)", "",
        "sampler = method.sample on given latents (torch noise); generate = common.sample.generate, the pipeline's "
        "path with per-image PCG64 seeds (latents and re-noising drawn per image on the host). Ratios are time / "
        f"(NFE x one bare forward on the same batch). Goal: sampler <= {SAMPLE_GOAL}.", "",
        "| dataset | method | steps | NFE | forward s | sampler / forwards | goal | generate / forwards |",
        "|---|---|---:|---:|---:|---:|---|---:|",
        *[f"| {r.dataset} | {r.method} | {r.steps} | {r.nfe} | {r.forward_s:.4f} | {r.sampler_ratio:.3f} | "
          f"{_ok(r.sampler_ratio, SAMPLE_GOAL)} | {r.generate_ratio:.3f} |" for r in sample_rows],
        "", f"Median over the {len(sample_rows)} rows: sampler / forwards "
        f"{statistics.median(r.sampler_ratio for r in sample_rows):.3f}, generate / forwards "
        f"{statistics.median(r.generate_ratio for r in sample_rows if r.dataset == args.dataset):.3f} on "
        f"{args.dataset}.",
        "", f"## FD-CNN feature path ({args.dataset}, 2 x 2000 images, batch 500)", "",
        "Same images (2,000 generated + 2,000 reference), same extractor, same batch size; the two FD values are "
        "checked identical.", "",
        "| path | s (median) | features/s |", "|---|---:|---:|",
        *[f"| {r.path} | {r.seconds:.3f} | {r.features_per_s:,.0f} |" for r in fid_rows],
    ]
    ours, direct = fid_rows[0].features_per_s, fid_rows[1].features_per_s
    lines += ["", f"Features/s, ours / direct: {ours / direct:.2f}x (goal: >= 1, no slower). The FD itself is "
              "numpy's eigvals on 128 x 128 covariances, the same call on both paths.", "",
              "## Quick track end to end", ""]
    if quick:
        lines += [f"`{quick['command']}` from a clean copy ({quick['folder']}): wall "
                  f"**{quick['wall_s'] / 60:.1f} min** (goal < 30), peak RSS of any process "
                  f"**{quick['peak_rss_mib']:.0f} MiB**."]
    else:
        lines += ["Not run in this invocation (opt-in: `python -m benchmarks --quick-track`, about 25 minutes)."]
    notes = HERE / "notes.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
