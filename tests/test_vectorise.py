"""Tests of wsiseg.vectorise: probability maps with known shapes, traced to GeoJSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.ndimage as ndi
import shapely
import zarr

from wsiseg import geojson, status
from wsiseg.errors import ConfigError
from wsiseg.vectorise import FOUR_CONNECTED, iter_regions, run_vectorise, trace_mask

SLIDE_ID = "slide-v"
MPP_X, MPP_Y = 0.5, 0.25
LEVEL0_DOWNSAMPLE = 4.0


def write_map(
    path: Path,
    probability: np.ndarray,
    *,
    chunk_px: int = 32,
    level0_downsample: float = LEVEL0_DOWNSAMPLE,
    slide_status: str = status.OK,
) -> Path:
    """Write a probability map group as the stitch stage lays it out."""
    group = zarr.open_group(str(path), mode="w")
    chunks = (chunk_px, chunk_px)
    array = group.create_array(
        "probability", shape=probability.shape, chunks=chunks, dtype="float32", fill_value=0.0
    )
    array[:] = probability.astype(np.float32)
    coverage = group.create_array(
        "coverage", shape=probability.shape, chunks=chunks, dtype="uint8", fill_value=0
    )
    coverage[:] = 1
    group.attrs.update(
        {
            "slide_id": SLIDE_ID,
            "status": slide_status,
            "message": "",
            "output_downsample": 4,
            "analysis_downsample": level0_downsample / 4,
            "level0_downsample": level0_downsample,
            "mpp_x": MPP_X * level0_downsample,
            "mpp_y": MPP_Y * level0_downsample,
            "weights": [{"file": "model.h5", "sha256": "ab" * 32}],
            "preprocessing": "digipathai",
        }
    )
    return path


def write_slide_json(
    path: Path,
    *,
    mpp: tuple[float | None, float | None] = (MPP_X, MPP_Y),
    bounds: tuple[int, int] = (0, 0),
    slide_status: str = status.OK,
) -> Path:
    """Write the slide metadata fields that vectorise reads."""
    slide = {
        "slide_id": SLIDE_ID,
        "path": "/slides/slide-v.svs",
        "status": slide_status,
        "message": "" if slide_status == status.OK else f"status {slide_status}",
        "vendor": "aperio",
        "width": 4000,
        "height": 3000,
        "mpp_x": mpp[0],
        "mpp_y": mpp[1],
        "mpp_source": "metadata" if mpp[0] else "missing",
        "bounds_x": bounds[0],
        "bounds_y": bounds[1],
        "bounds_width": 4000,
        "bounds_height": 3000,
    }
    path.write_text(json.dumps(slide))
    return path


def write_tissue_json(path: Path, *, tissue_px_level0: float = 1.0e6, slide_status: str = status.OK) -> Path:
    """Write the tissue metadata fields that vectorise reads."""
    tissue = {
        "slide_id": SLIDE_ID,
        "status": slide_status,
        "message": "",
        "tissue_area_px_level0": tissue_px_level0,
        "tissue_area_mm2": tissue_px_level0 * MPP_X * MPP_Y / 1e6,
    }
    path.write_text(json.dumps(tissue))
    return path


def vectorise(
    tmp_path: Path,
    probability: np.ndarray,
    *,
    map_options: dict[str, Any] | None = None,
    slide_options: dict[str, Any] | None = None,
    tissue_options: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run run_vectorise on a map and return the GeoJSON features and the stats."""
    options.setdefault("min_area_um2", 0.0)
    options.setdefault("min_area_px", 0.0)
    stats = run_vectorise(
        write_map(tmp_path / "probability.zarr", probability, **(map_options or {})),
        write_slide_json(tmp_path / "slide.json", **(slide_options or {})),
        write_tissue_json(tmp_path / "tissue.json", **(tissue_options or {})),
        tmp_path / "tumour.geojson",
        tmp_path / "stats.json",
        **options,
    )
    document = json.loads((tmp_path / "tumour.geojson").read_text(encoding="utf-8"))
    assert document["type"] == "FeatureCollection"
    return document["features"], stats


