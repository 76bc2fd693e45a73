"""Stitch the inference shards of one slide into its probability map.

Each shard stores a band of output rows as a weighted sum and a weight (overlapping
patches already merged). Bands of neighbouring shards overlap where patches of adjacent
grid rows overlap, so the map is ``sum / weight`` after adding up every band that covers
a pixel. The map is built block by block, one chunk row at a time, so memory depends on
the block size and not on the slide's area.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from wsiseg import __version__, status
from wsiseg.atomic import atomic_dir
from wsiseg.errors import ArtefactError, ConfigError

logger = logging.getLogger(__name__)

# Largest block summed at once. Float64 sums, float32 reads and writes and Zarr's codec
# buffers came to about 50 bytes per pixel: stitching a 25,000 x 25,000 map from eight
# shards peaked at 277 MB RSS, imports included (zarr 3.1, 2-core CPU machine).
MAX_BLOCK_PX = 1 << 22


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


@dataclass
class _Band:
    """One shard's band of output rows [row0, row1)."""

    path: str
    row0: int
    row1: int
    sum: zarr.Array
    weight: zarr.Array
    variance_sum: zarr.Array | None
    attrs: dict[str, Any]


def _open_group(
    path: str | os.PathLike, description: str, slide_id: str | None = None
) -> zarr.Group:
    if not Path(path).is_dir():
        raise ArtefactError(f"{description} not found: {path}", slide_id)
    try:
        return zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ArtefactError(f"failed to open {description} {path}: {error}", slide_id) from error


def _open_band(
    path: str | os.PathLike, slide_id: str, output_downsample: int, width_out: int, height_out: int
) -> _Band:
    """Open one shard and check it against the slide and its map size."""
    group = _open_group(path, "prediction shard", slide_id)
    attrs = dict(group.attrs)
    if attrs.get("slide_id") != slide_id:
        raise ArtefactError(
            f"prediction shard {path} belongs to slide {attrs.get('slide_id')!r}", slide_id
        )
    if attrs.get("output_downsample") != output_downsample:
        raise ArtefactError(
            f"prediction shards disagree on output_downsample: the first has "
            f"{output_downsample}, {path} has {attrs.get('output_downsample')!r}",
            slide_id,
        )
    if "sum" not in group or "weight" not in group:
        raise ArtefactError(
            f"prediction shard {path} lacks its 'sum' or 'weight' array, so rerun inference",
            slide_id,
        )
    sum_array, weight_array = group["sum"], group["weight"]
    variance_sum = group["variance_sum"] if "variance_sum" in group else None
    if sum_array.shape != weight_array.shape or len(sum_array.shape) != 2:
        raise ArtefactError(
            f"prediction shard {path}: 'sum' {sum_array.shape} and 'weight' "
            f"{weight_array.shape} must be 2-D arrays of one shape",
            slide_id,
        )

    band_height, band_width = sum_array.shape
    row0 = int(attrs.get("out_row0", 0))
    if band_height and band_width != width_out:
        raise ArtefactError(
            f"prediction shard {path} is {band_width} px wide but the map is {width_out} px, "
            "so rerun inference for this slide",
            slide_id,
        )
    if band_height and (row0 < 0 or row0 + band_height > height_out):
        raise ArtefactError(
            f"prediction shard {path} covers rows {row0}..{row0 + band_height}, outside "
            f"the map's {height_out} rows",
            slide_id,
        )
    return _Band(str(path), row0, row0 + band_height, sum_array, weight_array, variance_sum, attrs)


