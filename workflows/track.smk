# Stage: track. One local job ingests run folders, metrics, pictures and the summary into MLflow: the single
# writer, so cluster jobs never race on one sqlite file.

from common.tracking import default_tracking_uri

TRACKING_URI = CFG.workflow.mlflow.tracking_uri or default_tracking_uri()


rule track:
    localrule: True
    input:
        runs=[FINAL_FILE.format(dataset=d, method=m, seed=s) for d, m, s in RUNS],
        metrics=METRICS,
        grids=GRIDS,
        summary=SUMMARY_FILES,
    output:
        TRACKING_RECORD,
    params:
        cmbench=CMBENCH,
        run_dirs=[run_dir(d, m, s) for d, m, s in RUNS],
        uri=TRACKING_URI,
        experiment=CFG.workflow.mlflow.experiment,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/track.log",
    shell:
        "{params.cmbench} track --runs {params.run_dirs} --metrics {input.metrics} --grids {input.grids} "
        "--summary {input.summary} --tracking-uri '{params.uri}' --experiment {params.experiment} "
        "--out {output} > {log} 2>&1"
