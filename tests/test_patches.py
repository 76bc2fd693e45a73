"""The patches stage: grid, tissue selection, Zarr store, shard plan and pixel fidelity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from wsiseg import status, synthetic
from wsiseg.errors import ConfigError
from wsiseg.patches import (
    choose_analysis_level,
    chunks_under_patches,
    grid_shape,
    run_patches,
    tissue_fractions,
)
from wsiseg.slide import composite_on_white

PATCH_KEYS = {
    "slide_id", "patch_size_px", "stride_px", "level", "analysis_downsample", "mpp_x",
    "mpp_y", "n_patches", "n_rows", "n_cols", "status", "message",
}


def _open(store: Path) -> zarr.Group:
    return zarr.open_group(store, mode="r")


def _written_chunks(store: Path) -> set[tuple[int, int]]:
    """Return the (row, col) of every chunk file of the image array."""
    root = store / "image" / "c"
    if not root.exists():
        return set()
    return {
        (int(path.parts[-3]), int(path.parts[-2]))
        for path in root.glob("*/*/0")
    }


def _patch(group: zarr.Group, index: int) -> np.ndarray:
    row, col = (int(value) for value in group["grid"][index])
    size = group.attrs["patch_size_px"]
    stride = group.attrs["stride_px"]
    return group["image"][row * stride : row * stride + size, col * stride : col * stride + size]


def _tissue_centroid(image: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(image.min(axis=-1) < 230)
    return float(xs.mean()), float(ys.mean())


# --- real slide: pixels equal OpenSlide's ----------------------------------------------


def test_cmu_patches_equal_read_region(cmu_front_stages, cmu_slide):
    """Every patch equals read_region at its stored coordinates, over white (2 workers)."""
    group = _open(cmu_front_stages.patches_zarr)
    coords = group["coords"][:]
    size = group.attrs["patch_size_px"]
    assert len(coords) > 100
    with openslide.OpenSlide(cmu_slide) as slide:
        for index, (x, y) in enumerate(coords):
            expected = composite_on_white(np.asarray(slide.read_region((int(x), int(y)), 0, (size, size))))
            assert np.array_equal(_patch(group, index), expected), f"patch {index} at {x}, {y}"


def test_cmu_edge_patches_white(cmu_front_stages):
    """Patches that overhang the slide's right or bottom edge read white there."""
    group = _open(cmu_front_stages.patches_zarr)
    coords = group["coords"][:]
    size = group.attrs["patch_size_px"]
    overhanging = [i for i, (x, y) in enumerate(coords) if x + size > 2220 or y + size > 2967]
    assert overhanging
    for index in overhanging:
        x, y = coords[index]
        patch = _patch(group, index)
        assert patch[2967 - y :, :].min(initial=255) == 255
        assert patch[:, 2220 - x :].min(initial=255) == 255


def test_cmu_store_layout(cmu_front_stages):
    """The store has the documented arrays, attributes, dtypes and chunking."""
    group = _open(cmu_front_stages.patches_zarr)
    attrs = dict(group.attrs)
    image = group["image"]
    assert PATCH_KEYS <= set(attrs)
    assert attrs["status"] == status.OK
    assert attrs["level"] == 0
    assert attrs["analysis_downsample"] == 1.0
    assert attrs["mpp_x"] == pytest.approx(0.499)
    assert image.dtype == np.uint8
    assert image.chunks == (1024, 1024, 3)
    assert image.fill_value == 255
    assert image.shape == (
        (attrs["n_rows"] - 1) * 128 + 256, (attrs["n_cols"] - 1) * 128 + 256, 3
    )
    assert group["coords"].dtype == np.int64
    assert group["grid"].shape == (attrs["n_patches"], 2)
    assert "zstd" in json.dumps(image.metadata.to_dict()["codecs"])


def test_cmu_grid_sorted_and_coords(cmu_front_stages):
    """grid is sorted by (row, col) and coords are stride times grid, level-0 x then y."""
    group = _open(cmu_front_stages.patches_zarr)
    grid = group["grid"][:]
    coords = group["coords"][:]
    order = np.lexsort((grid[:, 1], grid[:, 0]))
    assert np.array_equal(order, np.arange(len(grid)))
    assert np.array_equal(coords[:, 0], grid[:, 1] * 128)
    assert np.array_equal(coords[:, 1], grid[:, 0] * 128)


def test_cmu_only_chunks_under_patches(cmu_front_stages):
    """Only chunks under a kept patch are written."""
    group = _open(cmu_front_stages.patches_zarr)
    grid = group["grid"][:]
    image = group["image"]
    chunk_grid = (math.ceil(image.shape[0] / 1024), math.ceil(image.shape[1] / 1024))
    needed = chunks_under_patches(grid[:, 0], grid[:, 1], patch_size_px=256, stride_px=128,
                                  chunk_px=1024, chunk_grid=chunk_grid)
    written = _written_chunks(cmu_front_stages.patches_zarr)
    assert written
    assert written <= {tuple(int(v) for v in index) for index in np.argwhere(needed)}


