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


def _check_weights_file(path, key):
    """Raise ConfigError unless ``path`` is an existing HDF5 or .keras file."""
    import zipfile

    import h5py

    if not os.path.isfile(path):
        raise ConfigError(
            f"model weights file not found: {path}; fix {key} in the config "
            "(DigiPathAI .h5, Keras .weights.h5 or .keras files), or set model.weights: [] "
            "to run the untrained network"
        )
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise ConfigError(f"{key}: {path} is not a .keras file (a zip archive); save the model with model.save('name.keras')")
    elif path.endswith((".h5", ".hdf5")):
        if not h5py.is_hdf5(path):
            raise ConfigError(f"{key}: {path} is not an HDF5 file; it may be truncated or a web page saved by mistake, download the weights again")
    else:
        raise ConfigError(f"{key}: {path} has an unknown extension; expected .h5, .hdf5, .weights.h5 or .keras")


def _check_config():
    """Check what the schema cannot: files, ranges between keys, divisibility."""
    for path in config["model"]["weights"]:
        _check_weights_file(path, "model.weights")
    if config["model"].get("imagenet_encoder_weights"):
        _check_weights_file(config["model"]["imagenet_encoder_weights"], "model.imagenet_encoder_weights")

    mpp_min, mpp_max = config["slide"]["mpp_min_um"], config["slide"]["mpp_max_um"]
    if mpp_min >= mpp_max:
        raise ConfigError(f"slide.mpp_min_um ({mpp_min}) must be below slide.mpp_max_um ({mpp_max})")
    default_mpp = config["slide"].get("default_mpp_um")
    if default_mpp is not None and not mpp_min <= default_mpp <= mpp_max:
        raise ConfigError(
            f"slide.default_mpp_um = {default_mpp} µm/px is outside the plausible range "
            f"{mpp_min}..{mpp_max} (slide.mpp_min_um, slide.mpp_max_um); 0.25 is typical at 40x, 0.5 at 20x"
        )
    for entry in SLIDES.values():
        if entry.mpp_um is not None and not mpp_min <= entry.mpp_um <= mpp_max:
            raise ConfigError(
                f"sample sheet mpp {entry.mpp_um} µm/px for slide {entry.slide_id} is outside the "
                f"plausible range {mpp_min}..{mpp_max}; 0.25 is typical at 40x, 0.5 at 20x"
            )

    downsample = config["inference"]["output_downsample"]
    for key in ("patch_size_px", "stride_px"):
        if config["patches"][key] % downsample:
            raise ConfigError(
                f"inference.output_downsample = {downsample} must divide patches.{key} = "
                f"{config['patches'][key]}; use a power of two such as 2, 4 or 8"
            )


_check_config()


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


def print_status_summary(report_path):
    """Print how many slides ended in each status, and which ones were not ok."""
    import pandas as pd

    if not os.path.isfile(report_path):
        return
    table = pd.read_csv(report_path, dtype=str, keep_default_na=False)
    counts = table["status"].value_counts()
    print(f"wsiseg: {len(table)} slide(s) in {report_path}: "
          + ", ".join(f"{count} {name}" for name, count in counts.items()), file=sys.stderr)
    for row in table[table["status"] != "ok"].itertuples():
        print(f"wsiseg:   {row.slide_id}: {row.status}: {row.message}", file=sys.stderr)
