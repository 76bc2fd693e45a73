"""Tests of wsiseg.report: the cohort CSV and the overlay picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely
import zarr
from PIL import Image

from wsiseg import geojson, status
from wsiseg.errors import ArtefactError
from wsiseg.report import (
    REPORT_COLUMNS,
    TISSUE_OUTLINE_RGB,
    TUMOUR_OUTLINE_RGB,
    benchmark_seconds,
    render_overlay,
    run_report,
)
from wsiseg.stitch import run_stitch
from wsiseg.vectorise import run_vectorise

DOCUMENTED_COLUMNS = [
    "slide_id", "path", "status", "message", "vendor", "width", "height", "mpp_x", "mpp_y",
    "mpp_source", "bounds_x", "bounds_y", "tissue_area_mm2", "tumour_area_mm2",
    "tumour_fraction", "n_tumour_regions", "largest_region_mm2", "threshold",
    "model_weights", "runtime_s", "wsiseg_version",
]


def stats_row(slide_id: str, **fields: Any) -> dict[str, Any]:
    """Statistics of one processed slide, as vectorise writes them."""
    row = {
        "slide_id": slide_id,
        "path": f"/slides/{slide_id}.svs",
        "status": status.OK,
        "message": "",
        "vendor": "aperio",
        "width": 2220,
        "height": 2967,
        "mpp_x": 0.499,
        "mpp_y": 0.499,
        "mpp_source": "metadata",
        "bounds_x": 0,
        "bounds_y": 0,
        "tissue_area_mm2": 1.25,
        "tissue_area_px_level0": 5.02e6,
        "tumour_area_mm2": 0.5,
        "tumour_area_px_level0": 2.008e6,
        "tumour_fraction": 0.4,
        "n_tumour_regions": 3,
        "largest_region_mm2": 0.3,
        "threshold": 0.5,
        "model_weights": "untrained",
        "wsiseg_version": "0.1.0",
        "output_downsample": 4,
        "level0_downsample": 4.0,
    }
    row.update(fields)
    return row


def write_stats(directory: Path, rows: list[dict[str, Any]]) -> list[Path]:
    paths = []
    for row in rows:
        path = directory / f"{row['slide_id']}.stats.json"
        path.write_text(json.dumps(row))
        paths.append(path)
    return paths


def test_report_columns_in_order(tmp_path: Path) -> None:
    """The CSV starts with every documented column, in the documented order."""
    paths = write_stats(tmp_path, [stats_row("a")])

    run_report(paths, tmp_path / "report.csv")

    header = (tmp_path / "report.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[: len(DOCUMENTED_COLUMNS)] == DOCUMENTED_COLUMNS
    assert header == REPORT_COLUMNS


def test_report_row_per_slide(tmp_path: Path) -> None:
    """Every statistics file gives one row, in input order, whatever its status."""
    rows = [
        stats_row("b"),
        stats_row("a", status=status.NO_MPP, mpp_x=None, mpp_y=None, tumour_area_mm2=None,
                  tissue_area_mm2=None, largest_region_mm2=None, mpp_source="missing"),
        {"slide_id": "c", "path": "/slides/c.svs", "status": status.UNREADABLE,
         "message": "not a slide file: truncated"},
    ]
    paths = write_stats(tmp_path, rows)

    frame = run_report(paths, tmp_path / "report.csv", runtimes={"b": 12.5, "c": 0.25})

    written = pd.read_csv(tmp_path / "report.csv", keep_default_na=False)
    assert list(written["slide_id"]) == ["b", "a", "c"]
    assert list(written["status"]) == [status.OK, status.NO_MPP, status.UNREADABLE]
    assert written.loc[1, "tumour_area_mm2"] == ""
    assert written.loc[1, "mpp_x"] == ""
    assert written.loc[2, "message"] == "not a slide file: truncated"
    assert written.loc[2, "width"] == ""
    assert frame.loc[0, "runtime_s"] == 12.5
    assert pd.isna(frame.loc[1, "runtime_s"])
    assert frame.loc[2, "runtime_s"] == 0.25


def test_report_integers_without_decimals(tmp_path: Path) -> None:
    """Integer columns are written as integers even when some rows leave them empty."""
    rows = [stats_row("a"), {"slide_id": "b", "status": status.UNREADABLE}]
    paths = write_stats(tmp_path, rows)

    run_report(paths, tmp_path / "report.csv")

    written = pd.read_csv(tmp_path / "report.csv", dtype=str, keep_default_na=False)
    assert written.loc[0, "width"] == "2220"
    assert written.loc[0, "n_tumour_regions"] == "3"
    assert written.loc[1, "n_tumour_regions"] == ""


def test_report_rejects_duplicate_ids(tmp_path: Path) -> None:
    """Two statistics files for one slide id are rejected with both paths named."""
    first = write_stats(tmp_path, [stats_row("a")])[0]
    second = tmp_path / "copy.stats.json"
    second.write_text(first.read_text())

    with pytest.raises(ArtefactError, match="copy.stats.json"):
        run_report([first, second], tmp_path / "report.csv")
    assert not (tmp_path / "report.csv").exists()


def test_report_missing_stats(tmp_path: Path) -> None:
    """A missing statistics file raises ArtefactError naming it."""
    with pytest.raises(ArtefactError, match="absent.stats.json"):
        run_report([tmp_path / "absent.stats.json"], tmp_path / "report.csv")


def test_benchmark_seconds(tmp_path: Path) -> None:
    """Benchmark files add up by their mean 's' column, and missing files are skipped."""
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (tmp_path / "a.tsv").write_text(header + "10.5\t0:00:10\t100\t200\t90\t95\t0\t1\t50\t5\n")
    (tmp_path / "b.tsv").write_text(header + "2.0\t0:00:02\t1\t2\t1\t1\t0\t0\t1\t1\n4.0\t0:00:04\t1\t2\t1\t1\t0\t0\t1\t1\n")

    total = benchmark_seconds([tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "absent.tsv"])

    assert total == pytest.approx(13.5)
    assert benchmark_seconds([tmp_path / "absent.tsv"]) is None


def write_overlay_inputs(tmp_path: Path, features: list[dict[str, Any]]) -> tuple[Path, ...]:
    """A 100 x 80 white thumbnail at downsample 8 with a tissue rectangle, and the GeoJSON."""
    thumbnail = tmp_path / "thumbnail.png"
    Image.new("RGB", (100, 80), (255, 255, 255)).save(thumbnail)
    mask = np.zeros((80, 100), dtype=np.uint8)
    mask[10:70, 10:90] = 255
    mask_png = tmp_path / "tissue_mask.png"
    Image.fromarray(mask).save(mask_png)
    tissue_json = tmp_path / "tissue.json"
    tissue_json.write_text(json.dumps(
        {"slide_id": "s", "status": status.OK, "mask_downsample_x": 8.0, "mask_downsample_y": 8.0,
         "mask_width": 100, "mask_height": 80}
    ))
    geojson_path = tmp_path / "tumour.geojson"
    geojson.write_feature_collection(geojson_path, features)
    return thumbnail, mask_png, tissue_json, geojson_path


def test_overlay_draws_outlines(tmp_path: Path) -> None:
    """Tumour outlines land at level-0 / downsample, and the tissue outline is drawn."""
    square = shapely.box(30 * 8, 20 * 8, 60 * 8, 50 * 8)
    feature = {"type": "Feature", "id": "x", "geometry": json.loads(shapely.to_geojson(square)),
               "properties": {"objectType": "annotation"}}
    inputs = write_overlay_inputs(tmp_path, [feature])

    render_overlay(*inputs, tmp_path / "overlay.png")

    pixels = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB"))
    assert pixels.shape == (80, 100, 3)
    assert tuple(pixels[20, 45]) == TUMOUR_OUTLINE_RGB  # top edge of the square
    assert tuple(pixels[35, 30]) == TUMOUR_OUTLINE_RGB  # left edge
    assert tuple(pixels[35, 45]) == (255, 255, 255)  # inside, not filled
    assert tuple(pixels[40, 10]) == TISSUE_OUTLINE_RGB  # left edge of the tissue
    assert tuple(pixels[40, 50]) != TISSUE_OUTLINE_RGB


def test_overlay_empty_collection(tmp_path: Path) -> None:
    """A slide without tumour polygons still gets an overlay with its tissue outline."""
    inputs = write_overlay_inputs(tmp_path, [])

    render_overlay(*inputs, tmp_path / "overlay.png")

    pixels = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB"))
    assert not (pixels == TUMOUR_OUTLINE_RGB).all(axis=2).any()
    assert (pixels == TISSUE_OUTLINE_RGB).all(axis=2).any()


def test_shards_to_report(tmp_path: Path) -> None:
    """Hand-built shards go through stitch, vectorise and report to the expected row."""
    # Patch store: 64 x 64 output px at downsample 4 from a 256 x 256 level-0 image.
    patches = zarr.open_group(str(tmp_path / "patches.zarr"), mode="w")
    patches.create_array("image", shape=(256, 256, 3), chunks=(128, 128, 3), dtype="uint8", fill_value=255)
    patches.attrs.update(
        {"slide_id": "s", "patch_size_px": 128, "stride_px": 64, "level": 0, "analysis_downsample": 1.0,
         "mpp_x": 0.5, "mpp_y": 0.5, "n_patches": 2, "status": status.OK, "message": ""}
    )
    # Two shards overlapping on rows 16..32, with a 20 x 30 px tumour square across both.
    probability = np.zeros((64, 64))
    probability[10:30, 20:50] = 0.9
    shards = []
    for index, (row0, row1) in enumerate([(0, 32), (16, 64)]):
        group = zarr.open_group(str(tmp_path / f"shard-{index}.zarr"), mode="w")
        for name, values in [("sum", probability[row0:row1]), ("weight", np.ones((row1 - row0, 64)))]:
            array = group.create_array(name, shape=values.shape, chunks=(16, 16), dtype="float32", fill_value=0.0)
            array[:] = values
        group.attrs.update(
            {"slide_id": "s", "shard_index": index, "out_row0": row0, "output_downsample": 4,
             "n_patches": 1, "weights": "untrained", "preprocessing": "digipathai", "status": status.OK}
        )
        shards.append(tmp_path / f"shard-{index}.zarr")
    (tmp_path / "slide.json").write_text(json.dumps(
        {"slide_id": "s", "path": "/slides/s.svs", "status": status.OK, "message": "", "vendor": "aperio",
         "width": 256, "height": 256, "mpp_x": 0.5, "mpp_y": 0.5, "mpp_source": "metadata",
         "bounds_x": 0, "bounds_y": 0}
    ))
    (tmp_path / "tissue.json").write_text(json.dumps(
        {"slide_id": "s", "status": status.OK, "tissue_area_px_level0": 256.0 * 256.0,
         "tissue_area_mm2": 256 * 256 * 0.25 / 1e6}
    ))

    run_stitch(tmp_path / "patches.zarr", shards, tmp_path / "probability.zarr", chunk_px=16)
    run_vectorise(
        tmp_path / "probability.zarr", tmp_path / "slide.json", tmp_path / "tissue.json",
        tmp_path / "tumour.geojson", tmp_path / "stats.json", min_area_um2=0.0,
    )
    frame = run_report([tmp_path / "stats.json"], tmp_path / "report.csv")

    tumour_px_level0 = 20 * 30 * 16
    assert frame.loc[0, "n_tumour_regions"] == 1
    assert frame.loc[0, "tumour_area_mm2"] == pytest.approx(tumour_px_level0 * 0.25 / 1e6)
    assert frame.loc[0, "tumour_fraction"] == pytest.approx(tumour_px_level0 / (256 * 256))
    assert frame.loc[0, "model_weights"] == "untrained"
    assert frame.loc[0, "status"] == status.OK


def test_report_runtime_from_benchmarks(tmp_path: Path) -> None:
    """runtime_s sums a slide's Snakemake benchmark files; a slide without any stays empty."""
    paths = write_stats(tmp_path, [stats_row("b"), stats_row("a")])
    benchmarks = tmp_path / "benchmarks" / "b"
    benchmarks.mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\n"
    (benchmarks / "tissue.tsv").write_text(header + "1.5\t0:00:01\t10\n")
    (benchmarks / "infer-shard-0.tsv").write_text(header + "10.25\t0:00:10\t900\n")

    frame = run_report(paths, tmp_path / "report.csv", benchmarks_dir=tmp_path / "benchmarks")

    assert frame.loc[0, "runtime_s"] == 11.75
    assert pd.isna(frame.loc[1, "runtime_s"])
