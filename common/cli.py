"""`cmbench` (also `python -m common.cli`): one command per pipeline stage, explicit inputs and outputs.

Snakemake rules and users call the same commands.  Every user-facing failure is one line on stderr and
exit status 2 (PREEMPTED_EXIT_STATUS, 75, after SIGTERM/SIGUSR1 and a checkpoint); nothing already written is
removed.
"""

from __future__ import annotations

import argparse
import os
import sys

from core.errors import CmbenchError

from .fsutil import atomic_write_json, check_writable


def _dataset_entry(args, list_defined: bool = False, config=None):
    """The config entry of --dataset in --config (or in `config`, already loaded); `list_defined` names the
    defined datasets in the error."""
    config = config or _config(args)
    if args.dataset not in config.datasets:
        defined = f" (defined: {', '.join(sorted(config.datasets))})" if list_defined else ""
        raise CmbenchError(f"{args.config}: unknown dataset '{args.dataset}'{defined}")
    return config.datasets[args.dataset]


def _device(args):
    """--threads (torch's CPU threads, so a job uses what it was allocated) and --device (auto: CUDA if any)."""
    from .device import resolve_device

    _threads(args)
    return resolve_device(args.device, check_allocation=True)  # a job given GPUs never runs on CPU silently


def _threads(args) -> None:
    """--threads sets torch's CPU threads and every BLAS/OpenMP pool numpy and scipy use (FID's matrix square
    roots), outright: the environment may disagree (Snakemake exports MKL_NUM_THREADS = the rule's threads, which
    torch also reads, whatever SLURM allocated), and a result's last bits depend on these thread counts."""
    import torch
    from threadpoolctl import threadpool_limits

    if args.threads is not None:
        if args.threads < 1:
            raise CmbenchError(f"--threads must be >= 1, got {args.threads}")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # libraries loaded later
            os.environ[var] = str(args.threads)  # (scipy.linalg's own OpenBLAS) read these when they load
        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)  # the pools already loaded (numpy's BLAS, OpenMP)


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
    from .metrics.fd_cnn import save_classifier

    entry = _dataset_entry(args)
    device = _device(args)
    ds = _dataset(args, entry)
    acc = save_classifier(ds, entry.eval.fd_cnn, args.out, device)
    print(f"wrote {args.out}: FD-CNN({args.dataset}) classifier, training accuracy {acc:.4f}")


def cmd_inception_ref(args) -> None:
    import dataclasses

    from .data import load_dataset
    from .eval_sizes import baseline_kind, check_config, inception_plan, split_size
    from .metrics.inception_fid import build_reference

    config = _config(args)
    entry = _dataset_entry(args, config=config)
    option = f"datasets.{args.dataset}.inception"
    check_config(config, args.config, [args.dataset])
    spec = entry.inception
    # the sizes the config alone can tell (an image folder's only once read): before any data is loaded
    inception_plan(spec, entry.data.kind, split_size(entry.data, "train"), split_size(entry.data, "test"),
                   f"{args.config}: {option}")
    check_writable(args.out)
    device = _device(args)
    ds = _dataset(args, entry)
    test = None
    if baseline_kind(spec, entry.data.kind) == "test_split":  # read from the source: prepared files hold train
        test = load_dataset(dataclasses.replace(entry.data, split="test"))
    meta = build_reference(ds, spec, f"{args.config}: {option}", args.out, args.cache, device, test=test)
    print(f"wrote {args.out}: {meta['weights_label']}; reference: {meta['reference_text']}; floor: "
          f"{meta['baseline_text']}: torch-fidelity {meta['fid_torch_fidelity_real']:.4g}, clean-fid "
          f"{meta['fid_clean_fid_real']:.4g}")


def _config(args):
    from .config import load_config

    return load_config(args.config)


