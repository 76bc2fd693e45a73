# Configuration and sample-sheet checks, wildcard constraints and input functions.
# Everything here runs when Snakemake parses the workflow, before any job starts, so a
# bad config or sample sheet stops the run with a message and nothing computed.

import json
import os
import shlex
import shutil
import sys

from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))

from wsiseg.errors import ConfigError  # noqa: E402
from wsiseg.samples import load_entries  # noqa: E402


validate(config, schema="../schemas/config.schema.yaml")

# The command every rule runs. The interpreter running Snakemake is used when `wsiseg`
# is not on PATH (a virtual environment that was not activated), so the stages always
# come from the same installation as the workflow.
WSISEG = "wsiseg" if shutil.which("wsiseg") else f"{shlex.quote(sys.executable)} -m wsiseg"

RESULTS = config["results"].rstrip("/") or "."
SLIDES = {entry.slide_id: entry for entry in load_entries(config.get("sample_sheet"), config.get("slides_glob"))}


def _check_weights():
    for path in list(config["model"]["weights"]) + [config["model"].get("imagenet_encoder_weights")]:
        if path and not os.path.isfile(path):
            raise ConfigError(
                f"model weights file not found: {path}; fix model.weights in config.yaml "
                "(DigiPathAI .h5, Keras .weights.h5 or .keras files), or use [] to run the untrained network"
            )


_check_weights()


wildcard_constraints:
    slide_id=r"[^\W][\w.\-]*",
    shard=r"\d+",


def get_final_outputs():
    """Return the report and, per slide, the files a person opens first."""
    outputs = [f"{RESULTS}/report.csv"]
    for slide_id in SLIDES:
        outputs.append(f"{RESULTS}/{slide_id}/tumour.geojson")
        outputs.append(f"{RESULTS}/{slide_id}/overlay.png")
    return outputs


def get_slide_input(wildcards):
    """Declare the slide as input only when it exists.

    A missing path must become an `unreadable` row in the report, not a
    MissingInputException that stops the whole cohort.
    """
    path = SLIDES[wildcards.slide_id].path
    return [path] if os.path.exists(path) else []


def get_slide_mpp_args(wildcards):
    """Return the inspect options for the slide's MPP.

    A sample sheet's mpp overrides the metadata; the config's default_mpp_um only fills
    in for slides whose metadata has none.
    """
    entry = SLIDES[wildcards.slide_id]
    arguments = []
    if entry.mpp_um is not None:
        arguments.append(f"--mpp {entry.mpp_um!r} --mpp-source sample_sheet")
    if config["slide"].get("default_mpp_um") is not None:
        arguments.append(f"--default-mpp {float(config['slide']['default_mpp_um'])!r}")
    return " ".join(arguments)


def get_shard_predictions(wildcards):
    """Return every shard's prediction store, once the patches checkpoint has run."""
    plan_path = checkpoints.patches.get(slide_id=wildcards.slide_id).output.plan
    with open(plan_path, encoding="utf-8") as stream:
        n_shards = int(json.load(stream)["n_shards"])
    return [f"{RESULTS}/{wildcards.slide_id}/predictions/shard-{k}.zarr" for k in range(n_shards)]


def quote_list(values):
    """Shell-quote each value and join them with spaces."""
    return " ".join(shlex.quote(str(value)) for value in values)
