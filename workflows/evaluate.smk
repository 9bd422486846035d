# Stage: evaluate. A samples file -> metrics JSON (exact metrics on gmm, FD-CNN on images) and its picture.


rule evaluate:
    input:
        unpack(_evaluate_inputs),
    output:
        metrics=METRICS_FILE,
        grid=GRID_FILE,
    params:
        cmbench=CMBENCH,
        device=EVAL_DEVICE,  # samples and scores may differ in the last bits between devices
        extra=_evaluate_args,
    threads: 1
    resources:
        gpu=EVAL_GPUS,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/evaluate/{dataset}/{method}/seed{seed}/steps{steps}.log",
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.cmbench} evaluate --samples {input.samples} {params.extra} "
        "--device {params.device} --threads ${{SLURM_CPUS_PER_TASK:-{threads}}} --out {output.metrics} --grid {output.grid} > {log} 2>&1"
