rule infer_shard:
    input:
        store=f"{RESULTS}/{{slide_id}}/patches.zarr",
        plan=f"{RESULTS}/{{slide_id}}/shards.json",
        weights=config["model"]["weights"],
    output:
        predictions=directory(f"{RESULTS}/{{slide_id}}/predictions/shard-{{shard}}.zarr"),
    log:
        f"{RESULTS}/logs/infer/{{slide_id}}/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{slide_id}}/infer-shard-{{shard}}.tsv"
    params:
        weights=lambda wildcards, input: " ".join(f"--weights {quote_list([path])}" for path in input.weights),
        imagenet=(
            f"--imagenet-encoder-weights {quote_list([config['model']['imagenet_encoder_weights']])}"
            if config["model"].get("imagenet_encoder_weights")
            else ""
        ),
        preprocessing=config["model"]["preprocessing"],
        seed=config["model"]["seed"],
        tta=" ".join(f"--tta {name}" for name in config["inference"]["tta"]),
        precision=config["inference"]["precision"],
        xla="--xla" if config["inference"]["xla"] else "",
        lock_dir=f"{RESULTS}/.gpu-locks",
        output_downsample=config["inference"]["output_downsample"],
    threads: config["inference"]["threads"]
    # Batch size and device ids change how a shard is computed, not its result, so
    # they are resources: changing them does not rerun finished shards (params do).
    resources:
        gpu=1,
        batch_size=config["inference"]["batch_size"],
        devices=",".join(str(device) for device in config["inference"].get("devices") or []),
    shell:
        "{WSISEG} infer {input.store:q} {input.plan:q} --shard {wildcards.shard}"
        " --out {output.predictions:q} {params.weights} {params.imagenet}"
        " --preprocessing {params.preprocessing} --seed {params.seed}"
        " --batch-size {resources.batch_size} {params.tta} --precision {params.precision}"
        " {params.xla} --devices={resources.devices:q} --lock-dir {params.lock_dir:q}"
        " --output-downsample {params.output_downsample} --threads {threads} 2> {log:q}"
