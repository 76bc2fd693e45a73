"""The cohort report (one CSV row per slide) and the per-slide overlay picture."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
from PIL import Image, ImageDraw

from wsiseg import geojson
from wsiseg.atomic import write_bytes, write_text
from wsiseg.errors import ArtefactError

logger = logging.getLogger(__name__)

# Column order of report.csv. The first block is the documented report. The second adds
# the pixel areas (present where the MPP is unknown) and the settings behind each row.
REPORT_COLUMNS = [
    "slide_id",
    "path",
    "status",
    "message",
    "vendor",
    "width",
    "height",
    "mpp_x",
    "mpp_y",
    "mpp_source",
    "bounds_x",
    "bounds_y",
    "tissue_area_mm2",
    "tumour_area_mm2",
    "tumour_fraction",
    "n_tumour_regions",
    "largest_region_mm2",
    "threshold",
    "model_weights",
    "runtime_s",
    "wsiseg_version",
    "bounds_width",
    "bounds_height",
    "tissue_area_px_level0",
    "tumour_area_px_level0",
    "largest_region_px_level0",
    "n_specks_removed",
    "min_area_um2",
    "min_area_px_level0",
    "simplify_tolerance_px",
    "output_downsample",
    "level0_downsample",
    "preprocessing",
]

INTEGER_COLUMNS = [
    "width",
    "height",
    "bounds_x",
    "bounds_y",
    "bounds_width",
    "bounds_height",
    "n_tumour_regions",
    "n_specks_removed",
    "output_downsample",
]

STRING_COLUMNS = [
    "slide_id",
    "path",
    "status",
    "message",
    "vendor",
    "mpp_source",
    "model_weights",
    "wsiseg_version",
    "preprocessing",
]

TISSUE_OUTLINE_RGB = (0, 170, 0)
TUMOUR_OUTLINE_RGB = (220, 0, 0)


def _load_stats(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as stream:
            stats = json.load(stream)
    except FileNotFoundError as error:
        raise ArtefactError(f"slide statistics not found: {path}") from error
    except json.JSONDecodeError as error:
        raise ArtefactError(f"slide statistics {path} are not valid JSON: {error}") from error
    if not isinstance(stats, dict) or not stats.get("slide_id"):
        raise ArtefactError(f"slide statistics {path} lack a slide_id")
    return stats


def benchmark_seconds(benchmark_files: Iterable[str | os.PathLike]) -> float | None:
    """Sum the wall-clock seconds (column ``s``) of Snakemake benchmark files.

    Files that do not exist are skipped, because a stage that Snakemake did not rerun
    may have no benchmark. Returns None when no file was found. Where a file has several
    rows (Snakemake's ``repeat``), their mean counts.
    """
    total = 0.0
    found = False
    for path in benchmark_files:
        if not Path(path).is_file():
            continue
        table = pd.read_csv(path, sep="\t")
        if "s" not in table.columns:
            raise ArtefactError(f"benchmark file {path} has no 's' column")
        total += float(table["s"].mean())
        found = True
    return total if found else None


def build_report(stats_rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Arrange per-slide statistics as the report table, in REPORT_COLUMNS order."""
    records = [{column: row.get(column) for column in REPORT_COLUMNS} for row in stats_rows]
    frame = pd.DataFrame(records, columns=REPORT_COLUMNS)
    for column in INTEGER_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    for column in REPORT_COLUMNS:
        if column not in INTEGER_COLUMNS and column not in STRING_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("Float64")
    for column in STRING_COLUMNS:
        frame[column] = frame[column].astype("string")
    return frame


def run_report(
    stats_jsons: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    *,
    runtimes: Mapping[str, float | None] | None = None,
    benchmarks_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Write report.csv with one row per slide, in the order of ``stats_jsons``.

    ``runtimes`` maps slide ids to their processing time in seconds (for example from
    ``benchmark_seconds``). Without an entry there, a slide's runtime is the sum of the
    Snakemake benchmark files under ``benchmarks_dir/<slide_id>/``, when given. Slides
    without either get an empty runtime_s. Raises
    ArtefactError for a missing statistics file or a slide id that occurs twice.
    """
    rows = []
    seen: dict[str, str] = {}
    for path in stats_jsons:
        stats = _load_stats(path)
        slide_id = str(stats["slide_id"])
        if slide_id in seen:
            raise ArtefactError(f"slide id {slide_id!r} occurs in both {seen[slide_id]} and {path}")
        seen[slide_id] = str(path)
        runtime_s = (runtimes or {}).get(slide_id)
        if runtime_s is None and benchmarks_dir is not None:
            runtime_s = benchmark_seconds(sorted((Path(benchmarks_dir) / slide_id).glob("*.tsv")))
        stats["runtime_s"] = runtime_s
        rows.append(stats)

    frame = build_report(rows)
    write_text(out_csv, frame.to_csv(index=False))
    logger.info("report of %d slides written to %s", len(frame), out_csv)
    return frame


def _ring_points(
    coordinates: Sequence[Sequence[float]], scale_x: float, scale_y: float
) -> list[tuple[float, float]]:
    return [(x * scale_x, y * scale_y) for x, y, *_ in coordinates]


def render_overlay(
    thumbnail_png: str | os.PathLike,
    tissue_mask_png: str | os.PathLike,
    tissue_json: str | os.PathLike,
    geojson_path: str | os.PathLike,
    out_png: str | os.PathLike,
) -> None:
    """Draw the tissue outline (green) and tumour outlines (red) on the thumbnail.

    The thumbnail and mask are at the tissue-detection resolution recorded in tissue.json
    (``mask_downsample_x``/``_y`` level-0 pixels per mask pixel). GeoJSON coordinates are
    level-0 pixels, so they are divided by that downsample, and rescaled where the
    thumbnail and the mask differ in size.
    """
    try:
        thumbnail = Image.open(thumbnail_png).convert("RGB")
        mask = np.asarray(Image.open(tissue_mask_png).convert("L")) > 0
        with open(tissue_json, encoding="utf-8") as stream:
            tissue = json.load(stream)
    except FileNotFoundError as error:
        raise ArtefactError(f"overlay input not found: {error.filename}") from error
    slide_id = tissue.get("slide_id")
    features = geojson.read_features(geojson_path)

    # Lines about 1/600 of the picture wide, so outlines stay visible on large thumbnails.
    line_width = max(1, round(min(thumbnail.size) / 600))

    # Tissue outline: mask pixels within line_width of the background, at thumbnail size.
    outline = mask & ~ndi.binary_erosion(mask, iterations=line_width, border_value=0)
    if outline.shape != (thumbnail.height, thumbnail.width):
        outline_image = Image.fromarray(outline.astype(np.uint8) * 255)
        outline_image = outline_image.resize(thumbnail.size, Image.Resampling.NEAREST)
        outline = np.asarray(outline_image) > 0
    pixels = np.array(thumbnail)
    pixels[outline] = TISSUE_OUTLINE_RGB
    picture = Image.fromarray(pixels)

    # Tumour outlines: level-0 coordinates to thumbnail pixels.
    downsample_x = float(tissue.get("mask_downsample_x") or 0)
    downsample_y = float(tissue.get("mask_downsample_y") or 0)
    if features and downsample_x > 0 and downsample_y > 0 and mask.size:
        scale_x = thumbnail.width / mask.shape[1] / downsample_x
        scale_y = thumbnail.height / mask.shape[0] / downsample_y
        draw = ImageDraw.Draw(picture)
        for feature in features:
            geometry = feature.get("geometry") or {}
            polygons = geometry.get("coordinates", [])
            if geometry.get("type") == "Polygon":
                polygons = [polygons]
            elif geometry.get("type") != "MultiPolygon":
                continue
            for polygon in polygons:
                for ring in polygon:
                    points = _ring_points(ring, scale_x, scale_y)
                    if len(points) >= 2:
                        draw.line(points, fill=TUMOUR_OUTLINE_RGB, width=line_width, joint="curve")
    elif features:
        logger.warning(
            "slide %s: tissue.json has no mask downsample, so tumour outlines are left out",
            slide_id,
        )

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes(out_png, buffer.getvalue())
    logger.info(
        "slide %s: overlay with %d tumour regions written to %s", slide_id, len(features), out_png
    )
