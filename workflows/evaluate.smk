# Stage: evaluate. A samples file -> metrics JSON (exact metrics on gmm, FD-CNN on images) and a picture.


def _evaluate_inputs(w):
    inputs = {"samples": f"results/samples/{w.dataset}/{w.method}/seed{w.seed}/steps{w.steps}.npz"}
    if is_image(w.dataset):
        inputs["data"] = f"data/prepared/{w.dataset}.pt"
        inputs["features"] = f"data/features/{w.dataset}/fdcnn.pt"
    return inputs


def _evaluate_args(w, input):
    keys = set(input.keys())
    return (f"--data {input.data} " if "data" in keys else "") + (
        f"--feature-net {input.features}" if "features" in keys else ""
    )


rule evaluate:
    input:
        unpack(_evaluate_inputs),
    output:
        "results/metrics/{dataset}/{method}/seed{seed}/steps{steps}.json",
    params:
        extra=_evaluate_args,
    threads: 1
    log:
        "results/logs/evaluate/{dataset}/{method}/seed{seed}/steps{steps}.log",
    shell:
        "OMP_NUM_THREADS={threads} {CMBENCH} evaluate --samples {input.samples} {params.extra} --device cpu "
        "--out {output} > {log} 2>&1"


rule grid:
    input:
        "results/samples/{dataset}/{method}/seed{seed}/steps{steps}.npz",
    output:
        "results/grids/{dataset}/{method}/seed{seed}/steps{steps}.png",
    log:
        "results/logs/grid/{dataset}/{method}/seed{seed}/steps{steps}.log",
    shell:
        "{CMBENCH} grid --samples {input} --out {output} > {log} 2>&1"
