"""Patch grid over the tissue, extracted once into a chunked Zarr image (the patches stage).

The grid has ``patch_size_px`` windows every ``stride_px`` pixels at the analysis
resolution, starting at level-0 (0, 0) and reaching past the right and bottom edges so
that every slide pixel lies in some patch. A patch is kept when tissue in the mask
covers at least ``min_tissue_fraction`` of the part of its window that lies on the
slide. The store contains the image once, not each patch, and patch i is
``image[row * stride : row * stride + P, col * stride : col * stride + P]``. Only
chunks under a kept patch are read and written, and the rest of the array reads as the
white fill value. Pixels beyond the slide are white too, because OpenSlide returns them
transparent and they are laid over white.

Analysis resolution: level 0 by default. With ``target_mpp_um``, the level whose
reported downsample lies within 1 % of the target is read as it is (the analysis
downsample is then that level's reported value, e.g. 4.000152); otherwise the next finer
level is read and resampled (Pillow's box filter when shrinking, bilinear when
enlarging). Analysis pixel i covers level-0 [i * d, (i + 1) * d) with d the analysis
downsample.

Worker processes read and write disjoint chunks in parallel, each with its own OpenSlide
handle and Zarr array object. A worker holds about one chunk at a time (4 bytes per
pixel as RGBA, 4 MiB at 1024 px, plus its RGB and encoded copies), and the parent holds
the tissue mask (at most 4096 px on a side) and the grid, so memory does not grow with
slide area.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import zarr
from PIL import Image
from zarr.codecs import BloscCodec, BloscShuffle

import wsiseg
from wsiseg import status
from wsiseg.atomic import atomic_dir, write_json
from wsiseg.errors import ArtefactError, ConfigError, SlideReadError
from wsiseg.shards import Shard, plan_shards
from wsiseg.slide import composite_image_on_white, composite_on_white, open_slide

logger = logging.getLogger(__name__)

# Zstd level 1 inside Blosc. Decoded JPEG tissue is noisy and shrinks only ~1.2x at any
# level, while white chunks shrink to almost nothing. On a 1024 px chunk of the CMU-1
# crop, level 1 encoded at ~300 MB/s on one core and level 3 three times slower for the
# same size. Byte shuffling does nothing for uint8.
_COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.noshuffle)
_LEVEL_MATCH_TOLERANCE = 0.01
_BATCHES_PER_WORKER = 4


# --- analysis resolution and grid ------------------------------------------------------


def choose_analysis_level(
    level_downsamples: Sequence[float], target_downsample: float
) -> tuple[int, float]:
    """Return (level to read, analysis downsample) for a target level-0 px per analysis px.

    A level within 1 % of the target is used as it is, with its reported downsample.
    Otherwise the coarsest level finer than the target is read and resampled.
    """
    for level, level_downsample in enumerate(level_downsamples):
        if abs(level_downsample / target_downsample - 1.0) <= _LEVEL_MATCH_TOLERANCE:
            return level, float(level_downsample)
    finer = [level for level, value in enumerate(level_downsamples) if value < target_downsample]
    return (finer[-1] if finer else 0), float(target_downsample)


def grid_shape(
    width_px: int, height_px: int, analysis_downsample: float, patch_size_px: int, stride_px: int
) -> tuple[int, int]:
    """Return (n_rows, n_cols) of a grid that covers every pixel of the slide.

    The slide is width_px / analysis_downsample analysis px wide. The last column starts
    before its right edge and may overhang it, and each axis has at least one patch.
    """
    analysis_width = width_px / analysis_downsample
    analysis_height = height_px / analysis_downsample
    n_cols = 1 + max(0, math.ceil((analysis_width - patch_size_px) / stride_px))
    n_rows = 1 + max(0, math.ceil((analysis_height - patch_size_px) / stride_px))
    return n_rows, n_cols


def tissue_fractions(
    mask: np.ndarray,
    mask_downsample_x: float,
    mask_downsample_y: float,
    n_rows: int,
    n_cols: int,
    *,
    patch_size_px: int,
    stride_px: int,
    analysis_downsample: float,
) -> np.ndarray:
    """Return the tissue fraction of each grid window, (n_rows, n_cols) float64.

    Windows are mapped to mask pixels with fractional edges, and the mask's integral
    image is interpolated bilinearly there, which is exact for a mask that is constant
    over each of its pixels. The fraction is of the part of the window on the slide.
    """
    mask_height, mask_width = mask.shape
    # int32 fits the count of a 4096 x 4096 mask (16.8 million) with room to spare.
    integral = np.zeros((mask_height + 1, mask_width + 1), np.int32)
    # Summed in place: np.cumsum would otherwise return int64 temporaries (224 MiB for
    # the 3,125 px mask of a 100k px slide instead of 75 MiB).
    np.cumsum(mask, axis=0, dtype=np.int32, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])

    scale_x = analysis_downsample / mask_downsample_x
    scale_y = analysis_downsample / mask_downsample_y
    starts_x = np.arange(n_cols) * stride_px * scale_x
    starts_y = np.arange(n_rows) * stride_px * scale_y
    size_x = patch_size_px * scale_x
    size_y = patch_size_px * scale_y

    def along_x(table: np.ndarray, x: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0.0, mask_width)
        left = np.minimum(np.floor(x).astype(np.int64), max(mask_width - 1, 0))
        weight = x - left
        return table[:, left] * (1.0 - weight) + table[:, np.minimum(left + 1, mask_width)] * weight

    def along_y(table: np.ndarray, y: np.ndarray) -> np.ndarray:
        y = np.clip(y, 0.0, mask_height)
        top = np.minimum(np.floor(y).astype(np.int64), max(mask_height - 1, 0))
        weight = (y - top)[:, None]
        return table[top] * (1.0 - weight) + table[np.minimum(top + 1, mask_height)] * weight

    def window_sums(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
        right = along_x(integral, x1)
        left = along_x(integral, x0)
        return along_y(right, y1) - along_y(left, y1) - along_y(right, y0) + along_y(left, y0)

    tissue = window_sums(starts_x, starts_x + size_x, starts_y, starts_y + size_y)

    # Normalise by the part of each window that lies on the slide, so that an edge
    # patch, or the one patch of a slide smaller than a patch, is judged by its pixels.
    inside_x = np.clip(starts_x + size_x, 0, mask_width) - np.clip(starts_x, 0, mask_width)
    inside_y = np.clip(starts_y + size_y, 0, mask_height) - np.clip(starts_y, 0, mask_height)
    inside = inside_y[:, None] * inside_x[None, :]
    fractions = np.divide(tissue, inside, out=np.zeros_like(tissue), where=inside > 0)
    return np.clip(fractions, 0.0, 1.0)


def chunks_under_patches(
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    patch_size_px: int,
    stride_px: int,
    chunk_px: int,
    chunk_grid: tuple[int, int],
) -> np.ndarray:
    """Return a bool (chunk rows, chunk cols) array, True under at least one patch."""
    needed = np.zeros(chunk_grid, bool)
    if rows.size == 0:
        return needed
    first_row = rows * stride_px // chunk_px
    last_row = (rows * stride_px + patch_size_px - 1) // chunk_px
    first_col = cols * stride_px // chunk_px
    last_col = (cols * stride_px + patch_size_px - 1) // chunk_px
    for dy in range(int((last_row - first_row).max()) + 1):
        for dx in range(int((last_col - first_col).max()) + 1):
            inside = (first_row + dy <= last_row) & (first_col + dx <= last_col)
            needed[first_row[inside] + dy, first_col[inside] + dx] = True
    return needed


# --- stage -----------------------------------------------------------------------------


def run_patches(
    slide_json: str | os.PathLike,
    tissue_json: str | os.PathLike,
    tissue_mask_png: str | os.PathLike,
    out_zarr: str | os.PathLike,
    out_plan_json: str | os.PathLike,
    *,
    patch_size_px: int = 256,
    stride_px: int = 128,
    target_mpp_um: float | None = None,
    chunk_px: int = 1024,
    workers: int = 2,
    patches_per_shard: int = 2048,
    max_shards: int = 64,
    min_tissue_fraction: float = 0.01,
) -> dict[str, Any]:
    """Choose the patches over tissue, extract them into a Zarr store and plan the shards.

    Writes the store (via a temporary directory renamed on success) and shards.json, and
    returns the store's attributes. A slide whose tissue.json status is not processable,
    one without any window reaching ``min_tissue_fraction`` ("no_tissue"), and one that
    fails while reading ("unreadable") get a valid store with zero patches. With
    ``workers=1`` the extraction runs in this process.
    """
    _check_options(patch_size_px, stride_px, chunk_px, workers, patches_per_shard, max_shards,
                   min_tissue_fraction, target_mpp_um)
    record = _read_json(slide_json)
    tissue = _read_json(tissue_json)
    slide_id = record["slide_id"]
    if tissue["slide_id"] != slide_id:
        raise ArtefactError(
            f"{tissue_json} belongs to slide {tissue['slide_id']}, not {slide_id}", slide_id
        )

    layout = {
        "slide_id": slide_id,
        "patch_size_px": patch_size_px,
        "stride_px": stride_px,
        "chunk_px": chunk_px,
        "min_tissue_fraction": min_tissue_fraction,
        "wsiseg_version": wsiseg.__version__,
    }
    if not status.is_processable(tissue["status"]):
        logger.info("slide %s: status %s, no patches extracted", slide_id, tissue["status"])
        attrs = _empty_attrs(layout, record, tissue["status"], tissue["message"])
        return _write_empty(out_zarr, out_plan_json, attrs, chunk_px)

    # Analysis resolution and grid.
    level, level_downsample, analysis_downsample, note = _analysis_resolution(
        record, target_mpp_um
    )
    n_rows, n_cols = grid_shape(
        record["width"], record["height"], analysis_downsample, patch_size_px, stride_px
    )
    image_height = (n_rows - 1) * stride_px + patch_size_px
    image_width = (n_cols - 1) * stride_px + patch_size_px

    # Patches over tissue.
    mask = _read_mask(tissue_mask_png, tissue, slide_id)
    keep = _select_windows(
        mask, tissue, n_rows, n_cols, patch_size_px, stride_px, analysis_downsample,
        min_tissue_fraction,
    )
    rows, cols = np.nonzero(keep)
    grid = np.stack([rows, cols], axis=1).astype(np.int64)
    coords = np.stack(
        [np.rint(cols * stride_px * analysis_downsample), np.rint(rows * stride_px * analysis_downsample)],
        axis=1,
    ).astype(np.int64)

    mpp_x, mpp_y = record["mpp_x"], record["mpp_y"]
    messages = [text for text in (note, tissue["message"]) if text]
    slide_status = tissue["status"]
    if rows.size == 0:
        slide_status = status.NO_TISSUE
        messages.insert(0, f"no patch window contains {min_tissue_fraction:.1%} tissue or more")
        logger.warning("slide %s: %s", slide_id, messages[0])

    attrs = {
        **layout,
        "level": level,
        "level_downsample": level_downsample,
        "analysis_downsample": analysis_downsample,
        "mpp_x": mpp_x * analysis_downsample if mpp_x is not None else None,
        "mpp_y": mpp_y * analysis_downsample if mpp_y is not None else None,
        "n_patches": int(rows.size),
        "n_rows": n_rows,
        "n_cols": n_cols,
        "status": slide_status,
        "message": "; ".join(messages),
    }
    chunk_grid = (math.ceil(image_height / chunk_px), math.ceil(image_width / chunk_px))
    needed = chunks_under_patches(
        rows, cols, patch_size_px=patch_size_px, stride_px=stride_px, chunk_px=chunk_px,
        chunk_grid=chunk_grid,
    )

    # Extract.
    reader = ChunkReader(
        slide_path=record["path"],
        slide_id=slide_id,
        level=level,
        level_downsample=level_downsample,
        analysis_downsample=analysis_downsample,
        chunk_px=chunk_px,
        image_shape=(image_height, image_width),
    )
    started = time.perf_counter()
    try:
        with atomic_dir(out_zarr) as temp:
            _create_store(temp, (image_height, image_width), chunk_px, coords, grid, attrs)
            _extract(reader, temp, list(zip(*np.nonzero(needed))), workers)
    except (SlideReadError, openslide.OpenSlideError) as error:
        message = f"reading pixels failed: {getattr(error, 'message', error)}; the file is damaged or truncated"
        logger.error("slide %s: %s", slide_id, message)
        attrs = _empty_attrs(layout, record, status.UNREADABLE, message)
        return _write_empty(out_zarr, out_plan_json, attrs, chunk_px)
    seconds = time.perf_counter() - started

    shards = plan_shards(keep.sum(axis=1), patches_per_shard, max_shards)
    _write_plan(out_plan_json, slide_id, slide_status, attrs["n_patches"], shards)
    logger.info(
        "slide %s: %d patches of %d px (stride %d) on a %d x %d grid at level %d, analysis "
        "downsample %.6g; %d of %d chunks written in %.1f s with %d workers; %d shards",
        slide_id, attrs["n_patches"], patch_size_px, stride_px, n_rows, n_cols, level,
        analysis_downsample, int(needed.sum()), needed.size, seconds, workers, len(shards),
    )
    return attrs


def _select_windows(
    mask: np.ndarray,
    tissue: dict[str, Any],
    n_rows: int,
    n_cols: int,
    patch_size_px: int,
    stride_px: int,
    analysis_downsample: float,
    min_tissue_fraction: float,
) -> np.ndarray:
    """Return a bool (n_rows, n_cols) array of the grid windows to keep."""
    fractions = tissue_fractions(
        mask,
        tissue["mask_downsample_x"],
        tissue["mask_downsample_y"],
        n_rows,
        n_cols,
        patch_size_px=patch_size_px,
        stride_px=stride_px,
        analysis_downsample=analysis_downsample,
    )
    # A fraction of 0 keeps every window that touches tissue at all.
    return (fractions >= min_tissue_fraction) & (fractions > 1e-9)


def _check_options(
    patch_size_px: int,
    stride_px: int,
    chunk_px: int,
    workers: int,
    patches_per_shard: int,
    max_shards: int,
    min_tissue_fraction: float,
    target_mpp_um: float | None,
) -> None:
    for name, value in (("patch_size_px", patch_size_px), ("stride_px", stride_px),
                        ("chunk_px", chunk_px), ("workers", workers),
                        ("patches_per_shard", patches_per_shard), ("max_shards", max_shards)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ConfigError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction!r}")
    if target_mpp_um is not None and not target_mpp_um > 0:
        raise ConfigError(f"target_mpp_um must be positive µm/px or None, got {target_mpp_um!r}")


def _analysis_resolution(
    record: dict[str, Any], target_mpp_um: float | None
) -> tuple[int, float, float, str]:
    """Return (level, its downsample, analysis downsample, note for the message)."""
    downsamples = record["level_downsamples"]
    if target_mpp_um is None:
        return 0, float(downsamples[0]), 1.0, ""
    if record["mpp_x"] is None:
        note = f"target MPP {target_mpp_um:g} µm/px ignored: the slide has no MPP, patches are at level 0"
        logger.warning("slide %s: %s", record["slide_id"], note)
        return 0, float(downsamples[0]), 1.0, note
    level, analysis_downsample = choose_analysis_level(downsamples, target_mpp_um / record["mpp_x"])
    return level, float(downsamples[level]), analysis_downsample, ""


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ArtefactError(f"cannot read {path}: {error}") from error


def _read_mask(path: str | os.PathLike, tissue: dict[str, Any], slide_id: str) -> np.ndarray:
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    expected = (tissue["mask_height"], tissue["mask_width"])
    if mask.shape != expected:
        raise ArtefactError(
            f"tissue mask {path} is {mask.shape[1]} x {mask.shape[0]} px but tissue.json "
            f"says {expected[1]} x {expected[0]}; rerun the tissue stage",
            slide_id,
        )
    return mask


# --- reading chunks --------------------------------------------------------------------


class ChunkReader:
    """Reads one chunk of the analysis image from the slide, over white.

    Picklable, so that worker processes receive it; each process opens its own
    OpenSlide handle on first use.
    """

    def __init__(
        self,
        *,
        slide_path: str,
        slide_id: str,
        level: int,
        level_downsample: float,
        analysis_downsample: float,
        chunk_px: int,
        image_shape: tuple[int, int],
    ) -> None:
        self.slide_path = slide_path
        self.slide_id = slide_id
        self.level = level
        self.level_downsample = level_downsample
        self.analysis_downsample = analysis_downsample
        self.chunk_px = chunk_px
        self.image_shape = image_shape
        self._slide: openslide.AbstractSlide | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None
        return state

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def bounds(self, chunk_row: int, chunk_col: int) -> tuple[int, int, int, int]:
        """Return the chunk's (x0, y0, x1, y1) in analysis px, clipped to the image."""
        height, width = self.image_shape
        x0 = chunk_col * self.chunk_px
        y0 = chunk_row * self.chunk_px
        return x0, y0, min(x0 + self.chunk_px, width), min(y0 + self.chunk_px, height)

    def read(self, chunk_row: int, chunk_col: int) -> np.ndarray:
        """Return the chunk's pixels, (y1 - y0, x1 - x0, 3) uint8."""
        if self._slide is None:
            self._slide = open_slide(self.slide_path, self.slide_id)
        x0, y0, x1, y1 = self.bounds(chunk_row, chunk_col)
        if self.analysis_downsample == self.level_downsample:
            return self._read_direct(x0, y0, x1, y1)
        return self._read_resampled(x0, y0, x1, y1)

    def _read_direct(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        # At level 0 this is exact. At a coarser level OpenSlide starts the region at
        # level pixel location / downsample, so rounding the level-0 location shifts the
        # chunk by at most half a level-0 pixel, and OpenSlide interpolates the shift.
        location = (round(x0 * self.analysis_downsample), round(y0 * self.analysis_downsample))
        region = self._slide.read_region(location, self.level, (x1 - x0, y1 - y0))
        return composite_on_white(np.asarray(region))

    def _read_resampled(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        # Two level pixels of margin feed the filter's support at the chunk's edges.
        margin = 2 * self.level_downsample
        location = (
            max(0, math.floor(x0 * self.analysis_downsample - margin)),
            max(0, math.floor(y0 * self.analysis_downsample - margin)),
        )
        box = (
            (x0 * self.analysis_downsample - location[0]) / self.level_downsample,
            (y0 * self.analysis_downsample - location[1]) / self.level_downsample,
            (x1 * self.analysis_downsample - location[0]) / self.level_downsample,
            (y1 * self.analysis_downsample - location[1]) / self.level_downsample,
        )
        size = (math.ceil(box[2]) + 2, math.ceil(box[3]) + 2)
        region = self._slide.read_region(location, self.level, size)
        if region.getchannel("A").getextrema() == (255, 255):
            rgb = region.convert("RGB")
        else:
            rgb = composite_image_on_white(region)
        # Box filter when shrinking, bilinear when a target MPP is finer than level 0.
        shrinking = self.analysis_downsample >= self.level_downsample
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        return np.asarray(rgb.resize((x1 - x0, y1 - y0), resample, box=box))


def _extract_batch(reader: ChunkReader, store: str, chunks: list[tuple[int, int]]) -> int:
    """Read ``chunks`` and write them into the store's image; return the pixel count."""
    image = zarr.open_array(Path(store) / "image", mode="r+")
    pixels = 0
    try:
        for chunk_row, chunk_col in chunks:
            x0, y0, x1, y1 = reader.bounds(chunk_row, chunk_col)
            image[y0:y1, x0:x1] = reader.read(chunk_row, chunk_col)
            pixels += (x1 - x0) * (y1 - y0)
    finally:
        reader.close()
    return pixels


def _extract(
    reader: ChunkReader, store: Path, chunks: list[tuple[int, int]], workers: int
) -> None:
    if not chunks:
        return
    if workers == 1:
        _extract_batch(reader, str(store), chunks)
        return

    # Contiguous row-major batches keep the tiles that neighbouring chunks share in one
    # worker's OpenSlide cache. "spawn" starts clean processes, because a forked child
    # copies the locks of the parent's threads (Zarr's event loop) in whatever state
    # they are in and can deadlock on them.
    n_batches = min(len(chunks), workers * _BATCHES_PER_WORKER)
    batches = [list(batch) for batch in np.array_split(np.array(chunks), n_batches)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(_extract_batch, reader, str(store), [tuple(map(int, c)) for c in batch])
            for batch in batches
        ]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            # Batches not yet started would only repeat the failure.
            for future in futures:
                future.cancel()
            raise


# --- writing ---------------------------------------------------------------------------


def _create_store(
    path: Path,
    image_shape: tuple[int, int],
    chunk_px: int,
    coords: np.ndarray,
    grid: np.ndarray,
    attrs: dict[str, Any],
) -> zarr.Group:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array(
        "image",
        shape=(*image_shape, 3),
        chunks=(chunk_px, chunk_px, 3),
        dtype="uint8",
        fill_value=255,
        compressors=_COMPRESSOR,
    )
    rows_per_chunk = max(1, min(len(coords), 1 << 16))
    for name, values in (("coords", coords), ("grid", grid)):
        array = group.create_array(
            name, shape=values.shape, chunks=(rows_per_chunk, 2), dtype="int64", fill_value=0
        )
        if len(values):
            array[...] = values
    group.attrs.update(attrs)
    return group


def _empty_attrs(
    layout: dict[str, Any], record: dict[str, Any], slide_status: str, message: str
) -> dict[str, Any]:
    return {
        **layout,
        "level": 0,
        "level_downsample": 1.0,
        "analysis_downsample": 1.0,
        "mpp_x": record.get("mpp_x"),
        "mpp_y": record.get("mpp_y"),
        "n_patches": 0,
        "n_rows": 0,
        "n_cols": 0,
        "status": slide_status,
        "message": message,
    }


def _write_empty(
    out_zarr: str | os.PathLike, out_plan_json: str | os.PathLike, attrs: dict[str, Any],
    chunk_px: int,
) -> dict[str, Any]:
    """Write a store with a 0 x 0 image and no patches, and a one-shard plan."""
    empty = np.zeros((0, 2), np.int64)
    with atomic_dir(out_zarr) as temp:
        _create_store(temp, (0, 0), chunk_px, empty, empty, attrs)
    shards = plan_shards([], 1, 1)
    _write_plan(out_plan_json, attrs["slide_id"], attrs["status"], 0, shards)
    return attrs


def _write_plan(
    path: str | os.PathLike, slide_id: str, slide_status: str, n_patches: int,
    shards: list[Shard],
) -> None:
    write_json(
        path,
        {
            "slide_id": slide_id,
            "status": slide_status,
            "n_patches": n_patches,
            "n_shards": len(shards),
            "shards": shards,
        },
    )
