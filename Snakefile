"""cmbench: train the teacher and every method, sample at every step count, score, report, track.

    snakemake --cores 2 all                                        # the quick track (config/config.yaml)
    snakemake --profile slurm all --configfile config/cifar10.yaml  # a cluster
Rules call the `cmbench` CLI; outputs are predictable from wildcards; checkpoints live beside the outputs.
"""

import signal
import threading

from snakemake.utils import min_version, validate

min_version("9.0")

# SLURM's warning signal (`--signal=USR1@300`, slurm/config.yaml) reaches every process of a job step, this
# Snakemake included; its default action would kill Snakemake and SLURM would then kill the trainer before it
# checkpoints. Ignore it here; `cmbench train` installs its own handler (common/preemption.py).
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# The quick track is the default; `--configfile FILE` replaces it (Snakemake would otherwise merge the two).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# `--config 'seeds=[0,1]'` arrives as strings: Snakemake reads command-line lists with YAML's BaseLoader.
if isinstance(config.get("seeds"), list):
    config["seeds"] = [int(s) if isinstance(s, str) and s.strip().isdigit() else s for s in config["seeds"]]
validate(config, "workflows/schemas/config.schema.yaml")


include: "workflows/common.smk"
wildcard_constraints:
    dataset="|".join(CFG.datasets),
    method="[A-Za-z0-9_]+",
    seed=r"\d+",
    steps=r"\d+",


include: "workflows/data.smk"
include: "workflows/teacher.smk"
include: "workflows/train.smk"
include: "workflows/sample.smk"
include: "workflows/evaluate.smk"
include: "workflows/report.smk"
include: "workflows/track.smk"


rule all:
    default_target: True
    input:
        SUMMARY_FILES,
        TRACKING_RECORD,
