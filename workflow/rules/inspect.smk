rule inspect_slide:
    input:
        slide=get_slide_input,
    output:
        metadata=f"{RESULTS}/{{slide_id}}/slide.json",
    log:
        f"{RESULTS}/logs/inspect/{{slide_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{slide_id}}/inspect.tsv"
    params:
        path=lambda wildcards: SLIDES[wildcards.slide_id].path,
        mpp_args=get_slide_mpp_args,
        mpp_min=config["slide"]["mpp_min_um"],
        mpp_max=config["slide"]["mpp_max_um"],
    shell:
        "{WSISEG} inspect {params.path:q} --slide-id {wildcards.slide_id:q}"
        " --out {output.metadata:q} {params.mpp_args}"
        " --mpp-min {params.mpp_min} --mpp-max {params.mpp_max} 2> {log:q}"