def cmd_train(args) -> None:
    from .config import load_config, resolve_run
    from .preemption import stop_on_signals
    from .train import train

    config = load_config(args.config)
    run = resolve_run(config, args.dataset, args.method, args.seed, source=args.config)
    if args.threads is not None and args.threads >= 1:  # the job's CPUs: torchrun's processes here share them
        args.threads = max(1, args.threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    _threads(args)
    with stop_on_signals() as stop:  # SIGTERM / SIGUSR1: checkpoint, exit PREEMPTED_EXIT_STATUS, rerun resumes
        train(run, args.out, data_path=args.data, teacher_dir=args.teacher, archive_stale=args.archive_stale,
              stop=stop)


def cmd_sample(args) -> None:
    from . import shards
    from .compute import sampling_compute
    from .config import to_dict
    from .data import sha256_file
    from .models import load_trained
    from .progress import Progress
    from .records import RunDir, write_samples
    from .sample import generate_sharded

    if args.steps < 1:
        raise CmbenchError(f"--steps must be >= 1, got {args.steps}")
    if args.n < 1:
        raise CmbenchError(f"--n must be >= 1, got {args.n}")
    if args.shard_size is not None and args.shard_size < 1:
        raise CmbenchError(f"--shard-size must be >= 1, got {args.shard_size}")
    check_writable(args.out)
    device = _device(args)
    run, method, model, item_shape = load_trained(args.run, device, args.weights)
    batch = run.eval.batch_size if args.batch_size is None else args.batch_size
    if batch < 1:
        raise CmbenchError(f"--batch-size must be >= 1, got {batch}")
    # what a shard left by a killed attempt must share to be kept (its range is added per shard)
    key = {"format": 1, "run": to_dict(run), "final_sha256": sha256_file(RunDir(args.run).final),
           "weights": args.weights, "steps": args.steps, "seed": args.seed, "device": device.type}
    parts = shards.folder_beside(args.out, ".parts")
    with Progress(args.n, f"sampling {args.steps} steps") as progress:
        samples, latents, labels, seconds = generate_sharded(
            method, model, item_shape, args.n, args.steps, args.seed, batch, device, run.network.label_dim, parts,
            key, args.shard_size, progress)
    meta = {"run": to_dict(run), "run_dir": str(args.run), "steps": args.steps, "nfe": method.nfe(args.steps),
            "sample_seed": args.seed, "weights": args.weights, "start_sigma": method.start_sigma,
            "compute": sampling_compute(args.run, method, model, item_shape, args.steps, device,
                                        run.network.label_dim, seconds / args.n)}
    write_samples(args.out, samples, latents, labels, meta)
    shards.remove(parts)  # only now: the samples file holds every shard
    print(f"wrote {args.out}: {args.n} samples, {args.steps} steps = {meta['nfe']} NFE")


def cmd_evaluate(args) -> None:
    from . import shards
    from .evaluate import evaluate
    from .grids import save_grid

    check_writable(args.out)
    features_dir = shards.folder_beside(args.out, ".features")
    if args.samples_external is not None:
        return _evaluate_external(args, features_dir)
    for flag in ("reference_stats", "inception_weights", "n", "batch_size"):
        if getattr(args, flag) is not None:
            raise CmbenchError(f"--{flag.replace('_', '-')} goes with --samples-external (a samples file is scored "
                               f"against --inception-ref)")
    if args.grid:
        check_writable(args.grid)
    result = evaluate(args.samples, args.cache, _device(args), data_path=args.data, feature_net=args.feature_net,
                      inception_ref=args.inception_ref, features_dir=features_dir)
    atomic_write_json(args.out, result)
    shards.remove(features_dir)  # only now: the metrics file holds what the cached features gave
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items() if isinstance(v, float | int))
    print(f"{result['method']}/{result['dataset']} NFE {result['nfe']}: {shown}")
    if args.grid:  # the picture comes with the score: one process (and one torch import) less per samples file
        save_grid(args.samples, args.grid)


def _evaluate_external(args, features_dir) -> None:
    """An external sample set (npz arr_0, PNG folder, samples file) against given mu/sigma statistics."""
    from . import shards
    from .metrics import external, inception

    if args.reference_stats is None:
        raise CmbenchError("--samples-external needs --reference-stats (an .npz with mu and sigma, e.g. EDM's "
                           "cifar10-32x32.npz)")
    for flag in ("inception_ref", "grid", "data", "feature_net"):
        if getattr(args, flag) is not None:
            raise CmbenchError(f"--{flag.replace('_', '-')} is for cmbench samples files (--samples), not with "
                               f"--samples-external")
    if args.n is not None and args.n < 2:
        raise CmbenchError(f"--n must be >= 2, got {args.n}")
    batch_size = 50 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise CmbenchError(f"--batch-size must be >= 1, got {batch_size}")
    reference = external.load_stats(args.reference_stats)  # malformed files fail before any network is built
    samples = external.load_images(args.samples_external)
    if args.n is not None:
        if args.n > len(samples.images):
            raise CmbenchError(f"--n {args.n} but {args.samples_external} holds {len(samples.images)} images")
        samples.images = samples.images[: args.n]
    weights = inception.resolve_weights(args.inception_weights, "--inception-weights", args.cache)
    result = external.score_external(samples, reference, weights, _device(args), batch_size, features_dir)
    atomic_write_json(args.out, result)
    shards.remove(features_dir)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items())
    print(f"{args.samples_external} ({result['n_samples']} images) vs {args.reference_stats}: {shown}")