def polygons_of(features: list[dict[str, Any]]) -> list[shapely.Polygon]:
    return [shapely.geometry.shape(feature["geometry"]) for feature in features]


def test_trace_square_with_hole() -> None:
    """A square with a square hole traces to one valid polygon with one interior ring."""
    mask = np.zeros((20, 24), dtype=bool)
    mask[2:18, 3:21] = True
    mask[6:12, 8:15] = False

    polygons = trace_mask(mask)

    assert len(polygons) == 1
    assert polygons[0].is_valid
    assert len(polygons[0].interiors) == 1
    assert polygons[0].area == mask.sum()
    assert polygons[0].equals(shapely.box(3, 2, 21, 18) - shapely.box(8, 6, 15, 12))


def test_trace_random_masks_exact() -> None:
    """Random masks trace to one valid polygon per 4-connected region, covering its pixels."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        height, width = rng.integers(1, 25, size=2)
        mask = rng.random((height, width)) < rng.uniform(0.2, 0.8)
        labels, n_regions = ndi.label(mask, structure=FOUR_CONNECTED)

        polygons = trace_mask(mask, row0=5)

        assert len(polygons) == n_regions
        assert shapely.is_valid(polygons).all()
        sizes = np.bincount(labels.ravel())[1:]
        assert sorted(shapely.area(polygons)) == sorted(sizes.tolist())
        pixels = [shapely.box(x, y + 5, x + 1, y + 6) for y, x in zip(*np.nonzero(mask))]
        if pixels:
            assert shapely.union_all(polygons).equals(shapely.union_all(pixels))


def test_regions_merge_across_bands() -> None:
    """Regions cut by band and chunk borders come out whole, one per 4-connected region."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        height, width = rng.integers(2, 40, size=2)
        mask = ndi.binary_opening(rng.random((height, width)) < 0.6) | (rng.random((height, width)) < 0.05)
        array = zarr.create_array(store={}, shape=mask.shape, chunks=(4, 5), dtype="float32", fill_value=0)
        array[:] = mask.astype(np.float32)
        _, n_regions = ndi.label(mask, structure=FOUR_CONNECTED)

        batches = iter_regions(array, threshold=0.5, max_band_px=int(rng.integers(1, 3 * width)))
        polygons = np.concatenate([np.empty(0, dtype=object)] + [batch.polygons for batch in batches])

        assert len(polygons) == n_regions
        assert shapely.is_valid(polygons).all()
        assert shapely.area(polygons).sum() == mask.sum()


def test_vectorise_square_with_hole(tmp_path: Path) -> None:
    """A square with a square hole: one valid polygon, one hole, area = pixels x mpp x ds²."""
    probability = np.zeros((64, 64))
    probability[10:50, 12:52] = 0.9
    probability[20:30, 25:40] = 0.1
    n_pixels = 40 * 40 - 10 * 15

    features, stats = vectorise(tmp_path, probability, threshold=0.5)

    assert len(features) == 1
    polygon = polygons_of(features)[0]
    assert polygon.geom_type == "Polygon"
    assert polygon.is_valid
    assert len(polygon.interiors) == 1
    expected_um2 = n_pixels * MPP_X * MPP_Y * LEVEL0_DOWNSAMPLE**2
    assert features[0]["properties"]["measurements"]["Area µm^2"] == pytest.approx(expected_um2)
    assert features[0]["properties"]["measurements"]["Area px"] == pytest.approx(n_pixels * 16)
    assert polygon.area == pytest.approx(n_pixels * 16)
    assert polygon.bounds == (12 * 4, 10 * 4, 52 * 4, 50 * 4)
    assert stats["tumour_area_mm2"] == pytest.approx(expected_um2 / 1e6)
    assert stats["n_tumour_regions"] == 1


def test_vectorise_corner_touching_regions(tmp_path: Path) -> None:
    """Two regions touching at one pixel corner become two valid single polygons."""
    probability = np.zeros((16, 16))
    probability[2:6, 2:6] = 1.0
    probability[6:10, 6:10] = 1.0

    features, _ = vectorise(tmp_path, probability)

    polygons = polygons_of(features)
    assert len(polygons) == 2
    assert all(polygon.geom_type == "Polygon" for polygon in polygons)
    assert all(polygon.is_valid for polygon in polygons)
    assert sorted(polygon.area for polygon in polygons) == [16 * 16, 16 * 16]


