rule tissue_mask:
    input:
        metadata=f"{RESULTS}/{{slide_id}}/slide.json",
    output:
        mask=f"{RESULTS}/{{slide_id}}/tissue_mask.png",
        thumbnail=f"{RESULTS}/{{slide_id}}/thumbnail.png",
        summary=f"{RESULTS}/{{slide_id}}/tissue.json",
    log:
        f"{RESULTS}/logs/tissue/{{slide_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{slide_id}}/tissue.tsv"
    params:
        thumbnail_mpp=config["tissue"]["thumbnail_mpp_um"],
        max_thumbnail=config["tissue"]["max_thumbnail_px"],
    shell:
        "{WSISEG} tissue {input.metadata:q} --mask {output.mask:q}"
        " --thumbnail {output.thumbnail:q} --out {output.summary:q}"
        " --thumbnail-mpp {params.thumbnail_mpp} --max-thumbnail-px {params.max_thumbnail}"
        " 2> {log:q}"