def cmd_synthetic_data(args) -> None:
    from . import synthetic

    check_writable(args.out)
    if args.kind == "cifar10":
        path = synthetic.cifar10_archive(args.out, seed=args.seed)
        print(f"wrote {path}: a synthetic cifar-10-python.tar.gz (50,000 + 10,000 images; plumbing, not quality)")
    else:
        path = synthetic.imagenet_folder(args.out, classes=args.classes, per_class=args.per_class, seed=args.seed)
        print(f"wrote {path}: {args.classes} class folders of {args.per_class} synthetic JPEGs (plumbing, not quality)")


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


def _device_args(s) -> None:
    s.add_argument("--device", default="auto", help="auto (CUDA when the job has a GPU), cpu, cuda or cuda:N")
    s.add_argument("--threads", type=int, help="CPU threads for torch (default: $OMP_NUM_THREADS or all cores)")


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
    _device_args(s)
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("inception-ref", help="Inception reference statistics and real-vs-real FID of a dataset")
    s.add_argument("--config", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--data", help="prepared data file (default: read the dataset from its source)")
    s.add_argument("--out", required=True, help="reference file, e.g. data/features/mnist/inception_ref.npz")
    s.add_argument("--cache", default="data/cache", help="folder for the converted default_1 weights")
    _device_args(s)
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
    s.add_argument("--threads", type=int, help="the job's CPU threads, shared by torchrun's processes on the node "
                   "(default: $OMP_NUM_THREADS or all cores); the device is the config's train.device")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run with per-image seeds")
    s.add_argument("--run", required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="samples file (.npz)")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--weights", default="ema", choices=["ema", "model"])
    s.add_argument("--shard-size", type=int, help="images per resumable shard in <out>.parts/ (rounded up to a "
                   "multiple of the batch size; default about 1000); the samples do not depend on it")
    _device_args(s)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("evaluate", help="score a samples file (exact metrics on gmm, FD-CNN on images), or an "
                       "external sample set against given Inception statistics")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--samples", help="samples file from `cmbench sample`")
    which.add_argument("--samples-external", help="a sample set scored against --reference-stats: an .npz with "
                       "arr_0 (uint8 [N, H, W, C], EDM/ADM dumps), a folder of PNGs, or a samples file")
    s.add_argument("--out", required=True, help="metrics file (.json); Inception features are cached in "
                   "<out>.features/ until it is written, so a rerun resumes")
    s.add_argument("--grid", help="also draw the samples to this PNG (as `cmbench grid`)")
    s.add_argument("--data", help="prepared data file (reference images; default: read from the source)")
    s.add_argument("--feature-net", help="FD-CNN classifier from `cmbench features` (default: train into --cache)")
    s.add_argument("--cache", default="data/cache", help="folder for cached FD-CNN classifiers and converted "
                   "default_1 weights")
    s.add_argument("--inception-ref", help="reference file from `cmbench inception-ref`: adds Inception FID from "
                   "torch-fidelity and clean-fid")
    s.add_argument("--reference-stats", help="with --samples-external: an .npz with mu [2048] and sigma "
                   "[2048, 2048] (EDM's cifar10-32x32.npz, ADM's VIRTUAL_imagenet64_labeled.npz), used as is")
    s.add_argument("--inception-weights", help="with --samples-external: the official Inception file or "
                   "'default_1' (default: $CMBENCH_INCEPTION_WEIGHTS)")
    s.add_argument("--batch-size", type=int, help="with --samples-external: Inception batch size (default 50)")
    s.add_argument("--n", type=int, help="with --samples-external: score the first N images (default: all)")
    _device_args(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("synthetic-data", help="write a stand-in for a paper track's data in its real file format "
                       "(to rehearse the pipeline without the data)")
    s.add_argument("--kind", required=True, choices=["cifar10", "imagenet"])
    s.add_argument("--out", required=True, help="cifar10: the .tar.gz to write; imagenet: the folder to fill")
    s.add_argument("--classes", type=int, default=1000, help="imagenet: class folders")
    s.add_argument("--per-class", type=int, default=2, help="imagenet: images per class")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synthetic_data)

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
