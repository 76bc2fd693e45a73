"""The inspect stage: opening slides, metadata, MPP and unreadable files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from wsiseg import status, synthetic
from wsiseg.errors import ConfigError, SlideReadError
from wsiseg.slide import (
    bounds_from_properties,
    composite_image_on_white,
    composite_on_white,
    open_slide,
    resolve_mpp,
    run_inspect,
)


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _corrupt_tile(path: Path, level: int, tile_index: int) -> None:
    """Overwrite the start of one stored tile (and so of every tile sharing its bytes)."""
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[level]
        offset = page.dataoffsets[tile_index]
        count = page.databytecounts[tile_index]
    with open(path, "r+b") as stream:
        stream.seek(offset + 2)
        stream.write(b"\x00" * min(64, count - 2))


# --- real slides -----------------------------------------------------------------------


def test_inspect_cmu_metadata(tmp_path, cmu_slide):
    """The CMU slide's metadata is recorded as OpenSlide reports it."""
    out = tmp_path / "slide.json"
    record = run_inspect(cmu_slide, "cmu", out)
    assert json.loads(out.read_text()) == record
    assert record["status"] == status.OK
    assert record["message"] == ""
    assert record["vendor"] == "aperio"
    assert (record["width"], record["height"]) == (2220, 2967)
    assert record["level_count"] == 1
    assert record["level_dimensions"] == [[2220, 2967]]
    assert record["level_downsamples"] == [1.0]
    assert record["mpp_x"] == pytest.approx(0.499)
    assert record["mpp_y"] == pytest.approx(0.499)
    assert record["mpp_source"] == "metadata"
    assert record["objective_power"] == 20.0
    assert (record["bounds_x"], record["bounds_y"]) == (0, 0)
    assert (record["bounds_width"], record["bounds_height"]) == (2220, 2967)
    assert record["content_sha256"] == _sha256(cmu_slide)
    assert record["file_size_bytes"] == cmu_slide.stat().st_size
    assert record["wsiseg_version"]


def test_inspect_record_keys(tmp_path, cmu_slide, data_dir):
    """Readable and unreadable slides give slide.json the same keys."""
    readable = run_inspect(cmu_slide, "cmu", tmp_path / "a.json")
    unreadable = run_inspect(data_dir / "missing.svs", "missing", tmp_path / "b.json")
    assert set(readable) == set(unreadable)


@pytest.mark.parametrize("name", ["directory", "file"])
def test_inspect_dicom(tmp_path, dicom_dir, name):
    """A DICOM WSI opens from its folder or from one of its files."""
    path = dicom_dir if name == "directory" else dicom_dir / "boxes_1.dcm"
    record = run_inspect(path, "dicom", tmp_path / "slide.json")
    assert record["status"] == status.OK
    assert record["vendor"] == "dicom"
    assert (record["width"], record["height"]) == (16, 16)
    assert record["mpp_x"] == pytest.approx(0.499)


def test_inspect_dicom_folder_hash(tmp_path, dicom_dir):
    """A DICOM folder's hash covers its files in name order."""
    record = run_inspect(dicom_dir, "dicom", tmp_path / "slide.json")
    files = sorted(dicom_dir.iterdir())
    assert record["content_sha256"] == _sha256(*files)
    assert record["file_size_bytes"] == sum(path.stat().st_size for path in files)


def test_inspect_absurd_mpp_rejected(tmp_path, boxes_tiff):
    """352.8 µm/px from centimetre resolution tags is rejected: status no_mpp."""
    record = run_inspect(boxes_tiff, "boxes", tmp_path / "slide.json")
    assert record["status"] == status.NO_MPP
    assert record["mpp_x"] is None
    assert record["mpp_source"] == "missing"
    assert "352.778" in record["message"]
    assert "outside the plausible range" in record["message"]