def _column_block_px(bands: Sequence[_Band], chunk_px: int, height_px: int, width_out: int) -> int:
    """Width of a stitching block: whole output chunks, wide enough for shard chunks.

    Reading a block narrower than a shard's chunks would decode those chunks once per
    block, so the block spans the widest shard chunk unless that exceeds MAX_BLOCK_PX.
    """
    shard_chunk_widths = [band.sum.chunks[1] for band in bands if band.row1 > band.row0]
    widest_shard_chunk = max(shard_chunk_widths, default=1)
    width = chunk_px * max(1, math.ceil(widest_shard_chunk / chunk_px))
    max_width = max(chunk_px, (MAX_BLOCK_PX // max(1, height_px)) // chunk_px * chunk_px)
    return max(1, min(width, max_width, max(width_out, 1)))


def _first_value(bands: Sequence[_Band], key: str) -> Any:
    """Return attribute ``key`` of the first shard that predicted patches, else of any shard."""
    for band in sorted(bands, key=lambda band: band.attrs.get("n_patches", 0) == 0):
        if key in band.attrs:
            return band.attrs[key]
    return None


def run_stitch(
    patches_zarr: str | os.PathLike,
    shard_zarrs: Sequence[str | os.PathLike],
    out_zarr: str | os.PathLike,
    *,
    chunk_px: int = 2048,
) -> dict[str, Any]:
    """Write the slide's probability map as a Zarr group and return its attributes.

    ``probability`` float32 (H_out, W_out) is sum / weight over all shards, 0 where no
    patch was predicted. ``coverage`` uint8 is 1 where some patch was predicted.
    ``variance`` float32 (the weighted mean of the ensemble variance) is written when
    every shard carries a ``variance_sum``. Both arrays are chunked ``chunk_px`` square.
    A slide that earlier stages could not process gets arrays of the map's size that hold
    only the fill value 0, and its status.
    """
    started = time.perf_counter()
    patches = _open_group(patches_zarr, "patch store")
    patch_attrs = dict(patches.attrs)
    slide_id = str(patch_attrs.get("slide_id"))
    if isinstance(chunk_px, bool) or not isinstance(chunk_px, int) or chunk_px < 1:
        raise ConfigError(f"chunk_px must be a positive integer, got {chunk_px!r}", slide_id)
    if not shard_zarrs:
        raise ArtefactError(
            "no prediction shards given, but every slide has at least one", slide_id
        )
    slide_status = patch_attrs.get("status") or status.OK
    processable = status.is_processable(slide_status)

    # Map size: ceil(image / f) output pixels, f analysis pixels per output pixel.
    if "image" in patches:
        image_height, image_width = patches["image"].shape[:2]
    elif processable:
        raise ArtefactError(f"patch store {patches_zarr} has no 'image' array", slide_id)
    else:
        image_height = image_width = 0
    first_shard = _open_group(shard_zarrs[0], "prediction shard", slide_id)
    output_downsample = first_shard.attrs.get("output_downsample")
    valid_downsample = isinstance(output_downsample, int) and not isinstance(output_downsample, bool)
    if not valid_downsample or output_downsample < 1:
        raise ArtefactError(
            f"prediction shard {shard_zarrs[0]} has output_downsample {output_downsample!r}, "
            "expected a positive integer",
            slide_id,
        )
    height_out = math.ceil(image_height / output_downsample)
    width_out = math.ceil(image_width / output_downsample)

    # Open every shard and check that they fit together.
    bands = [
        _open_band(path, slide_id, output_downsample, width_out, height_out) for path in shard_zarrs
    ]
    indices = [band.attrs.get("shard_index") for band in bands]
    if len(set(indices)) != len(indices):
        raise ArtefactError(f"prediction shards repeat a shard_index: {indices}", slide_id)
    n_patches = sum(int(band.attrs.get("n_patches", 0)) for band in bands)
    expected_patches = int(patch_attrs.get("n_patches", 0) or 0)
    if processable and n_patches != expected_patches:
        raise ArtefactError(
            f"the {len(bands)} prediction shards contain {n_patches} patches but the patch "
            f"store {expected_patches}: a shard is missing or stale, so rerun inference",
            slide_id,
        )
    non_empty = [band for band in bands if band.row1 > band.row0]
    with_variance = bool(non_empty) and all(band.variance_sum is not None for band in non_empty)

    analysis_downsample = float(patch_attrs.get("analysis_downsample") or 1.0)
    mpp_x, mpp_y = patch_attrs.get("mpp_x"), patch_attrs.get("mpp_y")
    attrs = {
        "slide_id": slide_id,
        "status": slide_status,
        "message": patch_attrs.get("message") or "",
        "output_downsample": output_downsample,
        "analysis_downsample": analysis_downsample,
        "level0_downsample": analysis_downsample * output_downsample,
        "mpp_x": mpp_x * output_downsample if mpp_x else None,
        "mpp_y": mpp_y * output_downsample if mpp_y else None,
        "patch_size_px": patch_attrs.get("patch_size_px"),
        "stride_px": patch_attrs.get("stride_px"),
        "n_patches": n_patches,
        "n_shards": len(bands),
        "weights": _first_value(bands, "weights"),
        "preprocessing": _first_value(bands, "preprocessing"),
        "tta": _first_value(bands, "tta"),
        "precision": _first_value(bands, "precision"),
        "wsiseg_version": __version__,
    }

    with atomic_dir(out_zarr) as temp:
        group = zarr.open_group(str(temp), mode="w")
        chunks = (chunk_px, chunk_px)
        arrays = {
            "probability": group.create_array(
                "probability", shape=(height_out, width_out), chunks=chunks, dtype="float32",
                fill_value=0.0, compressors=[_compressor()],
            ),
            "coverage": group.create_array(
                "coverage", shape=(height_out, width_out), chunks=chunks, dtype="uint8",
                fill_value=0, compressors=[_compressor()],
            ),
        }
        if with_variance:
            arrays["variance"] = group.create_array(
                "variance", shape=(height_out, width_out), chunks=chunks, dtype="float32",
                fill_value=0.0, compressors=[_compressor()],
            )
        if processable and non_empty:
            _stitch_blocks(non_empty, arrays, chunk_px)
        group.attrs.update(attrs)

    logger.info(
        "slide %s: stitched %d shards (%d patches) into a %d x %d map at downsample %d in %.1f s",
        slide_id, len(bands), n_patches, width_out, height_out, output_downsample,
        time.perf_counter() - started,
    )
    return attrs


def _stitch_blocks(bands: Sequence[_Band], arrays: dict[str, zarr.Array], chunk_px: int) -> None:
    """Fill the output arrays block by block, leaving blocks that no patch covers unwritten."""
    height_out, width_out = arrays["probability"].shape
    block_width = _column_block_px(bands, chunk_px, chunk_px, width_out)

    for row0 in range(0, height_out, chunk_px):
        row1 = min(height_out, row0 + chunk_px)
        covering = [band for band in bands if band.row0 < row1 and band.row1 > row0]
        if not covering:
            continue
        for col0 in range(0, width_out, block_width):
            col1 = min(width_out, col0 + block_width)

            # Add up every band's rows that fall in this block, in float64.
            total = np.zeros((row1 - row0, col1 - col0), dtype=np.float64)
            weight = np.zeros_like(total)
            variance = np.zeros_like(total) if "variance" in arrays else None
            for band in covering:
                overlap0, overlap1 = max(row0, band.row0), min(row1, band.row1)
                source = np.s_[overlap0 - band.row0 : overlap1 - band.row0, col0:col1]
                target = np.s_[overlap0 - row0 : overlap1 - row0, :]
                total[target] += band.sum[source]
                weight[target] += band.weight[source]
                if variance is not None:
                    variance[target] += band.variance_sum[source]

            covered = weight > 0
            if not covered.any():
                continue

            # Divide in place, leaving 0 where no patch was predicted.
            uncovered = ~covered
            block = np.s_[row0:row1, col0:col1]
            np.divide(total, weight, out=total, where=covered)
            total[uncovered] = 0.0
            arrays["probability"][block] = total.astype(np.float32)
            arrays["coverage"][block] = covered.astype(np.uint8)
            if variance is not None:
                np.divide(variance, weight, out=variance, where=covered)
                variance[uncovered] = 0.0
                arrays["variance"][block] = variance.astype(np.float32)
