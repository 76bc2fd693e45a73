"""The tissue stage: thumbnails, Otsu on saturation with its guards, and morphology."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsiseg import status, synthetic
from wsiseg.tissue import (
    MorphologySizes,
    choose_level,
    detect_tissue,
    morphology_sizes,
    read_thumbnail,
    run_tissue,
    thumbnail_size,
)


def _mask(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image) > 0


# --- areas with known values ------------------------------------------------------------


@pytest.mark.parametrize("slide_fixture", ["disc_slide", "odd_pyramid_slide"])
def test_tissue_disc_area(request, front_stages, slide_fixture):
    """Tissue area of the disc slides is within 2 % of the analytic area."""
    slide = request.getfixturevalue(slide_fixture)
    stages = front_stages(slide.path, "discs", until="tissue")
    assert stages.tissue["status"] == status.OK
    assert stages.tissue["tissue_area_mm2"] == pytest.approx(slide.tissue_area_mm2, rel=0.02)
    assert stages.tissue["tissue_area_px_level0"] == pytest.approx(
        slide.tissue_area_px_level0, rel=0.02
    )


def test_tissue_black_band_guard(front_stages, tmp_path):
    """A noisy black band beside the tissue is neither tissue nor a pull on Otsu."""
    slide = synthetic.disc_slide(tmp_path / "band.tiff", black_band_px=700, radius_px=500.0)
    stages = front_stages(slide.path, "band", until="tissue")
    assert stages.tissue["tissue_area_mm2"] == pytest.approx(slide.tissue_area_mm2, rel=0.02)


def test_tissue_no_mpp_relative_kernels(front_stages, no_mpp_slide):
    """Without MPP, kernels are relative to the thumbnail and areas stay in pixels."""
    stages = front_stages(no_mpp_slide.path, "nompp", until="tissue")
    tissue = stages.tissue
    assert tissue["status"] == status.NO_MPP
    assert tissue["tissue_area_mm2"] is None
    assert tissue["mask_mpp_x"] is None
    assert tissue["tissue_area_px_level0"] == pytest.approx(
        no_mpp_slide.tissue_area_px_level0, rel=0.02
    )
    assert "sample sheet" in tissue["message"]


def test_tissue_mask_downsample(front_stages, odd_pyramid_slide):
    """The mask covers the slide exactly: size times downsample is the level-0 size."""
    stages = front_stages(odd_pyramid_slide.path, "odd", until="tissue")
    tissue = stages.tissue
    mask = _mask(stages.mask_png)
    assert mask.shape == (tissue["mask_height"], tissue["mask_width"])
    assert tissue["mask_width"] * tissue["mask_downsample_x"] == pytest.approx(8191)
    assert tissue["mask_height"] * tissue["mask_downsample_y"] == pytest.approx(6143)
    assert int(mask.sum()) == tissue["tissue_pixels"]


def test_tissue_cmu_regions(front_stages, cmu_slide):
    """On the CMU slide the tissue stalk is found and the empty right margin is not."""
    stages = front_stages(cmu_slide, "cmu", until="tissue")
    mask = _mask(stages.mask_png)
    height, width = mask.shape
    fraction = mask.mean()
    assert stages.tissue["status"] == status.OK
    assert 0.2 < fraction < 0.45
    # Glass only: x 88-98 %, y 5-25 % of the slide.
    assert not mask[int(0.05 * height) : int(0.25 * height), int(0.88 * width) : int(0.98 * width)].any()
    # Inside the stalk: x 45-50 %, y 55-65 %.
    assert mask[int(0.55 * height) : int(0.65 * height), int(0.45 * width) : int(0.50 * width)].all()


# --- slides without tissue -------------------------------------------------------------


@pytest.mark.parametrize("slide_fixture", ["blank_slide", "pale_slide"])
def test_tissue_none_found(request, front_stages, slide_fixture):
    """Blank and very pale slides give no_tissue, zero area and valid images."""
    slide = request.getfixturevalue(slide_fixture)
    stages = front_stages(slide.path, "empty", until="tissue")
    tissue = stages.tissue
    assert tissue["status"] == status.NO_TISSUE
    assert tissue["tissue_pixels"] == 0
    assert tissue["tissue_area_mm2"] == 0.0
    assert "no tissue found" in tissue["message"]
    assert not _mask(stages.mask_png).any()
    with Image.open(stages.thumbnail_png) as thumbnail:
        assert thumbnail.size == (tissue["mask_width"], tissue["mask_height"])


def test_tissue_tiny_taken_whole(front_stages, tiny_slide):
    """A slide smaller than 256 px on each side is taken whole as tissue."""
    stages = front_stages(tiny_slide, "tiny", until="tissue")
    tissue = stages.tissue
    assert tissue["status"] == status.OK
    assert tissue["tissue_pixels"] == 256
    assert tissue["tissue_area_px_level0"] == pytest.approx(256.0)
    assert "taken whole" in tissue["message"]


def test_tissue_unreadable_carried(front_stages, tmp_path):
    """An unreadable slide keeps its status and gets a 1 x 1 empty mask."""
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "white").save(path)
    stages = front_stages(path, "photo", until="tissue")
    assert stages.tissue["status"] == status.UNREADABLE
    assert "plain PNG" in stages.tissue["message"]
    assert _mask(stages.mask_png).shape == (1, 1)
    assert json.loads(stages.tissue_json.read_text())["tissue_pixels"] == 0


def test_tissue_damaged_after_inspect(front_stages, tmp_path):
    """Tiles that fail to decode while the thumbnail is read give status unreadable."""
    slide = synthetic.disc_slide(tmp_path / "damaged.tiff", compression="deflate")
    stages = front_stages(slide.path, "damaged", until="inspect")
    with tifffile.TiffFile(slide.path) as tiff:
        offsets = [page.dataoffsets[0] for page in tiff.pages]
    with open(slide.path, "r+b") as stream:
        for offset in offsets:  # every level's background tiles share these bytes
            stream.seek(offset)
            stream.write(b"\x00" * 32)
    result = run_tissue(stages.slide_json, stages.mask_png, stages.thumbnail_png, stages.tissue_json)
    assert result["status"] == status.UNREADABLE
    assert "damaged or truncated" in result["message"]


# --- thumbnail -------------------------------------------------------------------------


def test_thumbnail_blocks_match_whole(cmu_slide):
    """A level-0 thumbnail built from small blocks equals one read whole (within 1)."""
    whole, whole_opaque, level = read_thumbnail(cmu_slide, "cmu", 383, 512, block_px=100_000, workers=1)
    blocks, blocks_opaque, _ = read_thumbnail(cmu_slide, "cmu", 383, 512, block_px=300, workers=2)
    assert level == 0
    assert np.abs(whole.astype(int) - blocks).max() <= 1
    assert np.array_equal(whole_opaque, blocks_opaque)


def test_thumbnail_blocks_fractional_level(odd_pyramid_slide):
    """At a level with a non-integer downsample, blocks differ from a whole read by <= 4.

    OpenSlide interpolates regions that start between level pixels, which blurs edges
    slightly differently for each block.
    """
    path = odd_pyramid_slide.path
    whole, _, level = read_thumbnail(path, "odd", 700, 525, block_px=100_000, workers=1)
    blocks, _, _ = read_thumbnail(path, "odd", 700, 525, block_px=300, workers=2)
    difference = np.abs(whole.astype(int) - blocks)
    assert level == 1
    assert difference.max() <= 4
    assert difference.mean() < 0.05


def test_thumbnail_size_cases():
    """Thumbnail sizes follow the target MPP, the bounds and level 0."""
    assert thumbnail_size(100_000, 50_000, 0.25, 8.0, 512, 4096) == (3125, 1562)
    assert thumbnail_size(200_000, 100_000, 0.25, 8.0, 512, 4096) == (4096, 2048)
    assert thumbnail_size(2220, 2967, 0.499, 8.0, 512, 4096) == (383, 512)
    assert thumbnail_size(16, 16, 0.499, 8.0, 512, 4096) == (16, 16)
    assert thumbnail_size(60_000, 30_000, None, 8.0, 512, 4096, 2048) == (2048, 1024)
    assert thumbnail_size(1000, 500, None, 8.0, 512, 4096, 2048) == (1000, 500)


def test_choose_level_tolerance():
    """A level up to 1 % coarser than requested is chosen."""
    downsamples = [1.0, 4.000152, 16.0029, 64.02]
    assert choose_level(downsamples, 16.0) == 2
    assert choose_level(downsamples, 15.0) == 1
    assert choose_level(downsamples, 0.5) == 0
    assert choose_level(downsamples, 1000.0) == 3


def test_huge_single_level_memory(huge_slide, huge_slide_measured):
    """The thumbnail of a 20,000 px single-level TIFF is built in bounded memory."""
    # The whole level as RGBA would take 1.6 GB; reading block by block needs a few blocks.
    tissue = huge_slide_measured["tissue"]
    assert tissue["level"] == 0
    assert tissue["tissue_area_mm2"] == pytest.approx(huge_slide.tissue_area_mm2, rel=0.02)
    assert huge_slide_measured["tissue_peak_mib"] < 600


# --- detection on arrays ---------------------------------------------------------------


def test_detect_near_black_excluded():
    """Near-black noisy pixels are never tissue even though they are saturated."""
    rng = np.random.default_rng(1)
    rgb = np.full((100, 100, 3), 245, np.uint8)
    rgb[:, :30] = rng.integers(0, 30, size=(100, 30, 3))
    rgb[40:60, 50:70] = synthetic.TISSUE_RGB
    opaque = np.ones((100, 100), bool)
    mask, _, _ = detect_tissue(rgb, opaque, MorphologySizes(0, 0, 0))
    assert mask.sum() == 400
    assert not mask[:, :30].any()


def test_detect_transparent_excluded():
    """Transparent padding is left out of the histogram and the mask."""
    rgb = np.full((50, 50, 3), 255, np.uint8)
    rgb[10:20, 10:20] = synthetic.TISSUE_RGB
    opaque = np.ones((50, 50), bool)
    opaque[:, 40:] = False
    rgb[:, 40:] = synthetic.TISSUE_RGB  # tissue-coloured but not from the slide
    mask, _, _ = detect_tissue(rgb, opaque, MorphologySizes(0, 0, 0))
    assert mask.sum() == 100


def test_detect_saturation_floor():
    """Faint noise below the saturation floor is not tissue, however Otsu splits it."""
    rng = np.random.default_rng(2)
    rgb = (np.array(synthetic.PALE_RGB) + rng.integers(-3, 4, size=(80, 80, 3))).astype(np.uint8)
    mask, otsu, threshold = detect_tissue(rgb, np.ones((80, 80), bool), MorphologySizes(0, 0, 0))
    assert otsu is not None
    assert otsu < 0.07
    assert threshold == 0.07
    assert not mask.any()


def test_morphology_holes_and_specks():
    """Small holes are filled and small specks dropped; large ones stay."""
    rgb = np.full((120, 120, 3), 250, np.uint8)
    rgb[10:110, 10:110] = synthetic.TISSUE_RGB
    rgb[30:33, 30:33] = 250  # hole of 9 px: filled
    rgb[60:80, 60:80] = 250  # hole of 400 px: kept
    rgb[2:4, 114:116] = synthetic.TISSUE_RGB  # speck of 4 px: dropped
    opaque = np.ones((120, 120), bool)
    mask, _, _ = detect_tissue(rgb, opaque, MorphologySizes(0, 50, 20))
    assert mask[31, 31]
    assert not mask[70, 70]
    assert not mask[3, 115]
    assert mask.sum() == 100 * 100 - 400


def test_morphology_sizes_um_and_relative():
    """Sizes convert from µm with the thumbnail MPP, or from fractions without it."""
    with_mpp = morphology_sizes(
        1000, 500, 8.0, closing_um=16.0, min_tissue_area_um2=6400.0, max_hole_area_um2=640.0,
        closing_fraction=0.001, min_tissue_area_fraction=1e-4, max_hole_area_fraction=1e-5,
    )
    assert with_mpp == MorphologySizes(closing_radius_px=2, max_hole_area_px=10, min_tissue_area_px=100)
    relative = morphology_sizes(
        4000, 2000, None, closing_um=16.0, min_tissue_area_um2=6400.0, max_hole_area_um2=640.0,
        closing_fraction=0.001, min_tissue_area_fraction=1e-4, max_hole_area_fraction=1e-5,
    )
    assert relative == MorphologySizes(closing_radius_px=4, max_hole_area_px=80, min_tissue_area_px=800)


def test_morphology_sizes_capped_small_thumbnail():
    """On a tiny thumbnail the smallest object kept is at most 1 % of it."""
    sizes = morphology_sizes(
        16, 16, 0.5, closing_um=16.0, min_tissue_area_um2=10_000.0, max_hole_area_um2=0.0,
        closing_fraction=0.001, min_tissue_area_fraction=1e-4, max_hole_area_fraction=1e-5,
    )
    assert sizes.min_tissue_area_px == 3
    assert sizes.closing_radius_px == 2
