# Stage: report. Every metrics file -> results/summary (tidy CSV, Table-1 Markdown, DVC metrics, seaborn plot).


rule report:
    input:
        METRICS,
    output:
        SUMMARY_FILES,
    params:
        cmbench=CMBENCH,
    conda:
        "envs/cmbench.yaml"
    log:
        "results/logs/report.log",
    shell:
        "{params.cmbench} report --metrics {input} --out-dir results/summary > {log} 2>&1"
