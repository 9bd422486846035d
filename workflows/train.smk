# Stage: train. Every consistency method, from scratch or from the teacher as its paper says.


def _train_inputs(w):
    inputs = {"data": f"data/prepared/{w.dataset}.pt"}
    if needs_teacher_run(w.dataset, w.method, w.seed):
        inputs["teacher"] = f"{teacher_run(w.dataset)}/final.pt"
    return inputs


def _teacher_arg(w, input):
    return f"--teacher {os.path.dirname(input.teacher)}" if "teacher" in input.keys() else ""


ruleorder: train_teacher > train_method


rule train_method:
    input:
        unpack(_train_inputs),
    output:
        "results/runs/{dataset}/{method}/seed{seed}/final.pt",
    params:
        config=lambda w: config_hash(w.dataset, w.method, w.seed),
        out=lambda w: run_dir(w.dataset, w.method, w.seed),
        teacher=_teacher_arg,
    threads: 2
    log:
        "results/logs/train/{dataset}/{method}/seed{seed}.log",
    shell:
        "OMP_NUM_THREADS={threads} {CMBENCH} train --config {CONFIG_FILE} --dataset {wildcards.dataset} "
        "--method {wildcards.method} --seed {wildcards.seed} --data {input.data} {params.teacher} "
        "--out {params.out} --archive-stale > {log} 2>&1"
