# Stage: data. A dataset spec -> a prepared tensor file; image datasets also get their FD-CNN classifier.


rule prepare:
    output:
        "data/prepared/{dataset}.pt",
    params:
        spec=lambda w: json.dumps(to_dict(CFG.datasets[w.dataset].data), sort_keys=True),
    log:
        "results/logs/prepare/{dataset}.log",
    shell:
        "{CMBENCH} prepare --config {CONFIG_FILE} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"


rule feature_net:
    input:
        "data/prepared/{dataset}.pt",
    output:
        "data/features/{dataset}/fdcnn.pt",
    params:
        spec=lambda w: json.dumps(to_dict(CFG.datasets[w.dataset].eval.fd_cnn), sort_keys=True),
    threads: 2
    log:
        "results/logs/features/{dataset}.log",
    shell:
        "OMP_NUM_THREADS={threads} {CMBENCH} features --config {CONFIG_FILE} --dataset {wildcards.dataset} "
        "--data {input} --out {output} > {log} 2>&1"
