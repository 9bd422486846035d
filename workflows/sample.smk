# Stage: sample. A trained run at K sampler steps -> a samples file, with per-image seeds.


rule sample:
    input:
        FINAL_FILE,
    output:
        SAMPLES_FILE,
    params:
        cmbench=CMBENCH,
        device=EVAL_DEVICE,  # samples and scores may differ in the last bits between devices
        run=lambda w: run_dir(w.dataset, w.method, w.seed),
        n=lambda w: run_config(w.dataset, w.method, w.seed).eval.n_samples,
        seed=lambda w: run_config(w.dataset, w.method, w.seed).eval.seed,
        batch=lambda w: run_config(w.dataset, w.method, w.seed).eval.batch_size,
    threads: 1
    resources:
        gpu=EVAL_GPUS,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/sample/{dataset}/{method}/seed{seed}/steps{steps}.log",
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.cmbench} sample --run {params.run} --steps {wildcards.steps} "
        "--n {params.n} --seed {params.seed} --batch-size {params.batch} --device {params.device} "
        "--threads ${{SLURM_CPUS_PER_TASK:-{threads}}} --out {output} > {log} 2>&1"
