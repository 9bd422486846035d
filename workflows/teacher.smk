# Stage: teacher. One EDM diffusion teacher per dataset and seed: the reference row and the distillation source.


rule train_teacher:
    input:
        data=PREPARED_FILE,
    output:
        TEACHER_FINAL_FILE,
    params:
        cmbench=lambda w: train_launcher(w.dataset, "teacher", w.seed),
        config=lambda w: config_hash(w.dataset, "teacher", w.seed),
        out=lambda w: run_dir(w.dataset, "teacher", w.seed),
    threads: CFG.workflow.train_threads
    resources:
        gpu=lambda w: train_gpus(w.dataset, "teacher", w.seed),
        nodes=lambda w: train_nodes(w.dataset, "teacher", w.seed),
        gres=lambda w: train_gres(w.dataset, "teacher", w.seed),
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/train/{dataset}/teacher/seed{seed}.log",
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.cmbench} train --config {CONFIG_FILE} --dataset {wildcards.dataset} "
        "--method teacher --seed {wildcards.seed} --data {input.data} --out {params.out} --threads ${{SLURM_CPUS_PER_TASK:-{threads}}} --archive-stale "
        "> {log} 2>&1"
