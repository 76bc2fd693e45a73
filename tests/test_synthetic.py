"""The synthetic slide generators, read back through OpenSlide."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from wsiseg import synthetic


def _level_rgb(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(path) as slide:
        region = slide.read_region((0, 0), level, slide.level_dimensions[level])
    return np.asarray(region)[..., :3]


def test_levels_reported_downsamples(odd_pyramid_slide):
    """OpenSlide reports the level sizes written and the non-integer downsamples they imply."""
    with openslide.OpenSlide(odd_pyramid_slide.path) as slide:
        assert slide.level_dimensions == odd_pyramid_slide.level_dimensions
        downsamples = slide.level_downsamples
    assert downsamples[1] != round(downsamples[1])
    assert downsamples[2] != round(downsamples[2])
    assert downsamples[1] == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("unit", ["centimeter", "inch"])
def test_resolution_unit_mpp(tmp_path, unit):
    """The MPP written in either resolution unit reads back as openslide.mpp-x."""
    slide = synthetic.disc_slide(
        tmp_path / f"{unit}.tiff", mpp_um=0.25, resolution_unit=unit, level_downsamples=(1.0,)
    )
    with openslide.OpenSlide(slide.path) as opened:
        properties = dict(opened.properties)
    assert properties["tiff.ResolutionUnit"] == unit
    assert float(properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
    assert float(properties["openslide.mpp-y"]) == pytest.approx(0.25, rel=1e-6)


def test_no_mpp_writes_no_resolution(no_mpp_slide):
    """mpp_um=None leaves OpenSlide without an MPP."""
    with openslide.OpenSlide(no_mpp_slide.path) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties


def test_disc_pixels(disc_slide):
    """Disc centres are tissue-coloured and the corners white, at level 0 and the top level."""
    disc = disc_slide.discs[0]
    with openslide.OpenSlide(disc_slide.path) as slide:
        centre = np.asarray(slide.read_region((int(disc.x_px), int(disc.y_px)), 0, (1, 1)))[0, 0, :3]
        corner = np.asarray(slide.read_region((0, 0), 0, (1, 1)))[0, 0, :3]
    assert np.abs(centre.astype(int) - synthetic.TISSUE_RGB).max() <= 3
    assert corner.tolist() == [255, 255, 255]
    top = _level_rgb(disc_slide.path, 2)
    scale = disc_slide.width_px / top.shape[1]
    top_centre = top[int(disc.y_px / scale), int(disc.x_px / scale)]
    assert np.abs(top_centre.astype(int) - synthetic.TISSUE_RGB).max() <= 3


def test_disc_area_at_level0(tmp_path):
    """Tissue pixels counted at level 0 match the analytic disc area within 0.5 %."""
    slide = synthetic.disc_slide(
        tmp_path / "lossless.tiff", width_px=2048, height_px=1024, radius_px=300.0,
        compression="deflate", level_downsamples=(1.0,),
    )
    rgb = _level_rgb(slide.path, 0)
    tissue_px = np.count_nonzero(np.all(rgb == synthetic.TISSUE_RGB, axis=-1))
    assert tissue_px == pytest.approx(slide.tissue_area_px_level0, rel=0.005)


def test_shared_tiles_small_file(tmp_path):
    """Repeated tiles share their bytes: a 20,000 px square slide stays under 2 MB."""
    slide = synthetic.huge_single_level_slide(tmp_path / "shared.tiff", width_px=20_000, height_px=20_000)
    with tifffile.TiffFile(slide.path) as tiff:
        page = tiff.pages[0]
        offsets = np.asarray(page.dataoffsets)
        tiles = len(offsets)
    assert slide.file_size_bytes < 2_000_000
    assert len(np.unique(offsets)) < tiles / 10


def test_pale_slide_colour(pale_slide):
    """The pale slide is pale pink with faint noise."""
    rgb = _level_rgb(pale_slide.path, 1).astype(int)
    mean = rgb.reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - synthetic.PALE_RGB).max() < 2
    assert rgb.std() > 0.5


def test_black_band_pixels(tmp_path):
    """The black band is near-black and stops at its width."""
    slide = synthetic.disc_slide(
        tmp_path / "band.tiff", black_band_px=500, radius_px=400.0, compression="deflate",
        level_downsamples=(1.0,),
    )
    rgb = _level_rgb(slide.path, 0)
    assert rgb[:, :500].max() <= 40
    assert rgb[:, 500:].min(axis=-1).max() == 255


def test_large_pyramid_fast(tmp_path):
    """The 100,000 px pyramid is written in seconds, stays small and is 30 % tissue."""
    started = time.perf_counter()
    slide = synthetic.large_pyramid_slide(tmp_path / "large.tiff")
    seconds = time.perf_counter() - started
    top = _level_rgb(slide.path, 3)
    tissue_fraction = np.mean(top.min(axis=-1) < 230)
    assert seconds < 60
    assert slide.file_size_bytes < 100e6
    assert tissue_fraction == pytest.approx(0.3, abs=0.01)
    assert slide.tissue_area_px_level0 / slide.width_px**2 == pytest.approx(0.3, rel=1e-9)


def test_huge_single_level(huge_slide):
    """The huge slide has one level of the requested size."""
    with openslide.OpenSlide(huge_slide.path) as slide:
        assert slide.level_count == 1
        assert slide.dimensions == (20_000, 20_000)


def test_disc_slide_rejects_large_radius(tmp_path):
    """Discs that would overlap or leave the slide are rejected."""
    with pytest.raises(ValueError, match="does not fit"):
        synthetic.disc_slide(tmp_path / "x.tiff", width_px=1000, height_px=1000, radius_px=400.0)


def test_write_slide_rejects_bad_levels(tmp_path):
    """Downsamples must start at 1 and increase."""
    with pytest.raises(ValueError, match="increase"):
        synthetic.write_slide(tmp_path / "x.tiff", width_px=512, height_px=512,
                              level_downsamples=(1.0, 4.0, 2.0))


def test_tissue_area_mm2(disc_slide):
    """The analytic area in mm² is pi r^2 per disc times the pixel area."""
    expected = 2 * math.pi * 600.0**2 * 0.5**2 / 1e6
    assert disc_slide.tissue_area_mm2 == pytest.approx(expected)
