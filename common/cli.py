"""`cmbench` (also `python -m common.cli`): one command per pipeline stage, explicit inputs and outputs.

Snakemake rules and users call the same commands.  Every user-facing failure is one line on stderr and
exit status 2 (PREEMPTED_EXIT_STATUS, 75, after SIGTERM/SIGUSR1 and a checkpoint); nothing already written is
removed.
"""

from __future__ import annotations

import argparse
import sys
import time

from core.errors import CmbenchError

from .fsutil import atomic_write_json, check_writable


def _dataset_entry(args, list_defined: bool = False):
    """The config entry of --dataset in --config; `list_defined` names the defined datasets in the error."""
    from .config import load_config

    config = load_config(args.config)
    if args.dataset not in config.datasets:
        defined = f" (defined: {', '.join(sorted(config.datasets))})" if list_defined else ""
        raise CmbenchError(f"{args.config}: unknown dataset '{args.dataset}'{defined}")
    return config.datasets[args.dataset]


def _dataset(args, entry):
    """--data (a prepared file) if given, else the dataset read from its source."""
    from .data import load_dataset, load_prepared

    return load_prepared(args.data) if args.data else load_dataset(entry.data)


def cmd_prepare(args) -> None:
    from .data import load_dataset, save_prepared

    ds = load_dataset(_dataset_entry(args, list_defined=True).data)
    digest = save_prepared(ds, args.out)
    print(f"wrote {args.out}: {len(ds)} items of shape {ds.item_shape}, sha256 {digest[:12]}")


def cmd_features(args) -> None:
    from .device import resolve_device
    from .metrics.fd_cnn import save_classifier

    entry = _dataset_entry(args)
    ds = _dataset(args, entry)
    acc = save_classifier(ds, entry.eval.fd_cnn, args.out, resolve_device(args.device))
    print(f"wrote {args.out}: FD-CNN({args.dataset}) classifier, training accuracy {acc:.4f}")


def cmd_inception_ref(args) -> None:
    from .device import resolve_device
    from .metrics.inception_fid import build_reference

    entry = _dataset_entry(args)
    if entry.data.kind == "gmm":
        raise CmbenchError(f"{args.config}: dataset '{args.dataset}' holds points; Inception FID is for images")
    check_writable(args.out)
    ds = _dataset(args, entry)
    meta = build_reference(ds, entry.inception, f"datasets.{args.dataset}.inception", args.out, args.cache,
                           resolve_device(args.device))
    print(f"wrote {args.out}: {meta['weights_label']}, N = {meta['n']}, real-vs-real FID torch-fidelity "
          f"{meta['fid_torch_fidelity_real']:.4g}, clean-fid {meta['fid_clean_fid_real']:.4g}")


def cmd_train(args) -> None:
    from .config import load_config, resolve_run
    from .preemption import stop_on_signals
    from .train import train

    config = load_config(args.config)
    run = resolve_run(config, args.dataset, args.method, args.seed, source=args.config)
    with stop_on_signals() as stop:  # SIGTERM / SIGUSR1: checkpoint, exit PREEMPTED_EXIT_STATUS, rerun resumes
        train(run, args.out, data_path=args.data, teacher_dir=args.teacher, archive_stale=args.archive_stale,
              stop=stop)


def cmd_sample(args) -> None:
    from .compute import sampling_compute
    from .config import to_dict
    from .device import resolve_device
    from .models import load_trained
    from .records import write_samples
    from .sample import generate

    if args.steps < 1:
        raise CmbenchError(f"--steps must be >= 1, got {args.steps}")
    if args.n < 1:
        raise CmbenchError(f"--n must be >= 1, got {args.n}")
    check_writable(args.out)
    device = resolve_device(args.device)
    run, method, model, item_shape = load_trained(args.run, device, args.weights)
    batch = args.batch_size or run.eval.batch_size
    tick = time.perf_counter()
    samples, latents, labels = generate(method, model, item_shape, args.n, args.steps, args.seed, batch, device,
                                        run.network.label_dim)
    seconds = time.perf_counter() - tick
    meta = {"run": to_dict(run), "run_dir": str(args.run), "steps": args.steps, "nfe": method.nfe(args.steps),
            "sample_seed": args.seed, "weights": args.weights, "start_sigma": method.start_sigma,
            "compute": sampling_compute(args.run, method, model, item_shape, args.steps, device,
                                        run.network.label_dim, seconds / args.n)}
    write_samples(args.out, samples.numpy(), latents.numpy(), labels.numpy() if labels is not None else None, meta)
    print(f"wrote {args.out}: {args.n} samples, {args.steps} steps = {meta['nfe']} NFE")


