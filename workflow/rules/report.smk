rule cohort_report:
    input:
        stats=expand(f"{RESULTS}/{{slide_id}}/stats.json", slide_id=list(SLIDES)),
    output:
        report=f"{RESULTS}/report.csv",
    log:
        f"{RESULTS}/logs/report.log",
    params:
        benchmarks=f"{RESULTS}/benchmarks",
    shell:
        "{WSISEG} report {input.stats:q} --out {output.report:q}"
        " --benchmarks-dir {params.benchmarks:q} 2> {log:q}"