def test_inspect_real_downsamples(tmp_path, boxes_tiff):
    """Level downsamples are recorded unrounded."""
    record = run_inspect(boxes_tiff, "boxes", tmp_path / "slide.json")
    with openslide.OpenSlide(boxes_tiff) as slide:
        expected = list(slide.level_downsamples)
    assert record["level_downsamples"] == expected
    assert record["level_downsamples"][2] == pytest.approx(4.016129032258064)


# --- unreadable inputs -----------------------------------------------------------------


def _truncated_svs(folder: Path, source: Path) -> Path:
    path = folder / "truncated.svs"
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_svs(folder: Path, source: Path) -> Path:
    path = folder / "random.svs"
    path.write_bytes(np.random.default_rng(0).bytes(100_000))
    return path


def _plain_png(folder: Path, source: Path) -> Path:
    path = folder / "plain.png"
    Image.new("RGB", (300, 200), (200, 110, 165)).save(path)
    return path


def _plain_jpeg(folder: Path, source: Path) -> Path:
    path = folder / "plain.jpg"
    Image.new("RGB", (300, 200), (200, 110, 165)).save(path)
    return path


def _strip_tiff(folder: Path, source: Path) -> Path:
    path = folder / "strips.tif"
    tifffile.imwrite(path, np.full((300, 300, 3), 200, np.uint8), photometric="rgb")
    return path


def _missing(folder: Path, source: Path) -> Path:
    return folder / "does-not-exist.svs"


def _empty_directory(folder: Path, source: Path) -> Path:
    path = folder / "empty-folder"
    path.mkdir()
    return path


def _empty_file(folder: Path, source: Path) -> Path:
    path = folder / "empty.svs"
    path.write_bytes(b"")
    return path


UNREADABLE_CASES = {
    "truncated": (_truncated_svs, "truncated TIFF"),
    "random_bytes": (_random_svs, "match no slide format"),
    "plain_png": (_plain_png, "plain PNG image"),
    "plain_jpeg": (_plain_jpeg, "plain JPEG image"),
    "strip_tiff": (_strip_tiff, "stored in strips"),
    "missing": (_missing, "not found"),
    "directory": (_empty_directory, "directory without DICOM files"),
    "empty_file": (_empty_file, "empty (0 bytes)"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_CASES))
def test_inspect_unreadable(tmp_path, cmu_slide, case):
    """Files OpenSlide cannot read get status unreadable and the reason."""
    make, reason = UNREADABLE_CASES[case]
    path = make(tmp_path, cmu_slide)
    out = tmp_path / "slide.json"
    record = run_inspect(path, "bad", out)
    assert json.loads(out.read_text())["status"] == status.UNREADABLE
    assert record["status"] == status.UNREADABLE
    assert reason in record["message"]
    assert record["width"] is None
    assert record["mpp_x"] is None


def test_open_slide_error_names_file(tmp_path, cmu_slide):
    """open_slide raises SlideReadError naming the slide id, the file and a fix."""
    path = _plain_png(tmp_path, cmu_slide)
    with pytest.raises(SlideReadError) as raised:
        open_slide(path, "photo")
    text = str(raised.value)
    assert text.startswith("slide photo: ")
    assert str(path) in text
    assert "vips tiffsave" in text


def test_inspect_damaged_tiles(tmp_path):
    """A slide that opens but whose tiles do not decode is unreadable."""
    slide = synthetic.disc_slide(tmp_path / "damaged.tiff", compression="deflate")
    _corrupt_tile(slide.path, level=0, tile_index=0)  # every background tile shares these bytes
    record = run_inspect(slide.path, "damaged", tmp_path / "slide.json")
    assert record["status"] == status.UNREADABLE
    assert "damaged or truncated" in record["message"]


# --- MPP -------------------------------------------------------------------------------


def test_inspect_no_mpp(tmp_path, no_mpp_slide):
    """A TIFF without resolution tags has status no_mpp and a message with the fix."""
    record = run_inspect(no_mpp_slide.path, "nompp", tmp_path / "slide.json")
    assert record["status"] == status.NO_MPP
    assert record["mpp_x"] is None
    assert record["mpp_y"] is None
    assert record["mpp_source"] == "missing"
    assert "sample sheet" in record["message"]