def test_vectorise_island_in_hole(tmp_path: Path) -> None:
    """An island inside a hole is its own feature, and the hole stays an interior ring."""
    probability = np.zeros((40, 40))
    probability[5:35, 5:35] = 1.0
    probability[10:30, 10:30] = 0.0
    probability[15:25, 15:25] = 1.0

    features, stats = vectorise(tmp_path, probability)

    polygons = sorted(polygons_of(features), key=lambda polygon: polygon.area)
    assert len(polygons) == 2
    island, ring = polygons
    assert all(polygon.geom_type == "Polygon" for polygon in polygons)
    assert all(polygon.is_valid for polygon in polygons)
    assert len(ring.interiors) == 1
    assert len(island.interiors) == 0
    assert island.area == 10 * 10 * 16
    assert ring.area == (30 * 30 - 20 * 20) * 16
    assert shapely.Polygon(ring.interiors[0]).contains(island)
    assert stats["n_tumour_regions"] == 2


def test_vectorise_one_pixel_lines(tmp_path: Path) -> None:
    """One-pixel-wide lines, straight and diagonal staircase, give valid polygons."""
    probability = np.zeros((30, 30))
    probability[3, 2:28] = 1.0
    for step in range(12):
        probability[8 + step, 4 + step] = 1.0
        probability[8 + step, 5 + step] = 1.0
    probability[22:29, 15] = 1.0
    probability[28, 15:25] = 1.0

    features, _ = vectorise(tmp_path, probability)

    polygons = polygons_of(features)
    assert len(polygons) == 3
    assert all(polygon.geom_type == "Polygon" for polygon in polygons)
    assert all(polygon.is_valid for polygon in polygons)
    assert all(len(polygon.interiors) == 0 for polygon in polygons)


def test_vectorise_noise_all_valid(tmp_path: Path) -> None:
    """A noisy map split into many bands gives only valid single polygons of exact area."""
    rng = np.random.default_rng(11)
    probability = ndi.uniform_filter(rng.random((90, 70)), size=3)
    mask = probability >= 0.5

    features, stats = vectorise(
        tmp_path, probability, simplify_tolerance_px=0.0, max_band_px=400, map_options={"chunk_px": 16}
    )

    polygons = polygons_of(features)
    assert all(polygon.geom_type == "Polygon" for polygon in polygons)
    assert all(polygon.is_valid for polygon in polygons)
    _, n_regions = ndi.label(mask, structure=FOUR_CONNECTED)
    assert len(polygons) == n_regions
    assert stats["tumour_area_px_level0"] == mask.sum() * 16


def test_vectorise_disc_across_four_chunks(tmp_path: Path) -> None:
    """A disc spanning four chunks is one polygon with area within 0.5% of the disc's."""
    radius = 150.0
    rows, cols = np.mgrid[0:400, 0:400]
    probability = ((rows + 0.5 - 200) ** 2 + (cols + 0.5 - 200) ** 2 <= radius**2).astype(float)

    features, stats = vectorise(tmp_path, probability, map_options={"chunk_px": 200})

    polygons = polygons_of(features)
    assert len(polygons) == 1
    assert polygons[0].is_valid
    disc_area = math.pi * radius**2 * LEVEL0_DOWNSAMPLE**2
    assert polygons[0].area == pytest.approx(disc_area, rel=0.005)
    assert stats["tumour_area_px_level0"] == pytest.approx(disc_area, rel=0.005)


def test_vectorise_empty_map(tmp_path: Path) -> None:
    """A map without tumour gives a valid empty FeatureCollection and zero areas."""
    features, stats = vectorise(tmp_path, np.zeros((50, 40)))

    assert features == []
    assert stats["n_tumour_regions"] == 0
    assert stats["tumour_area_mm2"] == 0.0
    assert stats["tumour_fraction"] == 0.0
    assert stats["status"] == status.OK