def test_cmu_plan(cmu_front_stages):
    """The plan covers every grid row and every patch once."""
    plan = cmu_front_stages.plan()
    attrs = _open(cmu_front_stages.patches_zarr).attrs
    assert plan["slide_id"] == "cmu"
    assert plan["status"] == status.OK
    assert plan["n_patches"] == attrs["n_patches"]
    assert plan["n_shards"] == len(plan["shards"]) >= 1
    assert plan["shards"][0]["row_start"] == 0
    assert plan["shards"][-1]["row_stop"] == attrs["n_rows"]
    assert sum(shard["n_patches"] for shard in plan["shards"]) == attrs["n_patches"]


def test_workers_give_same_store(front_stages, cmu_slide, cmu_front_stages):
    """One worker in-process writes the same image as two worker processes."""
    single = front_stages(cmu_slide, "cmu1", patches_options={"workers": 1})
    in_process = _open(single.patches_zarr)
    spawned = _open(cmu_front_stages.patches_zarr)
    assert np.array_equal(in_process["coords"][:], spawned["coords"][:])
    assert np.array_equal(in_process["image"][:], spawned["image"][:])


def test_shards_split_rows(front_stages, cmu_slide):
    """A small patches_per_shard splits the grid into bands of whole rows."""
    stages = front_stages(cmu_slide, "cmu", patches_options={"patches_per_shard": 50, "max_shards": 3})
    plan = stages.plan()
    shards = plan["shards"]
    assert plan["n_shards"] == 3
    assert [shard["row_start"] for shard in shards[1:]] == [shard["row_stop"] for shard in shards[:-1]]
    assert all(shard["n_patches"] > 0 for shard in shards)


# --- odd slides ------------------------------------------------------------------------


def test_tiny_slide_one_padded_patch(front_stages, tiny_slide):
    """A 16 x 16 px slide gives one patch: its pixels top-left, white elsewhere."""
    stages = front_stages(tiny_slide, "tiny")
    group = _open(stages.patches_zarr)
    patch = _patch(group, 0)
    with openslide.OpenSlide(tiny_slide) as slide:
        expected = composite_on_white(np.asarray(slide.read_region((0, 0), 0, (16, 16))))
    assert stages.patches["status"] == status.OK
    assert stages.patches["n_patches"] == 1
    assert group["coords"][:].tolist() == [[0, 0]]
    assert group["image"].shape == (256, 256, 3)
    assert np.array_equal(patch[:16, :16], expected)
    assert patch[16:].min() == 255
    assert patch[:, 16:].min() == 255
    assert stages.plan()["n_shards"] == 1


@pytest.mark.parametrize("slide_fixture", ["blank_slide", "pale_slide"])
def test_no_tissue_valid_store(request, front_stages, slide_fixture):
    """A slide without tissue gets a valid store with zero patches and a one-shard plan."""
    slide = request.getfixturevalue(slide_fixture)
    stages = front_stages(slide.path, "empty")
    group = _open(stages.patches_zarr)
    plan = stages.plan()
    assert group.attrs["status"] == status.NO_TISSUE
    assert group.attrs["n_patches"] == 0
    assert group["coords"].shape == (0, 2)
    assert group["grid"].shape == (0, 2)
    assert group["image"].shape == (0, 0, 3)
    assert plan["status"] == status.NO_TISSUE
    assert plan["n_shards"] == 1
    assert plan["shards"][0]["n_patches"] == 0