@pytest.mark.parametrize("source", ["sample_sheet", "config"])
def test_inspect_override_no_mpp(tmp_path, no_mpp_slide, source):
    """An MPP override makes a slide without MPP ok and records its source."""
    record = run_inspect(no_mpp_slide.path, "nompp", tmp_path / "slide.json", mpp=0.25,
                         mpp_source=source)
    assert record["status"] == status.OK
    assert record["mpp_x"] == 0.25
    assert record["mpp_y"] == 0.25
    assert record["mpp_source"] == source


def test_inspect_override_wins(tmp_path, cmu_slide):
    """An MPP override wins over the slide's own metadata."""
    record = run_inspect(cmu_slide, "cmu", tmp_path / "slide.json", mpp=0.25)
    assert record["mpp_x"] == 0.25
    assert record["mpp_source"] == "sample_sheet"


def test_inspect_default_mpp_fallback(tmp_path, no_mpp_slide):
    """The config's default MPP fills in for a slide without one, source config."""
    record = run_inspect(no_mpp_slide.path, "nompp", tmp_path / "slide.json", default_mpp_um=0.3)
    assert record["status"] == status.OK
    assert record["mpp_x"] == 0.3
    assert record["mpp_source"] == "config"
    assert "default MPP" in record["message"]


def test_inspect_default_mpp_not_over_metadata(tmp_path, cmu_slide):
    """The config's default MPP does not replace the slide's own MPP."""
    record = run_inspect(cmu_slide, "cmu", tmp_path / "slide.json", default_mpp_um=0.3)
    assert record["mpp_x"] == pytest.approx(0.499)
    assert record["mpp_source"] == "metadata"


def test_inspect_default_mpp_over_rejected(tmp_path, boxes_tiff):
    """The config's default MPP replaces an implausible one and the message names both."""
    record = run_inspect(boxes_tiff, "boxes", tmp_path / "slide.json", default_mpp_um=0.3)
    assert record["status"] == status.OK
    assert record["mpp_x"] == 0.3
    assert "352.778" in record["message"]


@pytest.mark.parametrize("value", [0.01, 250.0, float("nan"), "abc"])
def test_inspect_override_implausible(tmp_path, cmu_slide, value):
    """An implausible or non-numeric override raises ConfigError naming the slide."""
    with pytest.raises(ConfigError, match="slide cmu: mpp"):
        run_inspect(cmu_slide, "cmu", tmp_path / "slide.json", mpp=value)


@pytest.mark.parametrize("unit", ["centimeter", "inch"])
def test_inspect_resolution_units(tmp_path, unit):
    """MPP from resolution tags in centimetres or inches reads 0.25 µm/px."""
    slide = synthetic.disc_slide(tmp_path / "res.tiff", mpp_um=0.25, resolution_unit=unit,
                                 level_downsamples=(1.0,))
    record = run_inspect(slide.path, "res", tmp_path / "slide.json")
    assert record["status"] == status.OK
    assert record["mpp_x"] == pytest.approx(0.25, rel=1e-6)
    assert record["mpp_source"] == "tiff_resolution"


def test_inspect_tiny_mpp_rejected(tmp_path):
    """0.01 µm/px from the resolution tags is below the plausible range and not used."""
    slide = synthetic.disc_slide(tmp_path / "tiny-mpp.tiff", mpp_um=0.01, level_downsamples=(1.0,))
    record = run_inspect(slide.path, "tinympp", tmp_path / "slide.json")
    assert record["status"] == status.NO_MPP
    assert "0.01" in record["message"]


def test_inspect_non_integer_downsamples(tmp_path, odd_pyramid_slide):
    """A pyramid with non-integer downsamples keeps OpenSlide's exact values."""
    record = run_inspect(odd_pyramid_slide.path, "odd", tmp_path / "slide.json")
    with openslide.OpenSlide(odd_pyramid_slide.path) as slide:
        expected = [float(value) for value in slide.level_downsamples]
    assert record["level_downsamples"] == expected
    assert record["level_downsamples"][1] != 4.0