def test_vectorise_no_tissue(tmp_path: Path) -> None:
    """A slide without tissue keeps its status, an empty collection and zero areas."""
    features, stats = vectorise(
        tmp_path,
        np.zeros((0, 0)),
        map_options={"slide_status": status.NO_TISSUE},
        tissue_options={"slide_status": status.NO_TISSUE, "tissue_px_level0": 0.0},
    )

    assert features == []
    assert stats["status"] == status.NO_TISSUE
    assert stats["tumour_area_mm2"] == 0.0
    assert stats["n_tumour_regions"] == 0
    assert stats["largest_region_mm2"] == 0.0
    assert stats["tumour_fraction"] is None


def test_vectorise_unreadable_slide(tmp_path: Path) -> None:
    """An unreadable slide gets an empty collection and empty tumour statistics."""
    features, stats = vectorise(
        tmp_path,
        np.ones((8, 8)),
        map_options={"slide_status": status.UNREADABLE},
        slide_options={"slide_status": status.UNREADABLE},
    )

    assert features == []
    assert stats["status"] == status.UNREADABLE
    assert stats["message"] == "status unreadable"
    assert stats["tumour_area_mm2"] is None
    assert stats["n_tumour_regions"] is None


def test_vectorise_status_precedence(tmp_path: Path) -> None:
    """A no_tissue tissue status wins over the slide's no_mpp status."""
    _, stats = vectorise(
        tmp_path,
        np.zeros((4, 4)),
        map_options={"slide_status": status.NO_TISSUE},
        slide_options={"mpp": (None, None), "slide_status": status.NO_MPP},
        tissue_options={"slide_status": status.NO_TISSUE, "tissue_px_level0": 0.0},
    )

    assert stats["status"] == status.NO_TISSUE
    assert stats["tumour_area_px_level0"] == 0.0
    assert stats["tumour_area_mm2"] is None


def test_vectorise_without_mpp(tmp_path: Path) -> None:
    """Without MPP, pixel areas are present and every µm² and mm² value is absent."""
    probability = np.zeros((20, 20))
    probability[4:10, 4:12] = 1.0

    features, stats = vectorise(tmp_path, probability, slide_options={"mpp": (None, None)})

    measurements = features[0]["properties"]["measurements"]
    assert "Area µm^2" not in measurements
    assert measurements["Area px"] == 6 * 8 * 16
    assert stats["tumour_area_mm2"] is None
    assert stats["largest_region_mm2"] is None
    assert stats["tumour_area_px_level0"] == 6 * 8 * 16


def test_vectorise_drops_specks(tmp_path: Path) -> None:
    """Regions below the minimum area are dropped and counted."""
    probability = np.zeros((30, 30))
    probability[2:4, 2:4] = 1.0  # 4 map px = 64 level-0 px² = 8 µm²
    probability[10:20, 10:20] = 1.0  # 100 map px = 200 µm²

    features, stats = vectorise(tmp_path, probability, min_area_um2=50.0)

    assert len(features) == 1
    assert stats["n_specks_removed"] == 1
    assert features[0]["properties"]["measurements"]["Area µm^2"] == pytest.approx(200.0)


def test_vectorise_bounds_shifted_copy(tmp_path: Path) -> None:
    """The bounds copy has the same features shifted by the slide's bounds offset."""
    probability = np.zeros((20, 20))
    probability[4:10, 4:12] = 1.0

    features, stats = vectorise(
        tmp_path, probability, slide_options={"bounds": (100, 50)},
        bounds_geojson=tmp_path / "tumour-bounds.geojson",
    )

    shifted = geojson.read_features(tmp_path / "tumour-bounds.geojson")
    assert [feature["id"] for feature in shifted] == [feature["id"] for feature in features]
    original = polygons_of(features)[0]
    moved = shapely.geometry.shape(shifted[0]["geometry"])
    assert moved.equals(shapely.affinity.translate(original, -100, -50))
    assert stats["bounds_x"] == 100


