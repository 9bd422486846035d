# Stage: train. Every consistency method, from scratch or from the teacher as its paper says.


rule train_method:
    # Never the teacher's run: a SLURM job step runs Snakemake with `--allowed-rules train_method`, where a
    # ruleorder cannot choose train_teacher, so a looser pattern let each distillation job retrain the teacher.
    wildcard_constraints:
        method="|".join(m for m in available_methods() if m != "teacher"),
    input:
        unpack(_train_inputs),
    output:
        FINAL_FILE,
    params:
        cmbench=lambda w: train_launcher(w.dataset, w.method, w.seed),
        config=lambda w: config_hash(w.dataset, w.method, w.seed),
        out=lambda w: run_dir(w.dataset, w.method, w.seed),
        teacher=_teacher_arg,
    threads: CFG.workflow.train_threads
    resources:
        gpu=lambda w: train_gpus(w.dataset, w.method, w.seed),
        nodes=lambda w: train_nodes(w.dataset, w.method, w.seed),
        gres=lambda w: train_gres(w.dataset, w.method, w.seed),
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/train/{dataset}/{method}/seed{seed}.log",
    shell:
        "OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{threads}}} {params.cmbench} train --config {CONFIG_FILE} --dataset {wildcards.dataset} "
        "--method {wildcards.method} --seed {wildcards.seed} --data {input.data} {params.teacher} "
        "--out {params.out} --threads ${{SLURM_CPUS_PER_TASK:-{threads}}} --archive-stale > {log} 2>&1"