def test_resolve_mpp_centimetre_tags():
    """Without openslide.mpp-x, centimetre tags give 10,000 / resolution µm/px."""
    mpp = resolve_mpp({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000",
                       "tiff.YResolution": "20000"})
    assert mpp.mpp_x == pytest.approx(0.25)
    assert mpp.mpp_y == pytest.approx(0.5)
    assert mpp.source == "tiff_resolution"


def test_resolve_mpp_inch_tags():
    """Without openslide.mpp-x, inch tags give 25,400 / resolution µm/px."""
    mpp = resolve_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "50800",
                       "tiff.YResolution": "50800"})
    assert mpp.mpp_x == pytest.approx(0.5)
    assert mpp.source == "tiff_resolution"


def test_resolve_mpp_default_dpi_rejected():
    """The 72 dpi default of many programs (352.8 µm/px) is rejected."""
    mpp = resolve_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72",
                       "tiff.YResolution": "72"})
    assert mpp.mpp_x is None
    assert mpp.source == "missing"
    assert "352.778" in mpp.message


def test_resolve_mpp_falls_back_to_tags():
    """An implausible vendor MPP is skipped for plausible resolution tags, and named."""
    mpp = resolve_mpp({"openslide.mpp-x": "0", "openslide.mpp-y": "0",
                       "tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "20000",
                       "tiff.YResolution": "20000"})
    assert mpp.mpp_x == pytest.approx(0.5)
    assert mpp.source == "tiff_resolution"
    assert "openslide.mpp-x/-y" in mpp.message


def test_resolve_mpp_metadata_source():
    """A vendor MPP that differs from the resolution tags has source metadata."""
    mpp = resolve_mpp({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527",
                       "tiff.ResolutionUnit": "inch", "tiff.XResolution": "72",
                       "tiff.YResolution": "72"})
    assert mpp.mpp_x == pytest.approx(0.2527)
    assert mpp.source == "metadata"
    assert mpp.message == ""


def test_resolve_mpp_unitless_tags_ignored():
    """Resolution tags without a length unit give no MPP."""
    mpp = resolve_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1",
                       "tiff.YResolution": "1"})
    assert mpp.mpp_x is None
    assert "contains no MPP" in mpp.message


# --- bounds and pixels -----------------------------------------------------------------


def test_bounds_from_properties():
    """openslide.bounds-* are recorded in level-0 px."""
    bounds = bounds_from_properties(
        {"openslide.bounds-x": "1234", "openslide.bounds-y": "567",
         "openslide.bounds-width": "8000", "openslide.bounds-height": "6000"},
        20_000, 15_000,
    )
    assert bounds == {"bounds_x": 1234, "bounds_y": 567, "bounds_width": 8000,
                      "bounds_height": 6000}


def test_bounds_absent_full_slide():
    """Without bounds properties the bounds are the whole slide."""
    bounds = bounds_from_properties({}, 2220, 2967)
    assert bounds == {"bounds_x": 0, "bounds_y": 0, "bounds_width": 2220, "bounds_height": 2967}


def test_composite_on_white():
    """Transparent pixels become white, opaque ones keep their colour, others blend."""
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    rgb = composite_on_white(rgba)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [10, 20, 30]
    assert rgb[0, 2].tolist() == [127, 127, 127]


def test_composite_image_matches_array():
    """The Pillow and numpy composites give the same pixels."""
    rgba = np.random.default_rng(3).integers(0, 256, size=(40, 50, 4), dtype=np.uint8)
    from_image = np.asarray(composite_image_on_white(Image.fromarray(rgba)))
    assert np.array_equal(from_image, composite_on_white(rgba))


def test_read_beyond_slide_white(cmu_slide):
    """A region past the slide's edge reads white after compositing."""
    with openslide.OpenSlide(cmu_slide) as slide:
        rgba = np.asarray(slide.read_region((2200, 2950), 0, (64, 64)))
    rgb = composite_on_white(rgba)
    assert rgb[30:, 30:].min() == 255