def test_vectorise_qupath_layout(tmp_path: Path) -> None:
    """Every feature has a UUID id, an annotation object type, a class and measurements."""
    probability = np.zeros((30, 30))
    probability[2:8, 2:8] = 1.0
    probability[12:20, 12:25] = 1.0

    features, _ = vectorise(tmp_path, probability, class_name="Tumor", class_color=[200, 0, 0])

    assert len(features) == 2
    for feature in features:
        assert feature["type"] == "Feature"
        assert uuid.UUID(feature["id"]).version == 5
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        assert isinstance(properties["measurements"], dict)
        assert properties["model_weights"] == "model.h5 sha256=" + "ab" * 32
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        assert shapely.LinearRing(ring).is_ccw  # RFC 7946 order in x/y numbers


def test_vectorise_non_integer_downsample(tmp_path: Path) -> None:
    """A non-integer level-0 downsample scales coordinates and keeps polygons valid."""
    probability = np.zeros((20, 20))
    probability[3:11, 5:9] = 1.0
    probability[5:7, 6:8] = 0.0

    features, _ = vectorise(tmp_path, probability, map_options={"level0_downsample": 4.000152})

    polygon = polygons_of(features)[0]
    assert polygon.is_valid
    assert polygon.bounds == pytest.approx((5 * 4.000152, 3 * 4.000152, 9 * 4.000152, 11 * 4.000152), abs=0.01)


def test_vectorise_is_deterministic(tmp_path: Path) -> None:
    """Vectorising the same map twice writes identical GeoJSON."""
    rng = np.random.default_rng(5)
    probability = ndi.uniform_filter(rng.random((60, 60)), size=5)
    vectorise(tmp_path, probability)
    first = (tmp_path / "tumour.geojson").read_bytes()

    vectorise(tmp_path, probability)

    assert (tmp_path / "tumour.geojson").read_bytes() == first


@pytest.mark.parametrize("threshold", [0.0, 1.5, float("nan")])
def test_vectorise_rejects_threshold(tmp_path: Path, threshold: float) -> None:
    """A threshold outside (0, 1] is a configuration error."""
    with pytest.raises(ConfigError, match="threshold"):
        vectorise(tmp_path, np.zeros((4, 4)), threshold=threshold)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from wsiseg.stitch import run_stitch
    from wsiseg.vectorise import run_vectorise

    def status_kib(field):
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    work = sys.argv[1]
    # A warm-up on a tiny slide imports the lazy modules and fills allocator pools first.
    run_stitch(
        f"{work}/small/patches.zarr", [f"{work}/small/shard-0.zarr"],
        f"{work}/small/probability.zarr", chunk_px=256,
    )
    baseline = status_kib("VmRSS")
    run_stitch(
        f"{work}/patches.zarr", [f"{work}/shard-0.zarr", f"{work}/shard-1.zarr"],
        f"{work}/probability.zarr", chunk_px=256,
    )
    stats = run_vectorise(
        f"{work}/probability.zarr", f"{work}/slide.json", f"{work}/tissue.json",
        f"{work}/tumour.geojson", f"{work}/stats.json", min_area_um2=0.0, max_band_px=1 << 20,
    )
    print(json.dumps({"baseline_kib": baseline, "peak_kib": status_kib("VmHWM"),
                      "regions": stats["n_tumour_regions"]}))
    """
)


def _write_patch_store(path: Path, size_px: int, n_patches: int) -> None:
    """Write a patch store holding only the attributes and `image` shape that stitch reads."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array(
        "image", shape=(size_px, size_px, 3), chunks=(1024, 1024, 3), dtype="uint8", fill_value=255
    )
    group.attrs.update(
        {"slide_id": SLIDE_ID, "patch_size_px": 256, "stride_px": 128, "level": 0,
         "analysis_downsample": 1.0, "mpp_x": MPP_X, "mpp_y": MPP_Y, "n_patches": n_patches,
         "status": status.OK, "message": ""}
    )


def _write_shard(path: Path, index: int, row0: int, row1: int, width: int) -> dict[str, zarr.Array]:
    """Create an empty shard band of rows row0..row1 and return its `sum` and `weight` arrays."""
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update(
        {"slide_id": SLIDE_ID, "shard_index": index, "out_row0": row0, "output_downsample": 4,
         "n_patches": 1, "weights": "untrained", "preprocessing": "digipathai", "status": status.OK}
    )
    return {
        name: group.create_array(
            name, shape=(row1 - row0, width), chunks=(256, 256), dtype="float32", fill_value=0.0
        )
        for name in ("sum", "weight")
    }


