# A checkpoint: the number of inference shards is known only once the patch grid is.


checkpoint patches:
    input:
        metadata=f"{RESULTS}/{{slide_id}}/slide.json",
        tissue=f"{RESULTS}/{{slide_id}}/tissue.json",
        mask=f"{RESULTS}/{{slide_id}}/tissue_mask.png",
    output:
        store=directory(f"{RESULTS}/{{slide_id}}/patches.zarr"),
        plan=f"{RESULTS}/{{slide_id}}/shards.json",
    log:
        f"{RESULTS}/logs/patches/{{slide_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{slide_id}}/patches.tsv"
    params:
        patch_size=config["patches"]["patch_size_px"],
        stride=config["patches"]["stride_px"],
        target_mpp=(
            f"--target-mpp {config['patches']['target_mpp_um']}"
            if config["patches"].get("target_mpp_um")
            else ""
        ),
        min_tissue=config["patches"]["min_tissue_fraction"],
        chunk=config["patches"]["chunk_px"],
        per_shard=config["patches"]["patches_per_shard"],
        max_shards=config["patches"]["max_shards"],
    threads: config["patches"]["workers"]
    shell:
        "{WSISEG} patches {input.metadata:q} {input.tissue:q} {input.mask:q}"
        " --out {output.store:q} --plan {output.plan:q}"
        " --patch-size {params.patch_size} --stride {params.stride} {params.target_mpp}"
        " --min-tissue-fraction {params.min_tissue} --chunk-px {params.chunk}"
        " --workers {threads} --patches-per-shard {params.per_shard}"
        " --max-shards {params.max_shards} 2> {log:q}"