def test_unreadable_valid_store(front_stages, tmp_path):
    """An unreadable slide gets a valid empty store carrying its status and message."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    stages = front_stages(path, "photo")
    group = _open(stages.patches_zarr)
    assert group.attrs["status"] == status.UNREADABLE
    assert "JPEG" in group.attrs["message"]
    assert group.attrs["n_patches"] == 0
    assert stages.plan()["status"] == status.UNREADABLE


def test_no_mpp_patches_at_level0(front_stages, no_mpp_slide):
    """A slide without MPP is still cut into patches at level 0, MPP null."""
    stages = front_stages(no_mpp_slide.path, "nompp", patches_options={"target_mpp_um": 1.0})
    attrs = stages.patches
    assert attrs["status"] == status.NO_MPP
    assert attrs["n_patches"] > 0
    assert attrs["level"] == 0
    assert attrs["mpp_x"] is None
    assert "target MPP 1 µm/px ignored" in attrs["message"]


def test_damaged_tiles_unreadable(front_stages, tmp_path):
    """Tiles that fail to decode during extraction give unreadable and an empty store."""
    slide = synthetic.disc_slide(tmp_path / "damaged.tiff", compression="deflate")
    stages = front_stages(slide.path, "damaged", until="tissue")
    disc = slide.discs[0]
    with tifffile.TiffFile(slide.path) as tiff:
        page = tiff.pages[0]
        tiles_across = math.ceil(page.imagewidth / page.tilewidth)
        index = int(disc.y_px // page.tilelength) * tiles_across + int(disc.x_px // page.tilewidth)
        offset = page.dataoffsets[index]
    with open(slide.path, "r+b") as stream:  # the shared bytes of every level-0 tissue tile
        stream.seek(offset)
        stream.write(b"\x00" * 32)
    attrs = run_patches(stages.slide_json, stages.tissue_json, stages.mask_png,
                        stages.patches_zarr, stages.shards_json, workers=2)
    assert attrs["status"] == status.UNREADABLE
    assert "damaged or truncated" in attrs["message"]
    assert _open(stages.patches_zarr).attrs["n_patches"] == 0


# --- analysis resolution ---------------------------------------------------------------


def test_target_mpp_uses_matching_level(front_stages, odd_pyramid_slide):
    """A target MPP near a level's uses that level and its reported downsample."""
    stages = front_stages(odd_pyramid_slide.path, "odd", patches_options={"target_mpp_um": 2.0})
    attrs = stages.patches
    reported = stages.slide["level_downsamples"][1]
    assert attrs["level"] == 1
    assert attrs["analysis_downsample"] == reported
    assert attrs["mpp_x"] == pytest.approx(0.5 * reported)
    coords = _open(stages.patches_zarr)["coords"][:]
    grid = _open(stages.patches_zarr)["grid"][:]
    assert np.array_equal(coords[:, 0], np.rint(grid[:, 1] * 128 * reported).astype(np.int64))


@pytest.mark.parametrize("target_mpp_um", [2.0, 1.0, 1.3])
def test_target_mpp_aligned(front_stages, odd_pyramid_slide, target_mpp_um):
    """Disc centres in the analysis image map back to level 0 within one analysis pixel."""
    stages = front_stages(
        odd_pyramid_slide.path, "odd", patches_options={"target_mpp_um": target_mpp_um}
    )
    group = _open(stages.patches_zarr)
    downsample = group.attrs["analysis_downsample"]
    image = group["image"][:]
    # The discs lie left and right of the slide's vertical midline.
    half = round(odd_pyramid_slide.width_px / 2 / downsample)
    for disc, offset in zip(odd_pyramid_slide.discs, (0, half)):
        x, y = _tissue_centroid(image[:, offset : offset + half])
        assert abs((x + offset + 0.5) * downsample - disc.x_px) < downsample
        assert abs((y + 0.5) * downsample - disc.y_px) < downsample


def test_target_mpp_resampled_area(front_stages, odd_pyramid_slide):
    """Resampling to 1.3 µm/px keeps the disc area (in level-0 px) within 1 %."""
    stages = front_stages(odd_pyramid_slide.path, "odd", patches_options={"target_mpp_um": 1.3})
    group = _open(stages.patches_zarr)
    downsample = group.attrs["analysis_downsample"]
    image = group["image"][:]
    tissue_px = np.count_nonzero(image.min(axis=-1) < 230)
    assert group.attrs["level"] == 0
    assert downsample == pytest.approx(2.6)
    assert tissue_px * downsample**2 == pytest.approx(odd_pyramid_slide.tissue_area_px_level0, rel=0.01)


def test_target_mpp_upsampled(front_stages, tmp_path):
    """A target MPP finer than level 0 enlarges the image and keeps the discs in place."""
    slide = synthetic.disc_slide(tmp_path / "small.tiff", width_px=2048, height_px=1024,
                                 radius_px=200.0, level_downsamples=(1.0, 4.0))
    stages = front_stages(slide.path, "small", patches_options={"target_mpp_um": 0.25})
    group = _open(stages.patches_zarr)
    image = group["image"][:]
    half = 2048
    assert group.attrs["analysis_downsample"] == 0.5
    assert group.attrs["mpp_x"] == pytest.approx(0.25)
    for disc, offset in zip(slide.discs, (0, half)):
        x, y = _tissue_centroid(image[:, offset : offset + half])
        assert abs((x + offset + 0.5) * 0.5 - disc.x_px) < 0.5
        assert abs((y + 0.5) * 0.5 - disc.y_px) < 0.5


