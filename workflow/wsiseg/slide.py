"""Opening slides with OpenSlide and recording what each one is (the inspect stage).

``open_slide`` is the one place where wsiseg turns a path into an OpenSlide handle, so
every stage rejects the same files with the same message. ``run_inspect`` writes
slide.json: dimensions, the downsamples exactly as OpenSlide reports them, the MPP and
where it came from, the bounds offset and a content hash.

Plain images are not slides: wsiseg calls ``openslide.OpenSlide``, not
``openslide.open_slide``, so a PNG, a JPEG or a strip-organised TIFF is reported as
unreadable instead of passing through OpenSlide's ``ImageSlide`` fallback. That fallback
decodes the whole image into memory with Pillow, has no pyramid and no MPP, and in a
cohort such a file is almost always an exported thumbnail or label picture put there by
mistake. The message gives a command that converts such an image into a tiled TIFF.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
from PIL import Image

import wsiseg
from wsiseg import status
from wsiseg.atomic import write_json
from wsiseg.errors import ConfigError, SlideReadError

logger = logging.getLogger(__name__)

MPP_SOURCES = ("metadata", "tiff_resolution", "sample_sheet", "config", "missing")
OVERRIDE_SOURCES = ("sample_sheet", "config")

_UM_PER_UNIT = {"centimeter": 10_000.0, "inch": 25_400.0}
_HASH_BLOCK_BYTES = 4 << 20
_PROBE_PX = 512
_PROBE_FULL_LEVEL_MAX_PX = 4096 * 4096
_CONVERT_HINT = (
    "convert it to a tiled pyramidal TIFF with resolution tags, for example "
    "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`"
)


# --- opening ---------------------------------------------------------------------------


def open_slide(path: str | os.PathLike, slide_id: str) -> openslide.OpenSlide:
    """Open ``path`` with OpenSlide, or raise SlideReadError naming the file and a fix.

    ``path`` may be a slide file, one file of a DICOM WSI series, or a directory that
    contains one DICOM series (OpenSlide opens the series from any of its files). Plain
    PNG/JPEG images and strip TIFFs are rejected (see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        raise SlideReadError(
            f"slide file not found: {path}; check the path in the sample sheet", slide_id
        )
    target = _dicom_file_in(path, slide_id) if path.is_dir() else path

    try:
        return openslide.OpenSlide(target)
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideReadError(
            f"{path} is not a format OpenSlide reads: {_describe_unsupported(target)}",
            slide_id,
        ) from None
    except openslide.OpenSlideError as error:
        raise SlideReadError(
            f"OpenSlide failed to open {path}: {error}; the file is damaged or truncated, "
            "copy it again from the scanner or archive",
            slide_id,
        ) from error
    except OSError as error:
        raise SlideReadError(f"cannot read {path}: {error.strerror or error}", slide_id) from error


def _dicom_file_in(directory: Path, slide_id: str) -> Path:
    """Return the first DICOM file (by name) in ``directory``."""
    try:
        entries = sorted(entry for entry in directory.iterdir() if entry.is_file())
    except OSError as error:
        raise SlideReadError(
            f"cannot list directory {directory}: {error.strerror or error}", slide_id
        ) from error
    for entry in entries:
        if _is_dicom(entry):
            return entry
    raise SlideReadError(
        f"{directory} is a directory without DICOM files; give the slide file itself, "
        "or a directory that contains one DICOM WSI series",
        slide_id,
    )


def _is_dicom(path: Path) -> bool:
    # DICOM Part 10 files carry "DICM" after a 128-byte preamble.
    try:
        with open(path, "rb") as stream:
            header = stream.read(132)
    except OSError:
        return False
    return header[128:132] == b"DICM"


def _describe_unsupported(path: Path) -> str:
    """Say what the file looks like, so the message points at the right fix."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as stream:
            header = stream.read(132)
    except OSError as error:
        return f"cannot read it ({error.strerror or error})"

    if size == 0:
        return "the file is empty (0 bytes)"
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return f"it is a plain PNG image, not a whole-slide image; {_CONVERT_HINT}"
    if header.startswith(b"\xff\xd8\xff"):
        return f"it is a plain JPEG image, not a whole-slide image; {_CONVERT_HINT}"
    if header[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _describe_tiff(path, size)
    if header[128:132] == b"DICM":
        return "it is a DICOM file but not part of a VL Whole Slide Microscopy series"
    return (
        "its first bytes match no slide format (TIFF/SVS, DICOM, NDPI, MRXS, ...); "
        "the file is damaged or is not a slide"
    )


def _describe_tiff(path: Path, size: int) -> str:
    first_ifd = _first_ifd_offset(path)
    if first_ifd is not None and first_ifd >= size:
        return (
            f"it is a truncated TIFF: its first image directory is at byte {first_ifd} but "
            f"the file has {size} bytes; copy it again from the scanner or archive"
        )
    try:
        with tifffile.TiffFile(path) as tiff:
            data_end = 0
            for page in tiff.pages:
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
                data_end = max([data_end, *ends])
            tiled = tiff.pages.first.is_tiled
    except Exception as error:  # noqa: BLE001 - tifffile raises many types on damaged files
        return (
            f"it starts like a TIFF but its structure is damaged ({type(error).__name__}: "
            f"{error}); the file is truncated or corrupt"
        )

    if data_end > size:
        return (
            f"it is a truncated TIFF: its image data runs to byte {data_end} but the file "
            f"has {size} bytes; copy it again from the scanner or archive"
        )
    if not tiled:
        return f"it is a TIFF stored in strips, not tiles; {_CONVERT_HINT}"
    return "it is a TIFF of a layout OpenSlide does not support"


def _first_ifd_offset(path: Path) -> int | None:
    """Return the file offset of a TIFF's first image directory from its header."""
    with open(path, "rb") as stream:
        header = stream.read(16)
    order = "little" if header[:2] == b"II" else "big"
    if int.from_bytes(header[2:4], order) == 43:  # BigTIFF: 8-byte offset at byte 8
        return int.from_bytes(header[8:16], order) if len(header) == 16 else None
    return int.from_bytes(header[4:8], order) if len(header) >= 8 else None


def probe_read(slide: openslide.AbstractSlide, slide_id: str) -> None:
    """Decode a few regions, so a damaged or truncated file fails here and not later.

    Reads the smallest level whole when it is at most 4096 x 4096 px (else three
    512 px regions of it), plus 512 px regions at the centre and the bottom-right corner
    of level 0. Raises SlideReadError on the first OpenSlide error.
    """
    regions: list[tuple[tuple[int, int], int, tuple[int, int]]] = []
    top = slide.level_count - 1
    top_width, top_height = slide.level_dimensions[top]
    if top_width * top_height <= _PROBE_FULL_LEVEL_MAX_PX:
        regions.append(((0, 0), top, (top_width, top_height)))
    else:
        regions += _probe_regions(slide, top)
    regions += _probe_regions(slide, 0)[1:]

    for location, level, size in regions:
        try:
            slide.read_region(location, level, size)
        except openslide.OpenSlideError as error:
            raise SlideReadError(
                f"reading level {level} at level-0 {location} failed: {error}; the file is "
                "damaged or truncated, copy it again from the scanner or archive",
                slide_id,
            ) from error


def _probe_regions(
    slide: openslide.AbstractSlide, level: int
) -> list[tuple[tuple[int, int], int, tuple[int, int]]]:
    """Return top-left, centre and bottom-right regions of ``level`` (level-0 locations)."""
    width, height = slide.level_dimensions[level]
    downsample = slide.level_downsamples[level]
    size = (min(_PROBE_PX, width), min(_PROBE_PX, height))
    corners = [(0, 0), ((width - size[0]) // 2, (height - size[1]) // 2), (width - size[0], height - size[1])]
    return [
        ((int(x * downsample), int(y * downsample)), level, size) for x, y in corners
    ]


# --- MPP -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mpp:
    """A slide's level-0 pixel size in µm, where it came from, and why others were rejected."""

    mpp_x: float | None
    mpp_y: float | None
    source: str
    message: str


def resolve_mpp(
    properties: Mapping[str, str],
    *,
    override_mpp: float | None = None,
    override_source: str = "sample_sheet",
    fallback_mpp: float | None = None,
    mpp_min_um: float = 0.05,
    mpp_max_um: float = 100.0,
    slide_id: str | None = None,
) -> Mpp:
    """Choose the level-0 MPP: an override first, then the slide's metadata, then a fallback.

    An ``override_mpp`` from the sample sheet or config wins, and it must be plausible,
    else ConfigError. Otherwise the candidates are ``openslide.mpp-x/-y``, then the TIFF
    resolution tags (``tiff.XResolution`` pixels per ``tiff.ResolutionUnit``, giving
    10,000 / value µm for centimetres and 25,400 / value for inches). The first
    candidate within [mpp_min_um, mpp_max_um] is used. Implausible ones, such as the
    72 dpi that many programs write by default (352.8 µm/px), are named in the message
    and never used. A ``fallback_mpp`` (the config's default for slides without one) is
    used, with the source "config", only when no candidate is plausible.

    OpenSlide 4 itself derives ``openslide.mpp-x`` from the resolution tags of
    generic TIFFs, so a metadata value equal to the tag-derived one is reported with the
    source "tiff_resolution".
    """
    if override_mpp is not None:
        return _override_mpp(override_mpp, override_source, mpp_min_um, mpp_max_um, slide_id)

    tiff_mpp = _tiff_resolution_mpp(properties)
    tiff_label = f"TIFF resolution tags ({properties.get('tiff.ResolutionUnit', '')})"
    metadata_mpp = _float_pair(properties, "openslide.mpp-x", "openslide.mpp-y")
    candidates: list[tuple[str, str, tuple[float, float]]] = []
    if metadata_mpp is not None:
        if tiff_mpp is not None and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(metadata_mpp, tiff_mpp)
        ):
            candidates.append(("tiff_resolution", f"openslide.mpp-x/-y ({tiff_label})", tiff_mpp))
            tiff_mpp = None
        else:
            candidates.append(("metadata", "openslide.mpp-x/-y", metadata_mpp))
    if tiff_mpp is not None:
        candidates.append(("tiff_resolution", tiff_label, tiff_mpp))

    rejected: list[str] = []
    for source, label, pair in candidates:
        if all(mpp_min_um <= value <= mpp_max_um for value in pair):
            message = ""
            if rejected:
                message = f"{'; '.join(rejected)}; used {label}: {pair[0]:g} x {pair[1]:g} µm/px"
            return Mpp(pair[0], pair[1], source, message)
        rejected.append(
            f"MPP {pair[0]:g} x {pair[1]:g} µm/px from {label} is outside the plausible "
            f"range {mpp_min_um:g}..{mpp_max_um:g} µm/px and was not used"
        )

    if fallback_mpp is not None:
        fallback = _override_mpp(fallback_mpp, "config", mpp_min_um, mpp_max_um, slide_id)
        reason = "; ".join(rejected) or "the slide's metadata contains no MPP"
        return dataclasses.replace(fallback, message=f"{reason}; used the config's default MPP")

    fix = "set mpp for this slide in the sample sheet to get areas in mm²"
    if rejected:
        return Mpp(None, None, "missing", f"{'; '.join(rejected)}; {fix}")
    return Mpp(None, None, "missing", f"the slide's metadata contains no MPP; {fix}")


def _override_mpp(
    value: float, source: str, mpp_min_um: float, mpp_max_um: float, slide_id: str | None
) -> Mpp:
    if source not in OVERRIDE_SOURCES:
        raise ConfigError(
            f"mpp_source must be one of {', '.join(OVERRIDE_SOURCES)}, got {source!r}", slide_id
        )
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mpp from the {source} is not a number: {value!r}", slide_id) from None
    if not mpp_min_um <= mpp <= mpp_max_um:
        raise ConfigError(
            f"mpp {value!r} from the {source} is outside the plausible range "
            f"{mpp_min_um:g}..{mpp_max_um:g} µm/px; give the level-0 pixel size in micrometres",
            slide_id,
        )
    return Mpp(mpp, mpp, source, "")


def _float_pair(properties: Mapping[str, str], key_x: str, key_y: str) -> tuple[float, float] | None:
    """Return both values as floats; a missing y takes x (pixels are square in practice)."""
    x = _parse_float(properties.get(key_x))
    y = _parse_float(properties.get(key_y))
    if x is None and y is None:
        return None
    return (x if x is not None else y, y if y is not None else x)  # type: ignore[return-value]


def _parse_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _tiff_resolution_mpp(properties: Mapping[str, str]) -> tuple[float, float] | None:
    """Return the MPP that the TIFF resolution tags imply, or None without a length unit."""
    um_per_unit = _UM_PER_UNIT.get(properties.get("tiff.ResolutionUnit", "").lower())
    resolution = _float_pair(properties, "tiff.XResolution", "tiff.YResolution")
    if um_per_unit is None or resolution is None or min(resolution) <= 0:
        return None
    return (um_per_unit / resolution[0], um_per_unit / resolution[1])


# --- inspect stage ---------------------------------------------------------------------


def run_inspect(
    slide_path: str | os.PathLike,
    slide_id: str,
    out_json: str | os.PathLike,
    *,
    mpp: float | None = None,
    mpp_source: str = "sample_sheet",
    default_mpp_um: float | None = None,
    mpp_min_um: float = 0.05,
    mpp_max_um: float = 100.0,
) -> dict[str, Any]:
    """Inspect one slide and write slide.json; return the record.

    A missing, unreadable or unsupported file gives status "unreadable" with the reason
    in "message" (other fields null); a slide without a usable MPP gives "no_mpp".

    An ``mpp`` override (sample sheet or config) wins over the metadata and is recorded
    with ``mpp_source``. ``default_mpp_um`` is used only for a slide whose metadata has
    no plausible MPP, recorded as "config". An implausible override or default raises
    ConfigError, because it is a mistake in the input.
    """
    path = Path(slide_path)
    # Reject a bad override or default before any work, since it is a mistake in the input.
    if mpp is not None:
        _override_mpp(mpp, mpp_source, mpp_min_um, mpp_max_um, slide_id)
    if default_mpp_um is not None:
        _override_mpp(default_mpp_um, "config", mpp_min_um, mpp_max_um, slide_id)
    record = _empty_record(path, slide_id)
    record["file_size_bytes"], record["content_sha256"] = _hash_content(path, slide_id)

    try:
        slide = open_slide(path, slide_id)
    except SlideReadError as error:
        return _finish_unreadable(record, error, out_json)

    try:
        probe_read(slide, slide_id)
        properties = dict(slide.properties)
        record.update(_slide_fields(slide, properties))
    except SlideReadError as error:
        return _finish_unreadable(record, error, out_json)
    finally:
        slide.close()

    resolved = resolve_mpp(
        properties,
        override_mpp=mpp,
        override_source=mpp_source,
        fallback_mpp=default_mpp_um,
        mpp_min_um=mpp_min_um,
        mpp_max_um=mpp_max_um,
        slide_id=slide_id,
    )
    record["mpp_x"], record["mpp_y"] = resolved.mpp_x, resolved.mpp_y
    record["mpp_source"] = resolved.source
    record["message"] = resolved.message
    record["status"] = status.OK if resolved.mpp_x is not None else status.NO_MPP

    if record["status"] == status.NO_MPP:
        logger.warning("slide %s: no usable MPP: %s", slide_id, resolved.message)
    logger.info(
        "slide %s: %s, %d x %d px, %d levels, downsamples %s, MPP %s (%s)",
        slide_id, record["vendor"], record["width"], record["height"], record["level_count"],
        record["level_downsamples"], record["mpp_x"], record["mpp_source"],
    )
    write_json(out_json, record)
    return record


def _empty_record(path: Path, slide_id: str) -> dict[str, Any]:
    return {
        "slide_id": slide_id,
        "path": str(path),
        "status": status.UNREADABLE,
        "message": "",
        "vendor": None,
        "width": None,
        "height": None,
        "level_count": None,
        "level_dimensions": None,
        "level_downsamples": None,
        "mpp_x": None,
        "mpp_y": None,
        "mpp_source": "missing",
        "objective_power": None,
        "bounds_x": None,
        "bounds_y": None,
        "bounds_width": None,
        "bounds_height": None,
        "content_sha256": None,
        "file_size_bytes": None,
        "wsiseg_version": wsiseg.__version__,
    }


def _slide_fields(slide: openslide.OpenSlide, properties: Mapping[str, str]) -> dict[str, Any]:
    width, height = slide.dimensions
    return {
        "vendor": properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
        "width": width,
        "height": height,
        "level_count": slide.level_count,
        "level_dimensions": [list(size) for size in slide.level_dimensions],
        # Unrounded, as OpenSlide reports them: later stages map coordinates with these.
        "level_downsamples": [float(value) for value in slide.level_downsamples],
        "objective_power": _parse_float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        **bounds_from_properties(properties, width, height),
    }


def bounds_from_properties(properties: Mapping[str, str], width: int, height: int) -> dict[str, int]:
    """Return the bounds rectangle in level-0 px: the non-empty region of MIRAX and
    Leica slides (``openslide.bounds-*``), else the whole slide."""
    return {
        "bounds_x": _parse_int(properties.get(openslide.PROPERTY_NAME_BOUNDS_X), 0),
        "bounds_y": _parse_int(properties.get(openslide.PROPERTY_NAME_BOUNDS_Y), 0),
        "bounds_width": _parse_int(properties.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH), width),
        "bounds_height": _parse_int(properties.get(openslide.PROPERTY_NAME_BOUNDS_HEIGHT), height),
    }


def _parse_int(text: str | None, default: int) -> int:
    value = _parse_float(text)
    return int(round(value)) if value is not None else default


def _finish_unreadable(
    record: dict[str, Any], error: SlideReadError, out_json: str | os.PathLike
) -> dict[str, Any]:
    for key in ("vendor", "width", "height", "level_count", "level_dimensions",
                "level_downsamples", "objective_power", "bounds_x", "bounds_y",
                "bounds_width", "bounds_height"):
        record[key] = None
    record["status"] = status.UNREADABLE
    record["message"] = error.message
    logger.error("slide %s: unreadable: %s", record["slide_id"], error.message)
    write_json(out_json, record)
    return record


def _hash_content(path: Path, slide_id: str) -> tuple[int | None, str | None]:
    """Return (bytes, sha256 hex) of the file, or of a directory's files in name order."""
    if path.is_dir():
        try:
            files = sorted(entry for entry in path.iterdir() if entry.is_file())
        except OSError:
            return None, None
    elif path.is_file():
        files = [path]
    else:
        return None, None

    digest = hashlib.sha256()
    size = 0
    try:
        for file in files:
            with open(file, "rb") as stream:
                while block := stream.read(_HASH_BLOCK_BYTES):
                    digest.update(block)
                    size += len(block)
    except OSError as error:
        logger.warning("slide %s: cannot hash %s: %s", slide_id, path, error)
        return None, None
    return size, digest.hexdigest()


# --- reading pixels --------------------------------------------------------------------


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Return RGB uint8 pixels of an RGBA region laid over white, C-contiguous.

    OpenSlide returns transparent pixels (alpha 0) outside the slide, in missing tiles
    and outside the bounds of sparse formats. Its RGBA is not premultiplied, so a pixel
    becomes rgb * a / 255 + 255 * (1 - a / 255).
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        # A contiguous copy: Zarr writes it twice as fast as a strided view.
        return np.ascontiguousarray(rgb)
    weight = alpha.astype(np.uint16)[..., None]
    blended = (rgb.astype(np.uint16) * weight + 255 * (255 - weight) + 127) // 255
    return blended.astype(np.uint8)


def composite_image_on_white(region: Image.Image) -> Image.Image:
    """Return an RGBA Pillow image laid over white, as RGB (see ``composite_on_white``)."""
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, region).convert("RGB")
