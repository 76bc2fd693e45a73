# wsiseg: tumour segmentation of whole-slide images.
#
# Per slide, under {results}/{slide_id}/:
#   slide.json            metadata and status (inspect)
#   tissue_mask.png, thumbnail.png, tissue.json (tissue)
#   patches.zarr, shards.json                  (patches; a checkpoint: the shard count
#                                              follows the slide's patch count)
#   predictions/shard-{k}.zarr                 (infer, one GPU job per shard)
#   probability.zarr      stitched probability map (stitch)
#   tumour.geojson, stats.json                 (vectorise)
#   overlay.png           thumbnail with tissue and tumour outlines (overlay)
# Cohort: {results}/report.csv; logs under {results}/logs, benchmarks under
# {results}/benchmarks.

import os

from snakemake.utils import min_version

min_version("9.0")


# The defaults live beside this file; a --configfile given on the command line
# overrides them key by key.
configfile: os.path.join(workflow.basedir, "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/inspect.smk"
include: "workflow/rules/tissue.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/stitch.smk"
include: "workflow/rules/vectorise.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),


onsuccess:
    # Slides that could not be processed are statuses, not failed jobs, so the run
    # succeeds; this summary keeps them from going unnoticed on the console.
    print_status_summary(f"{RESULTS}/report.csv")