def test_choose_analysis_level_cases():
    """Levels within 1 % are used as they are; otherwise the next finer level."""
    downsamples = [1.0, 4.000152, 16.0029]
    assert choose_analysis_level(downsamples, 4.0) == (1, 4.000152)
    assert choose_analysis_level(downsamples, 1.0) == (0, 1.0)
    assert choose_analysis_level(downsamples, 2.0) == (0, 2.0)
    assert choose_analysis_level(downsamples, 10.0) == (1, 10.0)
    assert choose_analysis_level(downsamples, 64.0) == (2, 64.0)
    assert choose_analysis_level(downsamples, 0.5) == (0, 0.5)


# --- grid and selection ----------------------------------------------------------------


def test_grid_shape_cases():
    """The grid covers the slide with at least one patch per axis."""
    assert grid_shape(2220, 2967, 1.0, 256, 128) == (23, 17)
    assert grid_shape(16, 16, 1.0, 256, 128) == (1, 1)
    assert grid_shape(256, 256, 1.0, 256, 128) == (1, 1)
    assert grid_shape(257, 384, 1.0, 256, 128) == (2, 2)
    assert grid_shape(1024, 1024, 4.0, 256, 128) == (1, 1)


def test_tissue_fractions_exact():
    """Fractions come from the mask with fractional window edges."""
    mask = np.zeros((4, 8), bool)
    mask[:, :2] = True  # left quarter is tissue
    # Mask px = 64 level-0 px; windows 128 px every 64 px: 2 mask px wide, 1 apart.
    fractions = tissue_fractions(mask, 64.0, 64.0, 3, 7, patch_size_px=128, stride_px=64,
                                 analysis_downsample=1.0)
    assert fractions[0, 0] == pytest.approx(1.0)
    assert fractions[0, 1] == pytest.approx(0.5)
    assert fractions[0, 2] == pytest.approx(0.0)
    assert fractions[1, 1] == pytest.approx(0.5)


def test_tissue_fractions_subpixel():
    """A window covering half a mask pixel gets half its tissue."""
    mask = np.zeros((2, 2), bool)
    mask[0, 0] = True
    fractions = tissue_fractions(mask, 100.0, 100.0, 2, 2, patch_size_px=100, stride_px=50,
                                 analysis_downsample=1.0)
    assert fractions[0, 0] == pytest.approx(1.0)
    assert fractions[0, 1] == pytest.approx(0.5)
    assert fractions[1, 1] == pytest.approx(0.25)


def test_tissue_fractions_overhang():
    """A window overhanging the slide is judged by its part on the slide."""
    mask = np.ones((1, 1), bool)
    fractions = tissue_fractions(mask, 16.0, 16.0, 1, 1, patch_size_px=256, stride_px=128,
                                 analysis_downsample=1.0)
    assert fractions[0, 0] == pytest.approx(1.0)


def test_chunks_under_patches_spans():
    """A patch straddling chunk borders marks every chunk it touches."""
    needed = chunks_under_patches(np.array([0, 7]), np.array([7, 0]), patch_size_px=256,
                                  stride_px=128, chunk_px=1024, chunk_grid=(2, 2))
    # Patch (0, 7) spans x 896-1151: chunks (0, 0) and (0, 1). Patch (7, 0): y 896-1151.
    assert needed.tolist() == [[True, True], [True, False]]


def test_min_tissue_fraction_filters(front_stages, disc_slide):
    """A higher min_tissue_fraction keeps fewer patches, all within the lower set."""
    low = front_stages(disc_slide.path, "low", patches_options={"min_tissue_fraction": 0.0})
    high = front_stages(disc_slide.path, "high", patches_options={"min_tissue_fraction": 0.9})
    low_coords = {tuple(c) for c in _open(low.patches_zarr)["coords"][:].tolist()}
    high_coords = {tuple(c) for c in _open(high.patches_zarr)["coords"][:].tolist()}
    assert 0 < len(high_coords) < len(low_coords)
    assert high_coords <= low_coords


@pytest.mark.parametrize(
    "options",
    [{"patch_size_px": 0}, {"stride_px": -1}, {"workers": 0}, {"min_tissue_fraction": 1.5},
     {"target_mpp_um": 0.0}, {"chunk_px": 2.5}],
)
def test_invalid_options(front_stages, cmu_slide, options):
    """Invalid options raise ConfigError naming the option."""
    with pytest.raises(ConfigError, match=next(iter(options))):
        front_stages(cmu_slide, "cmu", patches_options=options)


def test_extraction_memory_bounded(huge_slide_measured):
    """Extracting from a 20,000 px slide needs far less memory than the image's size."""
    # The analysis image is 20,096 px square, 1.2 GB as RGB. Extraction keeps a few chunks.
    image = _open(huge_slide_measured["folder"] / "patches.zarr")["image"]
    assert image.shape == (20_096, 20_096, 3)
    assert huge_slide_measured["patches"]["n_patches"] > 1000
    assert huge_slide_measured["patches_peak_mib"] < 600
