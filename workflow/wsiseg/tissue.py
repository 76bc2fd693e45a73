"""Tissue detection on a low-resolution image of the slide (the tissue stage).

The thumbnail is read from the pyramid level just finer than the thumbnail's scale and
shrunk with an antialiasing filter. It is built block by block with ``read_region``, so
a huge single-level TIFF never has its whole level in memory. Memory is bounded by the
thumbnail (at most ``max_thumbnail_px`` on a side) plus a few blocks of about
``block_px`` x ``block_px`` level pixels.

Detection is HSV saturation thresholded with Otsu's method. Stained tissue is
saturated and glass is grey-white. Two guards keep the background out:

- Near-black pixels (every channel at most ``black_max``) and padding that OpenSlide
  returns as transparent are left out of the Otsu histogram and of the mask. Black
  borders and dark debris have noisy, high saturation that would pull the threshold up.
- Near-white pixels (every channel at least ``white_min``) are never tissue, and the
  threshold never drops below ``min_saturation``, so a blank or very pale slide, where
  Otsu would split noise in half, comes out empty.

The white background itself stays in the histogram: it is the class that Otsu separates
tissue from. Without it the threshold splits pale stroma from dark nuclei (on the
bundled CMU-1 crop the threshold rises from 0.21 to 0.32 and the tissue shrinks by a
quarter). For the same reason a slide covered edge to edge by tissue is split too.

Morphology (a closing, then filling small holes, then dropping small objects) uses sizes
in micrometres, converted with the thumbnail's MPP, so it works for any pyramid depth.
Without an MPP, the sizes are fractions of the thumbnail's longest side.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from wsiseg import status
from wsiseg.atomic import write_bytes, write_json
from wsiseg.errors import SlideReadError
from wsiseg.slide import composite_image_on_white, open_slide

logger = logging.getLogger(__name__)

# A level up to 1 % coarser than the thumbnail still serves it: real pyramids report
# downsamples such as 16.0029 where 16 was meant.
_LEVEL_TOLERANCE = 1.01


def run_tissue(
    slide_json: str | os.PathLike,
    out_mask_png: str | os.PathLike,
    out_thumbnail_png: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    thumbnail_mpp_um: float = 8.0,
    max_thumbnail_px: int = 4096,
    min_thumbnail_px: int = 512,
    no_mpp_thumbnail_px: int = 2048,
    closing_um: float = 16.0,
    min_tissue_area_um2: float = 10_000.0,
    max_hole_area_um2: float = 10_000.0,
    closing_fraction: float = 0.001,
    min_tissue_area_fraction: float = 5e-5,
    max_hole_area_fraction: float = 5e-5,
    min_saturation: float = 0.07,
    white_min: int = 230,
    black_max: int = 40,
    take_whole_below_px: int = 256,
    block_px: int = 2048,
    workers: int = 2,
) -> dict[str, Any]:
    """Detect tissue on a thumbnail; write the mask PNG, the thumbnail PNG and tissue.json.

    The thumbnail is at ``thumbnail_mpp_um`` µm/px, kept between ``min_thumbnail_px``
    (so small slides still get a detailed mask) and ``max_thumbnail_px`` on its longest
    side, and never finer than level 0. Without an MPP its longest side is
    ``no_mpp_thumbnail_px`` (or the slide's, if smaller).

    Morphology sizes: ``closing_um`` is the radius of the closing disc,
    ``max_hole_area_um2`` the largest hole filled, ``min_tissue_area_um2`` the smallest
    object kept. Without an MPP, the ``*_fraction`` parameters replace them (radius as a
    fraction of the thumbnail's longest side, areas as fractions of its pixel count). The
    smallest object kept is capped at 1 % of the thumbnail, so a slide smaller than one
    object keeps its tissue.

    Slides at most ``take_whole_below_px`` on both sides are taken whole as tissue: at
    that size there is no background for Otsu to separate, and such crops are made on
    purpose. ``workers`` threads read blocks in parallel (OpenSlide releases the GIL).

    Status: carried over from slide.json, "no_tissue" when the mask is empty, and
    "unreadable" when OpenSlide fails while reading pixels. Every output is written in
    every case; a slide that is not processed gets a 1 x 1 empty mask.
    """
    record = json.loads(Path(slide_json).read_text(encoding="utf-8"))
    slide_id = record["slide_id"]
    if not status.is_processable(record["status"]):
        logger.info("slide %s: status %s, tissue detection skipped", slide_id, record["status"])
        return _write_placeholder(
            record, record["status"], record["message"], out_mask_png, out_thumbnail_png, out_json
        )

    width, height = record["width"], record["height"]
    mpp_x = record["mpp_x"]
    mask_width, mask_height = thumbnail_size(
        width, height, mpp_x, thumbnail_mpp_um, min_thumbnail_px, max_thumbnail_px,
        no_mpp_thumbnail_px,
    )

    # Read the thumbnail.
    try:
        thumbnail, opaque, level = read_thumbnail(
            record["path"], slide_id, mask_width, mask_height, block_px=block_px, workers=workers
        )
    except SlideReadError as error:
        logger.error("slide %s: unreadable: %s", slide_id, error.message)
        return _write_placeholder(
            record, status.UNREADABLE, error.message, out_mask_png, out_thumbnail_png, out_json
        )
    except openslide.OpenSlideError as error:
        message = f"reading the thumbnail failed: {error}; the file is damaged or truncated"
        logger.error("slide %s: %s", slide_id, message)
        return _write_placeholder(
            record, status.UNREADABLE, message, out_mask_png, out_thumbnail_png, out_json
        )

    downsample_x = width / mask_width
    downsample_y = height / mask_height
    mask_mpp_um = mpp_x * downsample_x if mpp_x is not None else None

    # Detect tissue.
    if max(width, height) <= take_whole_below_px:
        mask = np.ones((mask_height, mask_width), bool)
        otsu = None
        threshold = None
        sizes = MorphologySizes(0, 0, 0)
        note = (
            f"slide of {width} x {height} px is at most {take_whole_below_px} px on each "
            "side: taken whole as tissue without detection"
        )
    else:
        sizes = morphology_sizes(
            mask_width,
            mask_height,
            mask_mpp_um,
            closing_um=closing_um,
            min_tissue_area_um2=min_tissue_area_um2,
            max_hole_area_um2=max_hole_area_um2,
            closing_fraction=closing_fraction,
            min_tissue_area_fraction=min_tissue_area_fraction,
            max_hole_area_fraction=max_hole_area_fraction,
        )
        mask, otsu, threshold = detect_tissue(
            thumbnail,
            opaque,
            sizes,
            min_saturation=min_saturation,
            white_min=white_min,
            black_max=black_max,
        )
        note = ""

    # Measure and record.
    result = _tissue_record(
        record, mask, (downsample_x, downsample_y), level, otsu, threshold, sizes, note
    )
    tissue_pixels = result["tissue_pixels"]
    area_mm2 = result["tissue_area_mm2"]
    _write_png(out_mask_png, mask.astype(np.uint8) * 255)
    _write_png(out_thumbnail_png, thumbnail)
    write_json(out_json, result)
    logger.info(
        "slide %s: tissue %d of %d mask px (%.1f %%), %s mm², mask %d x %d at %.2f level-0 "
        "px/px from level %d, threshold %s",
        slide_id, tissue_pixels, mask.size, 100 * tissue_pixels / mask.size,
        "n/a" if area_mm2 is None else f"{area_mm2:.3f}", mask_width, mask_height,
        downsample_x, level, threshold,
    )
    return result


def _tissue_record(
    record: dict[str, Any],
    mask: np.ndarray,
    downsample: tuple[float, float],
    level: int,
    otsu: float | None,
    threshold: float | None,
    sizes: MorphologySizes,
    note: str,
) -> dict[str, Any]:
    """Return tissue.json's content for a detected mask."""
    slide_id = record["slide_id"]
    mpp_x, mpp_y = record["mpp_x"], record["mpp_y"]
    tissue_pixels = int(mask.sum())
    area_px_level0 = tissue_pixels * downsample[0] * downsample[1]
    area_mm2 = area_px_level0 * mpp_x * mpp_y / 1e6 if mpp_x is not None else None

    messages = [text for text in (note, record["message"]) if text]
    slide_status = record["status"]
    if tissue_pixels == 0:
        slide_status = status.NO_TISSUE
        messages.insert(
            0,
            f"no tissue found (saturation threshold {threshold:.3f}, Otsu "
            f"{'none' if otsu is None else f'{otsu:.3f}'})",
        )
        logger.warning("slide %s: %s", slide_id, messages[0])

    return {
        "slide_id": slide_id,
        "status": slide_status,
        "message": "; ".join(messages),
        "mask_downsample_x": downsample[0],
        "mask_downsample_y": downsample[1],
        "mask_width": mask.shape[1],
        "mask_height": mask.shape[0],
        "mask_mpp_x": mpp_x * downsample[0] if mpp_x is not None else None,
        "mask_mpp_y": mpp_y * downsample[1] if mpp_y is not None else None,
        "level": level,
        "tissue_pixels": tissue_pixels,
        "tissue_area_px_level0": float(area_px_level0),
        "tissue_area_mm2": area_mm2,
        "otsu_threshold": otsu,
        "saturation_threshold": threshold,
        "closing_radius_px": sizes.closing_radius_px,
        "max_hole_area_px": sizes.max_hole_area_px,
        "min_tissue_area_px": sizes.min_tissue_area_px,
    }


# --- thumbnail -------------------------------------------------------------------------


def thumbnail_size(
    width: int,
    height: int,
    mpp_um: float | None,
    thumbnail_mpp_um: float,
    min_thumbnail_px: int,
    max_thumbnail_px: int,
    no_mpp_thumbnail_px: int = 2048,
) -> tuple[int, int]:
    """Return the thumbnail's (width, height) in px for a level-0 slide of width x height."""
    longest = max(width, height)
    if mpp_um is not None:
        downsample = thumbnail_mpp_um / mpp_um
        downsample = min(downsample, longest / min_thumbnail_px)
    else:
        downsample = longest / no_mpp_thumbnail_px
    downsample = max(downsample, longest / max_thumbnail_px, 1.0)
    return max(1, round(width / downsample)), max(1, round(height / downsample))


def choose_level(level_downsamples: list[float], downsample: float) -> int:
    """Return the coarsest level whose downsample is at most ``downsample`` (+1 %)."""
    level = 0
    for index, level_downsample in enumerate(level_downsamples):
        if level_downsample <= downsample * _LEVEL_TOLERANCE:
            level = index
    return level


def read_thumbnail(
    slide_path: str | os.PathLike,
    slide_id: str,
    thumbnail_width: int,
    thumbnail_height: int,
    *,
    block_px: int = 2048,
    workers: int = 2,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (RGB thumbnail over white, opaque-pixel mask, level read).

    Thumbnail pixel (i, j) covers level-0 pixels [j * dx, (j + 1) * dx) x
    [i * dy, (i + 1) * dy), with dx = width / thumbnail_width, and is their
    antialiased (triangle-filtered) mean, computed with Pillow from the level read.
    The level is read in blocks of about ``block_px`` level pixels on a side by
    ``workers`` threads, each with its own OpenSlide handle (threads sharing one handle
    contend on it and gain little). A pixel is opaque when more than half of its area
    held slide pixels (alpha > 0). Raises SlideReadError or OpenSlideError.
    """
    handles: list[openslide.AbstractSlide] = []
    handles_lock = threading.Lock()
    local = threading.local()

    def thread_handle() -> openslide.AbstractSlide:
        if not hasattr(local, "slide"):
            local.slide = open_slide(slide_path, slide_id)
            with handles_lock:
                handles.append(local.slide)
        return local.slide

    try:
        slide = thread_handle()
        width, height = slide.dimensions
        downsample_x = width / thumbnail_width
        downsample_y = height / thumbnail_height
        level = choose_level(list(slide.level_downsamples), min(downsample_x, downsample_y))
        level_downsample = slide.level_downsamples[level]

        # Thumbnail pixels per block, so that one block reads about block_px level pixels.
        step_x = max(1, math.floor(block_px * level_downsample / downsample_x))
        step_y = max(1, math.floor(block_px * level_downsample / downsample_y))
        blocks = [
            (x0, y0, min(x0 + step_x, thumbnail_width), min(y0 + step_y, thumbnail_height))
            for y0 in range(0, thumbnail_height, step_y)
            for x0 in range(0, thumbnail_width, step_x)
        ]

        thumbnail = np.empty((thumbnail_height, thumbnail_width, 3), np.uint8)
        opaque = np.empty((thumbnail_height, thumbnail_width), bool)

        def read_block(block: tuple[int, int, int, int]) -> None:
            x0, y0, x1, y1 = block
            rgb, alpha = _read_block_scaled(
                thread_handle(), level, level_downsample, block, downsample_x, downsample_y
            )
            thumbnail[y0:y1, x0:x1] = rgb
            opaque[y0:y1, x0:x1] = alpha > 127

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # list() re-raises the first error from any block.
            list(pool.map(read_block, blocks))
    finally:
        for handle in handles:
            handle.close()
    return thumbnail, opaque, level


def _read_block_scaled(
    slide: openslide.AbstractSlide,
    level: int,
    level_downsample: float,
    block: tuple[int, int, int, int],
    downsample_x: float,
    downsample_y: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Read the level pixels under thumbnail block (x0, y0, x1, y1); return it shrunk."""
    x0, y0, x1, y1 = block
    level_width, level_height = slide.level_dimensions[level]

    # The filter reaches about one thumbnail pixel beyond the block, so read that margin
    # too (within the level), or block edges would differ from a single whole read.
    margin_x = math.ceil(downsample_x / level_downsample) + 1
    margin_y = math.ceil(downsample_y / level_downsample) + 1
    left = max(0, math.floor(x0 * downsample_x / level_downsample) - margin_x)
    top = max(0, math.floor(y0 * downsample_y / level_downsample) - margin_y)
    location = (round(left * level_downsample), round(top * level_downsample))

    # OpenSlide starts the region at level pixel location / level_downsample. With a
    # non-integer downsample that lies up to 0.5 / downsample px off the whole pixel
    # aimed at, and OpenSlide interpolates the region there. So the block's edges in
    # region pixels are fractional.
    origin_x = location[0] / level_downsample
    origin_y = location[1] / level_downsample
    box = (
        x0 * downsample_x / level_downsample - origin_x,
        y0 * downsample_y / level_downsample - origin_y,
        x1 * downsample_x / level_downsample - origin_x,
        y1 * downsample_y / level_downsample - origin_y,
    )
    size = (
        max(1, min(math.ceil(box[2]) + margin_x, math.floor(level_width - origin_x))),
        max(1, min(math.ceil(box[3]) + margin_y, math.floor(level_height - origin_y))),
    )
    # The level's reported downsample can make the slide's far edge land a fraction of a
    # level pixel past the level's last pixel: clamp the box to what was read.
    box = (box[0], box[1], min(box[2], size[0]), min(box[3], size[1]))
    region = slide.read_region(location, level, size)

    # Pillow operations release the GIL, so the reader threads overlap here as well.
    alpha = region.getchannel("A")
    if alpha.getextrema() == (255, 255):
        rgb = region.convert("RGB")
    else:
        rgb = composite_image_on_white(region)
    target = (x1 - x0, y1 - y0)
    rgb = rgb.resize(target, Image.Resampling.BILINEAR, box=box)
    alpha = alpha.resize(target, Image.Resampling.BILINEAR, box=box)
    return np.asarray(rgb), np.asarray(alpha)


# --- detection -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MorphologySizes:
    """Kernel and area sizes in thumbnail pixels."""

    closing_radius_px: int
    max_hole_area_px: int
    min_tissue_area_px: int


def morphology_sizes(
    mask_width: int,
    mask_height: int,
    mask_mpp_um: float | None,
    *,
    closing_um: float,
    min_tissue_area_um2: float,
    max_hole_area_um2: float,
    closing_fraction: float,
    min_tissue_area_fraction: float,
    max_hole_area_fraction: float,
) -> MorphologySizes:
    """Convert the morphology sizes to thumbnail pixels (µm-based, or relative without MPP)."""
    longest = max(mask_width, mask_height)
    pixels = mask_width * mask_height
    if mask_mpp_um is not None:
        radius = closing_um / mask_mpp_um
        hole_px = max_hole_area_um2 / mask_mpp_um**2
        object_px = min_tissue_area_um2 / mask_mpp_um**2
    else:
        radius = closing_fraction * longest
        hole_px = max_hole_area_fraction * pixels
        object_px = min_tissue_area_fraction * pixels

    # A kernel wider than an eighth of the thumbnail would merge everything on it.
    radius = min(radius, longest / 8)
    object_px = min(object_px, 0.01 * pixels)
    return MorphologySizes(int(round(radius)), int(round(hole_px)), int(round(object_px)))


def _channel_max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Element-wise over the three channel planes: several times faster than a reduction
    # along the last axis of length 3.
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """Return HSV saturation in [0, 1] as float32: (max - min) / max, 0 for black."""
    high, low = (channel.astype(np.float32) for channel in _channel_max_min(rgb))
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def detect_tissue(
    rgb: np.ndarray,
    opaque: np.ndarray,
    sizes: MorphologySizes,
    *,
    min_saturation: float = 0.07,
    white_min: int = 230,
    black_max: int = 40,
) -> tuple[np.ndarray, float | None, float]:
    """Return (mask, Otsu threshold or None, threshold used) for an RGB thumbnail."""
    high, low = _channel_max_min(rgb)
    high_float = high.astype(np.float32)
    sat = np.divide(
        high_float - low, high_float, out=np.zeros_like(high_float), where=high > 0
    )
    near_black = high <= black_max
    near_white = low >= white_min

    # Otsu over the slide's own pixels, background included, near-black left out.
    candidates = sat[opaque & ~near_black]
    otsu: float | None = None
    if candidates.size >= 2 and np.ptp(candidates) > 0:
        otsu = float(threshold_otsu(candidates, nbins=256))
    threshold = max(otsu if otsu is not None else 0.0, min_saturation)
    mask = (sat > threshold) & opaque & ~near_black & ~near_white

    # Morphology: join fragments, fill small holes, drop specks.
    if sizes.closing_radius_px > 0:
        mask = _binary_closing(mask, sizes.closing_radius_px)
    if sizes.max_hole_area_px > 0:
        mask = _fill_small_holes(mask, sizes.max_hole_area_px)
    if sizes.min_tissue_area_px > 0:
        mask = _remove_small_objects(mask, sizes.min_tissue_area_px)
    return mask, otsu, threshold


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _binary_closing(mask: np.ndarray, radius: int) -> np.ndarray:
    # Pad with background, so the erosion does not eat tissue that touches the border.
    padded = np.pad(mask, radius)
    closed = ndimage.binary_closing(padded, structure=_disk(radius))
    return closed[radius:-radius, radius:-radius]


def _fill_small_holes(mask: np.ndarray, max_area_px: int) -> np.ndarray:
    # A hole is a background component that does not touch the border.
    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = areas <= max_area_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def _remove_small_objects(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area_px
    keep[0] = False
    return keep[labels]


# --- outputs ---------------------------------------------------------------------------


def _write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def _write_placeholder(
    record: dict[str, Any],
    slide_status: str,
    message: str,
    out_mask_png: str | os.PathLike,
    out_thumbnail_png: str | os.PathLike,
    out_json: str | os.PathLike,
) -> dict[str, Any]:
    """Write a 1 x 1 empty mask, a white thumbnail and tissue.json for an unprocessed slide."""
    result = {
        "slide_id": record["slide_id"],
        "status": slide_status,
        "message": message,
        "mask_downsample_x": float(record.get("width") or 1),
        "mask_downsample_y": float(record.get("height") or 1),
        "mask_width": 1,
        "mask_height": 1,
        "mask_mpp_x": None,
        "mask_mpp_y": None,
        "level": None,
        "tissue_pixels": 0,
        "tissue_area_px_level0": 0.0,
        "tissue_area_mm2": 0.0 if record.get("mpp_x") is not None else None,
        "otsu_threshold": None,
        "saturation_threshold": None,
        "closing_radius_px": None,
        "max_hole_area_px": None,
        "min_tissue_area_px": None,
    }
    _write_png(out_mask_png, np.zeros((1, 1), np.uint8))
    _write_png(out_thumbnail_png, np.full((1, 1, 3), 255, np.uint8))
    write_json(out_json, result)
    return result
