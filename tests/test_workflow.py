"""End-to-end Snakemake runs on the real bundled slide, with every stage for real.

The runs use a small configuration (analysis at 2 µm/px, 128 px patches) so the real
U-Net, untrained at a fixed seed, predicts a few dozen patches on a CPU in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from shapely.geometry import shape

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SAMPLE_SLIDE = DATA / "CMU-1-Small-Region.svs"

REPORT_COLUMNS = [
    "slide_id", "path", "status", "message", "vendor", "width", "height", "mpp_x", "mpp_y",
    "mpp_source", "bounds_x", "bounds_y", "tissue_area_mm2", "tumour_area_mm2",
    "tumour_fraction", "n_tumour_regions", "largest_region_mm2", "threshold",
    "model_weights", "runtime_s", "wsiseg_version",
]


def small_config(results: Path, **overrides) -> dict:
    """Return a configuration that runs the whole pipeline in well under a minute."""
    config = {
        "results": str(results),
        "slides_glob": str(SAMPLE_SLIDE),
        "patches": {
            "patch_size_px": 128,
            "stride_px": 64,
            "target_mpp_um": 2.0,
            "chunk_px": 256,
            "workers": 2,
            "patches_per_shard": 40,
            "max_shards": 8,
        },
        "inference": {"batch_size": 8, "output_downsample": 4, "threads": 2},
        "stitch": {"chunk_px": 64},
    }
    config.update(overrides)
    return config


def run_snakemake(workdir: Path, config: dict, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real workflow in ``workdir`` with ``config`` and return the finished process."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(config_path), "--cores", "2", *extra,
    ]
    process = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1200)
    if check and process.returncode != 0:
        raise AssertionError(f"snakemake exited {process.returncode}\n{process.stdout[-4000:]}\n{process.stderr[-8000:]}")
    return process


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """Run the workflow once on the bundled slide and return its results folder."""
    workdir = tmp_path_factory.mktemp("sample-run")
    results = workdir / "results"
    run_snakemake(workdir, small_config(results))
    return workdir, results


def test_sample_run_artefacts_exist(sample_run):
    """Every per-slide artefact of the sample run exists."""
    _, results = sample_run
    slide_dir = results / "CMU-1-Small-Region"
    for name in ["slide.json", "tissue_mask.png", "thumbnail.png", "tissue.json", "patches.zarr",
                 "shards.json", "probability.zarr", "tumour.geojson", "stats.json", "overlay.png"]:
        assert (slide_dir / name).exists(), name
    assert (results / "report.csv").is_file()


def test_sample_run_report_row(sample_run):
    """The report has one complete row for the bundled slide."""
    _, results = sample_run
    report = pd.read_csv(results / "report.csv")
    assert set(REPORT_COLUMNS) <= set(report.columns)
    assert len(report) == 1
    row = report.iloc[0]
    assert row["slide_id"] == "CMU-1-Small-Region"
    assert row["status"] == "ok"
    assert row["vendor"] == "aperio"
    assert row["width"] == 2220
    assert row["height"] == 2967
    assert row["mpp_x"] == pytest.approx(0.499, abs=1e-3)
    assert row["mpp_source"] == "metadata"
    assert row["model_weights"] == "untrained"
    assert row["tissue_area_mm2"] > 0.1
    assert row["tissue_area_mm2"] < 2220 * 2967 * 0.499**2 / 1e6
    assert row["runtime_s"] > 0


def test_sample_run_shards_and_patches(sample_run):
    """The patch store and the shard plan agree, and several shards were predicted."""
    _, results = sample_run
    slide_dir = results / "CMU-1-Small-Region"
    plan = json.loads((slide_dir / "shards.json").read_text())
    store = zarr.open_group(str(slide_dir / "patches.zarr"), mode="r")
    assert plan["n_patches"] == store["coords"].shape[0]
    assert plan["n_patches"] > 10
    assert plan["n_shards"] >= 2
    assert sum(shard["n_patches"] for shard in plan["shards"]) == plan["n_patches"]
    shard_stores = sorted((slide_dir / "predictions").glob("shard-*.zarr"))
    assert len(shard_stores) == plan["n_shards"]


def test_sample_run_probability_map(sample_run):
    """The stitched map is a probability in [0, 1] wherever patches were predicted."""
    _, results = sample_run
    group = zarr.open_group(str(results / "CMU-1-Small-Region" / "probability.zarr"), mode="r")
    probability = group["probability"][:]
    coverage = group["coverage"][:]
    assert coverage.any()
    assert np.all(probability >= 0)
    assert np.all(probability <= 1)
    assert group.attrs["level0_downsample"] == pytest.approx(4 * 2.0 / 0.499, rel=0.01)


def test_sample_run_geojson(sample_run):
    """The GeoJSON is a QuPath-style FeatureCollection of valid polygons."""
    _, results = sample_run
    collection = json.loads((results / "CMU-1-Small-Region" / "tumour.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        geometry = shape(feature["geometry"])
        assert feature["geometry"]["type"] == "Polygon"
        assert geometry.is_valid
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tumor"
        assert feature["properties"]["model_weights"] == "untrained"
        assert geometry.bounds[2] <= 2220 + 1
        assert geometry.bounds[3] <= 2967 + 1


def test_sample_run_warns_untrained(sample_run):
    """Running without weights logs a warning that the masks are meaningless."""
    _, results = sample_run
    logs = "".join(path.read_text() for path in (results / "logs" / "infer").rglob("*.log"))
    assert "WARNING" in logs
    assert "untrained" in logs


def test_second_dry_run_has_nothing_to_do(sample_run):
    """A repeated run finds every output up to date."""
    workdir, results = sample_run
    process = run_snakemake(workdir, small_config(results), "-n")
    assert "Nothing to be done" in process.stdout + process.stderr


def _bad_configs(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    not_hdf5 = tmp_path / "weights.h5"
    not_hdf5.write_text("<html>not weights</html>")
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(f"slide_id\tpath\tmpp\ncmu\t{SAMPLE_SLIDE}\t1e9\n", encoding="utf-8")
    return {
        "unknown_key": ({"patches": {"patch_size": 256}}, "Additional properties are not allowed"),
        "missing_weights": ({"model": {"weights": [str(tmp_path / "none.h5")]}}, "model weights file not found"),
        "not_hdf5": ({"model": {"weights": [str(not_hdf5)]}}, "is not an HDF5 file"),
        "sheet_mpp_absurd": ({"sample_sheet": str(sheet)}, "outside the plausible range"),
        "default_mpp_absurd": ({"slide": {"default_mpp_um": 500.0}}, "slide.default_mpp_um"),
        "mpp_limits_swapped": ({"slide": {"mpp_min_um": 5.0, "mpp_max_um": 1.0}}, "must be below"),
        "downsample_not_divisor": ({"inference": {"output_downsample": 3}}, "must divide patches."),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown_key", "missing_weights", "not_hdf5", "sheet_mpp_absurd", "default_mpp_absurd",
     "mpp_limits_swapped", "downsample_not_divisor"],
)
def test_config_error_stops_before_work(tmp_path, case):
    """A bad config stops the run at start-up with a message, and nothing is computed."""
    overrides, message = _bad_configs(tmp_path)[case]
    config = small_config(tmp_path / "results")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    process = run_snakemake(tmp_path / "work", config, check=False)
    assert process.returncode != 0
    assert message in process.stdout + process.stderr
    assert not (tmp_path / "results").exists()
