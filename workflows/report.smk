# Stage: report. Every metrics file -> results/summary (tidy CSV, Table-1 Markdown and LaTeX with bootstrap
# CIs over seeds, compute table, DVC metrics, seaborn plots).


rule report:
    input:
        metrics=METRICS,
        published="config/published_fid.csv",
    output:
        SUMMARY_FILES,
    params:
        cmbench=CMBENCH,
        out_dir=lambda w, output: os.path.dirname(output[0]),
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/report.log",
    shell:
        "{params.cmbench} report --metrics {input.metrics} --published {input.published} --out-dir {params.out_dir} "
        "> {log} 2>&1"
