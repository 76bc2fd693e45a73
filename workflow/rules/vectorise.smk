rule vectorise_tumour:
    input:
        probability=f"{RESULTS}/{{slide_id}}/probability.zarr",
        metadata=f"{RESULTS}/{{slide_id}}/slide.json",
        tissue=f"{RESULTS}/{{slide_id}}/tissue.json",
        mask=f"{RESULTS}/{{slide_id}}/tissue_mask.png",
    output:
        geojson=f"{RESULTS}/{{slide_id}}/tumour.geojson",
        stats=f"{RESULTS}/{{slide_id}}/stats.json",
    log:
        f"{RESULTS}/logs/vectorise/{{slide_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{slide_id}}/vectorise.tsv"
    params:
        threshold=config["vectorise"]["threshold"],
        min_area_um2=config["vectorise"]["min_area_um2"],
        min_area_px=config["vectorise"]["min_area_px"],
        simplify=config["vectorise"]["simplify_tolerance_px"],
        class_name=config["vectorise"]["class_name"],
        class_color=",".join(str(value) for value in config["vectorise"]["class_color"]),
        bounds=lambda wildcards: (
            "--bounds-geojson " + quote_list([f"{RESULTS}/{wildcards.slide_id}/tumour_bounds.geojson"])
            if config["vectorise"]["write_bounds_shifted"]
            else ""
        ),
    shell:
        "{WSISEG} vectorise {input.probability:q} {input.metadata:q} {input.tissue:q}"
        " --tissue-mask {input.mask:q} --out {output.geojson:q} --stats {output.stats:q} --threshold {params.threshold}"
        " --min-area-um2 {params.min_area_um2} --min-area-px {params.min_area_px}"
        " --simplify-tolerance-px {params.simplify} --class-name {params.class_name:q}"
        " --class-color {params.class_color} {params.bounds} 2> {log:q}"


rule overlay_picture:
    input:
        thumbnail=f"{RESULTS}/{{slide_id}}/thumbnail.png",
        mask=f"{RESULTS}/{{slide_id}}/tissue_mask.png",
        tissue=f"{RESULTS}/{{slide_id}}/tissue.json",
        geojson=f"{RESULTS}/{{slide_id}}/tumour.geojson",
    output:
        picture=f"{RESULTS}/{{slide_id}}/overlay.png",
    log:
        f"{RESULTS}/logs/overlay/{{slide_id}}.log",
    shell:
        "{WSISEG} overlay {input.thumbnail:q} {input.mask:q} {input.tissue:q}"
        " {input.geojson:q} --out {output.picture:q} 2> {log:q}"