def _write_memory_slide(work: Path, size_px: int, n_discs: int) -> None:
    """Write a patch store and two overlapping shard bands, chunk by chunk, with discs."""
    half = size_px // 2
    _write_patch_store(work / "patches.zarr", size_px * 4, n_patches=2)
    centres = [((k + 0.5) * size_px / n_discs, (k + 0.5) * size_px / n_discs) for k in range(n_discs)]
    radius = size_px / n_discs / 3
    for index, (row0, row1) in enumerate([(0, half + 64), (half - 64, size_px)]):
        arrays = _write_shard(work / f"shard-{index}.zarr", index, row0, row1, size_px)
        for chunk_row in range(row0, row1, 256):
            rows = np.arange(chunk_row, min(row1, chunk_row + 256))[:, None]
            cols = np.arange(size_px)[None, :]
            inside = np.zeros((rows.size, size_px), dtype=bool)
            for centre_row, centre_col in centres:
                inside |= (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= radius**2
            arrays["sum"][chunk_row - row0 : chunk_row - row0 + rows.size] = inside.astype(np.float32)
            arrays["weight"][chunk_row - row0 : chunk_row - row0 + rows.size] = 1.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_stitch_vectorise_memory_bounded(tmp_path: Path) -> None:
    """Stitching and vectorising an 8192² map in 256 px chunks stays far below one map's size."""
    size_px = 8192
    _write_memory_slide(tmp_path, size_px, n_discs=6)
    (tmp_path / "small").mkdir()
    _write_patch_store(tmp_path / "small" / "patches.zarr", 64, n_patches=1)
    small = _write_shard(tmp_path / "small" / "shard-0.zarr", 0, 0, 16, 16)
    small["sum"][:] = 1.0
    small["weight"][:] = 1.0
    write_slide_json(tmp_path / "slide.json")
    write_tissue_json(tmp_path / "tissue.json")

    # The child reads its peak from VmHWM. Its getrusage ru_maxrss also counted the memory
    # of this test process when measured here, because Linux keeps the maximum across exec.
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )

    measured = json.loads(result.stdout.strip().splitlines()[-1])
    map_bytes = size_px * size_px * 4  # one float32 map: 268 MB
    assert measured["regions"] == 6
    assert (measured["peak_kib"] - measured["baseline_kib"]) * 1024 < map_bytes / 2


def test_vectorise_clips_to_tissue(tmp_path: Path) -> None:
    """Tumour is traced only inside the tissue mask, so the fraction stays within 1."""
    from PIL import Image

    # A map that is tumour everywhere, over a tissue mask whose left half is tissue.
    probability = np.ones((32, 32), dtype=np.float32)
    level0_size = 32 * LEVEL0_DOWNSAMPLE
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255
    mask_png = tmp_path / "tissue_mask.png"
    Image.fromarray(mask).save(mask_png)
    mask_downsample = level0_size / 16
    tissue_json = tmp_path / "tissue-clip.json"
    tissue_px_level0 = level0_size * level0_size / 2
    tissue_json.write_text(json.dumps({
        "slide_id": SLIDE_ID, "status": status.OK, "message": "",
        "mask_downsample_x": mask_downsample, "mask_downsample_y": mask_downsample,
        "tissue_area_px_level0": tissue_px_level0,
        "tissue_area_mm2": tissue_px_level0 * MPP_X * MPP_Y / 1e6,
    }))

    stats = run_vectorise(
        write_map(tmp_path / "probability.zarr", probability),
        write_slide_json(tmp_path / "slide.json"),
        tissue_json,
        tmp_path / "tumour.geojson",
        tmp_path / "stats.json",
        min_area_um2=0.0,
        min_area_px=0.0,
        tissue_mask_png=mask_png,
    )

    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    polygons = polygons_of(features)
    assert len(polygons) == 1
    assert polygons[0].bounds == (0.0, 0.0, level0_size / 2, level0_size)
    assert stats["tumour_area_px_level0"] == pytest.approx(tissue_px_level0)
    assert stats["tumour_fraction"] == pytest.approx(1.0)