def cmd_evaluate(args) -> None:
    from .device import resolve_device
    from .evaluate import evaluate
    from .grids import save_grid

    check_writable(args.out)
    if args.grid:
        check_writable(args.grid)
    result = evaluate(args.samples, args.cache, resolve_device(args.device), data_path=args.data,
                      feature_net=args.feature_net, inception_ref=args.inception_ref)
    atomic_write_json(args.out, result)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items() if isinstance(v, float | int))
    print(f"{result['method']}/{result['dataset']} NFE {result['nfe']}: {shown}")
    if args.grid:  # the picture comes with the score: one process (and one torch import) less per samples file
        save_grid(args.samples, args.grid)


def cmd_grid(args) -> None:
    from .grids import save_grid

    save_grid(args.samples, args.out)


def cmd_report(args) -> None:
    from .report import write_summary

    paths = write_summary(args.metrics, args.out_dir, args.published)
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_track(args) -> None:
    from .tracking import default_tracking_uri, ingest, ui_path

    uri = args.tracking_uri or default_tracking_uri()
    exp_id, ids = ingest(args.runs, args.metrics, args.grids or [], args.summary or [], uri, args.experiment,
                         args.artifact_root)
    atomic_write_json(args.out, {"tracking_uri": uri, "experiment": args.experiment, "experiment_id": exp_id,
                                 "ui_path": ui_path(exp_id), "runs": ids})
    print(f"MLflow: {len(ids)} runs in experiment '{args.experiment}' ({uri}); in the UI open {ui_path(exp_id)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmbench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="read a dataset and write its prepared tensor file")
    s.add_argument("--config", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--out", required=True, help="prepared file, e.g. data/prepared/digits.pt")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("features", help="train the FD-CNN feature classifier of a dataset")
    s.add_argument("--config", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--data", help="prepared data file (default: read the dataset from its source)")
    s.add_argument("--out", required=True, help="classifier weights, e.g. data/features/digits/fdcnn.pt")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("inception-ref", help="Inception reference statistics and real-vs-real FID of a dataset")
    s.add_argument("--config", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--data", help="prepared data file (default: read the dataset from its source)")
    s.add_argument("--out", required=True, help="reference file, e.g. data/features/mnist/inception_ref.npz")
    s.add_argument("--cache", default="data/cache", help="folder for the converted default_1 weights")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_inception_ref)

    s = sub.add_parser("train", help="train one (dataset, method, seed); rerun the same command to resume")
    s.add_argument("--config", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="run folder, e.g. results/runs/gmm/teacher/seed0")
    s.add_argument("--data", help="prepared data file (default: read the dataset from its source)")
    s.add_argument("--teacher", help="run folder of the trained teacher (distillation methods)")
    s.add_argument("--archive-stale", action="store_true",
                   help="if --out holds a run with another config, rename it aside and start afresh")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run with per-image seeds")
    s.add_argument("--run", required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="samples file (.npz)")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--weights", default="ema", choices=["ema", "model"])
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("evaluate", help="score a samples file (exact metrics on gmm, FD-CNN on images)")
    s.add_argument("--samples", required=True)
    s.add_argument("--out", required=True, help="metrics file (.json)")
    s.add_argument("--grid", help="also draw the samples to this PNG (as `cmbench grid`)")
    s.add_argument("--data", help="prepared data file (reference images; default: read from the source)")
    s.add_argument("--feature-net", help="FD-CNN classifier from `cmbench features` (default: train into --cache)")
    s.add_argument("--cache", default="data/cache", help="folder for cached FD-CNN classifiers")
    s.add_argument("--inception-ref", help="reference file from `cmbench inception-ref`: adds Inception FID from "
                   "torch-fidelity and clean-fid")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("grid", help="draw a samples file: an image grid, or points over the true density")
    s.add_argument("--samples", required=True)
    s.add_argument("--out", required=True, help="PNG file")
    s.set_defaults(func=cmd_grid)

    s = sub.add_parser("report", help="metrics files -> results/summary (CSV, Markdown, LaTeX, DVC metrics, plots)")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--published", help="CSV of published FIDs shown beside ours (config/published_fid.csv)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("track", help="ingest run folders and metrics into MLflow (the single writer)")
    s.add_argument("--runs", nargs="+", required=True, help="run folders")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--grids", nargs="*")
    s.add_argument("--summary", nargs="*", help="summary tables and plots, logged as one summary run")
    s.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite under results/mlflow")
    s.add_argument("--experiment", default="cmbench")
    s.add_argument("--artifact-root", help="artifact location for a new experiment")
    s.add_argument("--out", required=True, help="JSON record of the MLflow run ids")
    s.set_defaults(func=cmd_track)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CmbenchError as e:
        one_line = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # e.g. tarfile's reasons
        print(f"cmbench {args.command}: error: {one_line}", file=sys.stderr)
        return getattr(e, "exit_status", 2)  # Preempted: PREEMPTED_EXIT_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
