# Stage: evaluate. A samples file -> metrics JSON (exact metrics on gmm, FD-CNN on images) and a picture.


rule evaluate:
    input:
        unpack(_evaluate_inputs),
    output:
        "results/metrics/{dataset}/{method}/seed{seed}/steps{steps}.json",
    params:
        cmbench=CMBENCH,
        extra=_evaluate_args,
    threads: 1
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/evaluate/{dataset}/{method}/seed{seed}/steps{steps}.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmbench} evaluate --samples {input.samples} {params.extra} --device cpu "
        "--out {output} > {log} 2>&1"


rule grid:
    input:
        "results/samples/{dataset}/{method}/seed{seed}/steps{steps}.npz",
    output:
        "results/grids/{dataset}/{method}/seed{seed}/steps{steps}.png",
    params:
        cmbench=CMBENCH,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/grid/{dataset}/{method}/seed{seed}/steps{steps}.log",
    shell:
        "{params.cmbench} grid --samples {input} --out {output} > {log} 2>&1"
