rule stitch_probability_map:
    input:
        store=f"{RESULTS}/{{slide_id}}/patches.zarr",
        shards=get_shard_predictions,
    output:
        probability=directory(f"{RESULTS}/{{slide_id}}/probability.zarr"),
    log:
        f"{RESULTS}/logs/stitch/{{slide_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{slide_id}}/stitch.tsv"
    params:
        chunk=config["stitch"]["chunk_px"],
    shell:
        "{WSISEG} stitch {input.store:q} {input.shards:q} --out {output.probability:q}"
        " --chunk-px {params.chunk} 2> {log:q}"
