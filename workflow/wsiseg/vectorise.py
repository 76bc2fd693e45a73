"""Vectorise a stitched probability map into tumour polygons and per-slide statistics.

The map is thresholded band by band. Each band's mask is traced into exact pixel-boundary
polygons with their holes (see ``trace_mask``). Regions that reach a band's bottom row are
held back and merged with the touching regions of the next band. A region that crosses
any number of band or chunk borders therefore comes out as one polygon. Memory depends on
the band size and on the regions still open, not on the slide's area.

Finished regions are repaired where invalid, filtered by a minimum area, simplified,
exploded so that every feature is one Polygon, scaled to level-0 pixels of the full slide
and written as a QuPath-compatible GeoJSON FeatureCollection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
import scipy.ndimage as ndi
import scipy.sparse
import scipy.sparse.csgraph
import shapely
import zarr

from wsiseg import __version__, geojson, status
from wsiseg.atomic import write_json
from wsiseg.errors import ArtefactError, ConfigError

logger = logging.getLogger(__name__)

# Pixels traced at once. Measured peak: about 200 bytes per pixel on a map of pure noise
# without a speck filter (one region per 15 px, each a shapely object), about 16 bytes
# per pixel on smooth shapes. So 2 Mpx bands stay below about 450 MB in the worst case.
DEFAULT_MAX_BAND_PX = 1 << 21

# Largest thresholded block held in memory (1 byte per pixel). A map whose chunk rows
# are larger is read in bands of `max_band_px` rows instead, decoding chunks repeatedly.
MAX_MASK_PX = 1 << 26

# Directions of boundary segments, in image coordinates (x right, y down), numbered so
# that (d + 1) % 4 is a right turn and (d + 3) % 4 a left turn.
EAST, SOUTH, WEST, NORTH = 0, 1, 2, 3

FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)

POLYGON_TYPE_ID = 3  # shapely.get_type_id of a Polygon


# --- exact tracing of one mask ---------------------------------------------------------


def _runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (row, start, stop) of every run of True along axis 1, with stop exclusive."""
    padded = np.zeros((flags.shape[0], flags.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = flags
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, stops = np.nonzero(steps == -1)
    return rows, starts, stops


def _boundary_segments(foreground: np.ndarray) -> tuple[np.ndarray, ...]:
    """Find the maximal straight boundary segments of a zero-padded foreground mask.

    Segments run along pixel edges and are directed so that the foreground lies on their
    right-hand side (with y pointing down). Collinear unit edges with the same direction
    are merged, so every segment end is a corner of the outline. Returns start x, start y,
    end x, end y and direction, in unpadded corner coordinates.
    """
    above, below = foreground[:-1, 1:-1], foreground[1:, 1:-1]
    left, right = foreground[1:-1, :-1], foreground[1:-1, 1:]
    parts = []

    # Horizontal lines y = 0..h: east where the pixel below is foreground, west above.
    y, x0, x1 = _runs(below & ~above)
    parts.append((x0, y, x1, y, np.full(y.size, EAST)))
    y, x0, x1 = _runs(above & ~below)
    parts.append((x1, y, x0, y, np.full(y.size, WEST)))

    # Vertical lines x = 0..w: south where the left pixel is foreground, north right.
    x, y0, y1 = _runs((left & ~right).T)
    parts.append((x, y0, x, y1, np.full(x.size, SOUTH)))
    x, y0, y1 = _runs((right & ~left).T)
    parts.append((x, y1, x, y0, np.full(x.size, NORTH)))

    # int32 halves the memory of the segment arrays; band sides are far below 2**31.
    return tuple(np.concatenate(column).astype(np.int32) for column in zip(*parts))


def _successors(
    start_x: np.ndarray,
    start_y: np.ndarray,
    end_x: np.ndarray,
    end_y: np.ndarray,
    direction: np.ndarray,
    labels: np.ndarray,
) -> np.ndarray:
    """Return, for every segment, the index of the segment that continues its ring.

    Each corner has one outgoing segment, except a saddle: a corner where two foreground
    pixels meet only diagonally, which has two. There the ring turns right (keeping the
    two pixels in separate rings) when they belong to different 4-connected regions, and
    left (joining them) when they belong to the same region. Joining same-region pixels
    turns the background they enclose into a hole that touches the outline at one point,
    which is valid, instead of an outline that touches itself, which is not.
    """
    stride = labels.shape[1] - 1  # corners per row = unpadded width + 1
    start_corner = start_y.astype(np.int64) * stride + start_x
    end_corner = end_y.astype(np.int64) * stride + end_x

    # Sort segments by start corner, and look up each corner's first one in a dense table.
    order = np.argsort(start_corner, kind="stable").astype(np.int32)
    sorted_corner = start_corner[order]
    first = np.ones(sorted_corner.size, dtype=bool)
    first[1:] = sorted_corner[1:] != sorted_corner[:-1]
    first_position = np.full(labels.shape[0] * stride, -1, dtype=np.int32)
    first_position[sorted_corner[first]] = np.nonzero(first)[0]
    position = first_position[end_corner]
    del first_position
    successor = order[position]

    # Saddles: the end corner starts a second segment.
    next_position = np.minimum(position + 1, sorted_corner.size - 1)
    saddle = np.nonzero(sorted_corner[next_position] == end_corner)[0]
    saddle = saddle[next_position[saddle] != position[saddle]]
    if saddle.size:
        cy, cx = end_y[saddle], end_x[saddle]
        top_left, top_right = labels[cy, cx], labels[cy, cx + 1]
        bottom_left, bottom_right = labels[cy + 1, cx], labels[cy + 1, cx + 1]
        same_region = np.where(top_left > 0, top_left == bottom_right, top_right == bottom_left)
        left_turn, right_turn = (direction[saddle] + 3) % 4, (direction[saddle] + 1) % 4
        expected_direction = np.where(same_region, left_turn, right_turn)
        first_choice = order[position[saddle]]
        second_choice = order[position[saddle] + 1]
        successor[saddle] = np.where(
            direction[first_choice] == expected_direction, first_choice, second_choice
        )
    return successor


def _order_rings(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group segments into rings and order each ring, by pointer doubling in numpy.

    Returns the segment indices sorted ring by ring in walking order, and the start
    offset of each ring in that array. Both loops run about log2(longest ring) times.
    """
    count = successor.size

    # Ring id = smallest segment index on the ring: after k rounds each entry is the
    # minimum over the next 2**k segments, and a round that changes nothing is final.
    ring = np.arange(count, dtype=successor.dtype)
    jump = successor.copy()
    while True:
        smaller = np.minimum(ring, ring[jump])
        jump = jump[jump]
        if np.array_equal(smaller, ring):
            break
        ring = smaller

    # Cut each ring before its head and rank every segment by its distance to the cut.
    head = ring == np.arange(count)
    tail = head[successor]
    jump = successor.copy()
    jump[tail] = np.nonzero(tail)[0]
    distance = (~tail).astype(successor.dtype)
    while True:
        next_jump = jump[jump]
        if np.array_equal(next_jump, jump):
            break
        distance = distance + distance[jump]
        jump = next_jump

    # One int64 key sorts by ring, then by walking order (largest distance first).
    walk = np.argsort(ring.astype(np.int64) * count + (count - 1 - distance))
    ring_sorted = ring[walk]
    starts = np.nonzero(np.r_[True, ring_sorted[1:] != ring_sorted[:-1]])[0]
    return walk, starts


def trace_mask(mask: np.ndarray, *, row0: int = 0) -> np.ndarray:
    """Trace a boolean mask into exact pixel-boundary polygons with holes.

    Returns one shapely Polygon per 4-connected foreground region, in pixel-corner
    coordinates (x = column, y = row + ``row0``), as a numpy object array. Each polygon's
    area equals its pixel count and every polygon is valid. Regions that touch only at a
    corner stay separate polygons, and a region inside another's hole is its own polygon.
    """
    polygons, _ = _trace_band(mask, row0=row0, min_region_px=0, open_top=False, open_bottom=False)
    return polygons


def _trace_band(
    mask: np.ndarray, *, row0: int, min_region_px: float, open_top: bool, open_bottom: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """Trace one band like ``trace_mask``, leaving out regions below ``min_region_px``.

    Only regions that cannot grow are left out: those that do not touch an open edge
    (the first row when ``open_top``, the last row when ``open_bottom``). Dropping them
    before any shapely object exists keeps noisy maps fast. Returns the polygons and
    the number and pixel count of the regions left out.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    height, width = mask.shape

    # Label regions into a zero-padded frame, so every pixel has four neighbours.
    labels = np.zeros((height + 2, width + 2), dtype=np.int32)
    n_regions = ndi.label(mask, structure=FOUR_CONNECTED, output=labels[1:-1, 1:-1])

    # Drop small complete regions and renumber the rest 1..n without gaps.
    dropped = (0, 0)
    if n_regions and min_region_px > 0:
        sizes = np.bincount(labels.ravel(), minlength=n_regions + 1)
        small = sizes < min_region_px
        small[0] = False
        if open_top:
            small[labels[1, 1:-1]] = False
        if open_bottom:
            small[labels[-2, 1:-1]] = False
        if small.any():
            dropped = (int(small.sum()), int(sizes[small].sum()))
            keep = ~small
            keep[0] = False
            labels = np.where(keep, np.cumsum(keep), 0).astype(np.int32)[labels]
            n_regions -= dropped[0]
    if n_regions == 0:
        return np.empty(0, dtype=object), dropped

    # Link boundary segments into rings and walk each ring in order.
    start_x, start_y, end_x, end_y, direction = _boundary_segments(labels > 0)
    successor = _successors(start_x, start_y, end_x, end_y, direction, labels)
    walk, starts = _order_rings(successor)
    n_segments = walk.size
    ends = np.r_[starts[1:], n_segments]
    lengths = ends - starts
    x = start_x[walk].astype(np.float64)
    y = start_y[walk].astype(np.float64) + row0

    # Signed area by the shoelace formula: outlines are positive, holes negative.
    following = np.arange(1, n_segments + 1)
    following[ends - 1] = starts
    twice_area = np.add.reduceat(x * y[following] - x[following] * y, starts)
    is_hole = twice_area < 0

    # Region of each ring: the label of the foreground pixel right of its first segment.
    head = walk[starts]
    head_x, head_y, head_direction = start_x[head], start_y[head], direction[head]
    pixel_row = np.where((head_direction == EAST) | (head_direction == SOUTH), head_y + 1, head_y)
    pixel_col = np.where((head_direction == EAST) | (head_direction == NORTH), head_x + 1, head_x)
    region = labels[pixel_row, pixel_col]

    # Rings ordered region by region, outline first, each closed by repeating its start.
    ring_order = np.lexsort((is_hole, region))
    ring_lengths = lengths[ring_order] + 1
    ring_index = np.repeat(np.arange(ring_order.size), ring_lengths)
    ring_starts = np.cumsum(ring_lengths) - ring_lengths
    offset = np.arange(ring_lengths.sum()) - np.repeat(ring_starts, ring_lengths)
    offset[offset == np.repeat(ring_lengths - 1, ring_lengths)] = 0
    gather = np.repeat(starts[ring_order], ring_lengths) + offset
    rings = shapely.linearrings(np.column_stack([x[gather], y[gather]]), indices=ring_index)
    return shapely.polygons(rings, indices=region[ring_order] - 1), dropped


# --- regions across bands ---------------------------------------------------------------


def _union_touching(above: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Union each group of polygons that touch across a border, and pass the rest through.

    ``above`` and ``below`` have disjoint interiors, each within its own side. Grouping
    first keeps every union small: one union of all polygons along a noisy border took
    seconds per band, a union per touching group takes milliseconds.
    """
    if above.size == 0 or below.size == 0:
        return np.concatenate([above, below])
    above_index, below_index = shapely.STRtree(below).query(above, predicate="intersects")
    if above_index.size == 0:
        return np.concatenate([above, below])

    # Groups = connected components of the graph whose edges are touching pairs.
    polygons = np.concatenate([above, below])
    edges = scipy.sparse.coo_matrix(
        (np.ones(above_index.size), (above_index, above.size + below_index)),
        shape=(polygons.size, polygons.size),
    )
    _, group = scipy.sparse.csgraph.connected_components(edges, directed=False)
    group_size = np.bincount(group)
    alone = group_size[group] == 1
    joined = [polygons[alone]]

    members = np.nonzero(~alone)[0]
    members = members[np.argsort(group[members], kind="stable")]
    cuts = np.nonzero(np.diff(group[members]))[0] + 1
    for member_indices in np.split(members, cuts):
        # Polygons that touch only at a corner come back as separate parts.
        joined.append(shapely.get_parts(shapely.union_all(polygons[member_indices])))
    return np.concatenate(joined)


def _merge_band(
    carried: np.ndarray, polygons: np.ndarray, row0: int, row1: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a band's polygons with the regions left open above it.

    Returns (finished, open): open regions reach the band's last row, so pixels below may
    still join them. Polygons that only touch at a corner across the border stay apart,
    as they do inside a band.
    """
    if carried.size and polygons.size:
        touches_top = shapely.bounds(polygons)[:, 1] == row0
        joined = _union_touching(carried, polygons[touches_top])
        candidates = np.concatenate([joined, polygons[~touches_top]])
    elif carried.size:
        candidates = carried
    else:
        candidates = polygons
    if candidates.size == 0 or row1 >= height:
        return candidates, np.empty(0, dtype=object)
    still_open = shapely.bounds(candidates)[:, 3] == row1
    return candidates[~still_open], candidates[still_open]


class TissueClip:
    """The tissue mask looked up at map pixels, so tumour is only traced inside tissue.

    Patches overhang the tissue's edge and the slide's edge, and the model predicts on
    their white part too. Tumour outside tissue is not tumour, and a tumour fraction of
    tissue above 1 would make no sense, so every map pixel whose centre falls outside
    the tissue mask (or outside the slide) is background. The mask is the small
    tissue-detection image (at most a few thousand px a side), so it is held whole.
    """

    def __init__(self, mask: np.ndarray, mask_downsample_x: float, mask_downsample_y: float,
                 level0_downsample: float, slide_width_px: float | None = None,
                 slide_height_px: float | None = None) -> None:
        self.mask = mask
        self.mask_downsample_x = mask_downsample_x
        self.mask_downsample_y = mask_downsample_y
        self.level0_downsample = level0_downsample
        self.slide_width_px = slide_width_px
        self.slide_height_px = slide_height_px

    @classmethod
    def from_files(cls, mask_png: str | os.PathLike, tissue: dict[str, Any],
                   level0_downsample: float, slide: dict[str, Any] | None = None) -> "TissueClip":
        """Load the tissue mask PNG with the downsamples recorded in tissue.json."""
        with Image.open(mask_png) as image:
            mask = np.asarray(image.convert("L")) > 0
        slide = slide or {}
        return cls(mask, float(tissue.get("mask_downsample_x") or 1.0),
                   float(tissue.get("mask_downsample_y") or 1.0), level0_downsample,
                   slide.get("width"), slide.get("height"))

    def rows(self, row0: int, row1: int, width: int) -> np.ndarray:
        """Return a boolean (row1 - row0, width) array: True where a map pixel is tissue.

        With the slide's size known, a map pixel must also lie wholly on the slide, so no
        polygon reaches past the slide's edge.
        """
        mask_height, mask_width = self.mask.shape
        centres_y = (np.arange(row0, row1) + 0.5) * self.level0_downsample
        centres_x = (np.arange(width) + 0.5) * self.level0_downsample
        mask_rows = np.floor(centres_y / self.mask_downsample_y).astype(np.int64)
        mask_cols = np.floor(centres_x / self.mask_downsample_x).astype(np.int64)
        row_ok = (mask_rows >= 0) & (mask_rows < mask_height)
        col_ok = (mask_cols >= 0) & (mask_cols < mask_width)
        if self.slide_height_px:
            row_ok &= (np.arange(row0, row1) + 1) * self.level0_downsample <= self.slide_height_px + 1e-6
        if self.slide_width_px:
            col_ok &= (np.arange(width) + 1) * self.level0_downsample <= self.slide_width_px + 1e-6
        inside = np.zeros((row1 - row0, width), dtype=bool)
        rows_inside = np.flatnonzero(row_ok)
        cols_inside = np.flatnonzero(col_ok)
        if rows_inside.size and cols_inside.size:
            inside[np.ix_(rows_inside, cols_inside)] = self.mask[
                np.ix_(mask_rows[rows_inside], mask_cols[cols_inside])
            ]
        return inside


def _read_mask(probability: zarr.Array, row0: int, row1: int, threshold: float,
               clip: TissueClip | None = None) -> np.ndarray:
    """Threshold rows row0..row1 of the map, one chunk column at a time."""
    width = probability.shape[1]
    chunk_width = probability.chunks[1]
    mask = np.empty((row1 - row0, width), dtype=bool)
    for col0 in range(0, width, chunk_width):
        col1 = min(width, col0 + chunk_width)
        mask[:, col0:col1] = probability[row0:row1, col0:col1] >= threshold
    if clip is not None:
        mask &= clip.rows(row0, row1, width)
    return mask


class FinishedRegions(NamedTuple):
    """Regions that no later row can join, and the small regions left out of them."""

    polygons: np.ndarray  # shapely Polygons in map pixels
    n_dropped: int
    dropped_px: int


def iter_regions(
    probability: zarr.Array,
    *,
    threshold: float,
    min_region_px: float = 0.0,
    max_band_px: int = DEFAULT_MAX_BAND_PX,
    clip: TissueClip | None = None,
) -> Iterator[FinishedRegions]:
    """Yield the map's regions band by band, top of the map first.

    Pixels at or above ``threshold`` are foreground, and with ``clip`` only those inside
    the tissue mask. Regions below ``min_region_px`` map
    pixels that lie inside one band are left out and counted. Regions that span bands
    are yielded whole, whatever their size, for the caller to filter.
    """
    height, width = probability.shape
    if height == 0 or width == 0:
        return
    band_rows = max(1, min(height, max_band_px // width))
    chunk_rows = probability.chunks[0]
    read_rows = chunk_rows if chunk_rows * width <= MAX_MASK_PX else band_rows

    carried = np.empty(0, dtype=object)
    for read0 in range(0, height, read_rows):
        read1 = min(height, read0 + read_rows)
        mask = _read_mask(probability, read0, read1, threshold, clip)
        for row0 in range(read0, read1, band_rows):
            row1 = min(read1, row0 + band_rows)
            polygons, (n_dropped, dropped_px) = _trace_band(
                mask[row0 - read0 : row1 - read0],
                row0=row0,
                min_region_px=min_region_px,
                open_top=row0 > 0,
                open_bottom=row1 < height,
            )
            finished, carried = _merge_band(carried, polygons, row0, row1, height)
            if finished.size or n_dropped:
                yield FinishedRegions(finished, n_dropped, dropped_px)


# --- features and statistics ------------------------------------------------------------


@dataclass
class RegionTotals:
    """Running totals over the features written for one slide (areas in level-0 px²)."""

    n_regions: int = 0
    area_px_level0: float = 0.0
    largest_px_level0: float = 0.0
    n_specks_removed: int = 0


def _finish_regions(
    regions: np.ndarray,
    *,
    min_area_map_px: float,
    simplify_tolerance_px: float,
    level0_downsample: float,
    totals: RegionTotals,
) -> tuple[np.ndarray, np.ndarray]:
    """Repair, filter, simplify, explode and scale regions given in map pixels.

    Returns level-0 Polygons and their areas in level-0 px². A region that stays one
    polygon keeps its exact pixel area, measured before simplification. The parts of a
    region that simplification splits get their own simplified areas.
    """
    # Repair: traced and merged regions are valid by construction, so this is a guard.
    invalid = ~shapely.is_valid(regions)
    if invalid.any():
        logger.warning("repairing %d invalid traced regions", int(invalid.sum()))
        regions = regions.copy()
        regions[invalid] = shapely.make_valid(regions[invalid])

    # Drop specks below the minimum area.
    exact_area = shapely.area(regions)
    speck = exact_area < max(min_area_map_px, np.finfo(float).tiny)
    totals.n_specks_removed += int(speck.sum())
    regions, exact_area = regions[~speck], exact_area[~speck]

    # Simplify in map pixels. GEOS's topology-preserving simplifier keeps every shell and
    # hole, so no ring collapses, but the result is still checked.
    if simplify_tolerance_px > 0 and regions.size:
        regions = shapely.simplify(regions, simplify_tolerance_px, preserve_topology=True)
        invalid = ~shapely.is_valid(regions)
        if invalid.any():
            regions = regions.copy()
            regions[invalid] = shapely.make_valid(regions[invalid])

    # Explode into single Polygons. Lines that make_valid may leave have no area and go.
    parts, parent = shapely.get_parts(regions, return_index=True)
    part_area = shapely.area(parts)
    keep = (shapely.get_type_id(parts) == POLYGON_TYPE_ID) & (part_area > 0)
    parts, parent, part_area = parts[keep], parent[keep], part_area[keep]
    n_parts = np.bincount(parent, minlength=regions.size)
    area_map_px = np.where(n_parts[parent] == 1, exact_area[parent], part_area)

    # Scale to level-0 pixels. Outlines run counter-clockwise in x/y numbers, holes
    # clockwise, as RFC 7946 recommends.
    scaled = shapely.transform(parts, lambda coords: coords * level0_downsample)
    scaled = shapely.orient_polygons(scaled)

    return _round_coordinates(scaled), area_map_px * level0_downsample**2


def _round_coordinates(polygons: np.ndarray) -> np.ndarray:
    """Round to 0.01 px as QuPath's exports do, unless rounding makes a polygon invalid."""
    rounded = shapely.set_precision(polygons, 0.01, mode="pointwise")
    return np.where(shapely.is_valid(rounded), rounded, polygons)


def format_model_weights(weights: Any) -> str | None:
    """Format the map's ``weights`` attribute as ``file sha256=<hex>`` entries or ``untrained``."""
    if weights is None:
        return None
    if isinstance(weights, str):
        return weights
    entries = []
    for entry in weights:
        if isinstance(entry, dict):
            entries.append(f"{entry.get('file')} sha256={entry.get('sha256')}")
        else:
            entries.append(str(entry))
    return "; ".join(entries)


def _load_json(path: str | os.PathLike, description: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except FileNotFoundError as error:
        raise ArtefactError(f"{description} not found: {path}") from error
    except json.JSONDecodeError as error:
        raise ArtefactError(f"{description} {path} is not valid JSON: {error}") from error


def _open_map(path: str | os.PathLike, slide_id: str) -> zarr.Group:
    if not Path(path).is_dir():
        raise ArtefactError(f"probability map not found: {path}", slide_id)
    try:
        return zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ArtefactError(f"failed to open probability map {path}: {error}", slide_id) from error


def _combined_status(*artefacts: dict[str, Any]) -> tuple[str, str]:
    """Return the slide's status and message after the stages that wrote ``artefacts``.

    A status that stops processing (unreadable, no_tissue, failed) wins over no_mpp, and
    no_mpp wins over ok. Among equals, the earliest artefact wins.
    """
    statuses = [artefact.get("status") or status.OK for artefact in artefacts]
    for value, artefact in zip(statuses, artefacts):
        if not status.is_processable(value):
            return value, artefact.get("message") or ""
    for value, artefact in zip(statuses, artefacts):
        if value != status.OK:
            return value, artefact.get("message") or ""
    return status.OK, artefacts[-1].get("message") or ""


def _check_options(
    slide_id: str,
    threshold: float,
    min_area_um2: float,
    min_area_px: float,
    simplify_tolerance_px: float,
    max_band_px: int,
) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold!r}", slide_id)
    if min_area_um2 < 0 or min_area_px < 0:
        raise ConfigError(
            f"minimum areas must be >= 0, got min_area_um2={min_area_um2!r}, "
            f"min_area_px={min_area_px!r}",
            slide_id,
        )
    if simplify_tolerance_px < 0:
        raise ConfigError(
            f"simplify_tolerance_px must be >= 0, got {simplify_tolerance_px!r}", slide_id
        )
    if max_band_px < 1:
        raise ConfigError(f"max_band_px must be >= 1, got {max_band_px!r}", slide_id)


def _mm2(area_px_level0: float | None, mpp_x: float | None, mpp_y: float | None) -> float | None:
    if area_px_level0 is None or mpp_x is None or mpp_y is None:
        return None
    return area_px_level0 * mpp_x * mpp_y / 1e6


def run_vectorise(
    probability_zarr: str | os.PathLike,
    slide_json: str | os.PathLike,
    tissue_json: str | os.PathLike,
    out_geojson: str | os.PathLike,
    out_stats_json: str | os.PathLike,
    *,
    threshold: float = 0.5,
    min_area_um2: float = 1000.0,
    min_area_px: float = 4000.0,
    simplify_tolerance_px: float = 1.0,
    class_name: str = "Tumor",
    class_color: Sequence[int] = (200, 0, 0),
    bounds_geojson: str | os.PathLike | None = None,
    max_band_px: int = DEFAULT_MAX_BAND_PX,
    tissue_mask_png: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the slide's tumour polygons as GeoJSON and its statistics as JSON.

    Pixels with probability >= ``threshold`` are tumour; with ``tissue_mask_png`` only
    those inside the tissue mask (see TissueClip), so tumour_fraction stays within 1
    up to the mask's resolution. Regions smaller than
    ``min_area_um2`` (or ``min_area_px`` level-0 px² where the MPP is unknown) are
    dropped. ``simplify_tolerance_px`` is in map pixels. Coordinates are level-0 pixels
    of the full slide. ``bounds_geojson``, when given, receives a second copy shifted by
    the slide's bounds offset, which lines up with QuPath's cropped view of MIRAX and
    Leica slides. A slide that an earlier stage could not process gets an empty
    FeatureCollection and statistics carrying its status. Returns the statistics.
    """
    started = time.perf_counter()
    slide = _load_json(slide_json, "slide metadata")
    tissue = _load_json(tissue_json, "tissue metadata")
    slide_id = str(slide.get("slide_id"))
    _check_options(
        slide_id, threshold, min_area_um2, min_area_px, simplify_tolerance_px, max_band_px
    )
    color = geojson.check_rgb(class_color)

    # The map's attributes carry the scale and the status of the stages before it.
    group = _open_map(probability_zarr, slide_id)
    attrs = dict(group.attrs)
    if attrs.get("slide_id") not in (None, slide_id):
        raise ArtefactError(
            f"probability map {probability_zarr} belongs to slide {attrs.get('slide_id')!r}",
            slide_id,
        )
    slide_status, message = _combined_status(slide, tissue, attrs)
    mpp_x, mpp_y = slide.get("mpp_x"), slide.get("mpp_y")
    level0_downsample = float(attrs.get("level0_downsample") or 1.0)
    model_weights = format_model_weights(attrs.get("weights"))

    # Minimum area in map px²: from µm² where the level-0 MPP is known, else level-0 px².
    if mpp_x and mpp_y:
        min_area_px_level0 = min_area_um2 / (mpp_x * mpp_y)
    else:
        min_area_px_level0 = min_area_px
    min_area_map_px = min_area_px_level0 / level0_downsample**2

    bounds_x = float(slide.get("bounds_x") or 0)
    bounds_y = float(slide.get("bounds_y") or 0)
    totals = RegionTotals()
    processed = status.is_processable(slide_status)
    if processed and "probability" not in group:
        raise ArtefactError(
            f"probability map {probability_zarr} has no 'probability' array", slide_id
        )

    # Trace, finish and write the regions as they complete, so no slide-sized list exists.
    shifted_context = (
        geojson.FeatureCollectionWriter(bounds_geojson)
        if bounds_geojson is not None
        else contextlib.nullcontext()
    )
    with geojson.FeatureCollectionWriter(out_geojson) as writer, shifted_context as shifted:
        if processed:
            batches = iter_regions(
                group["probability"],
                threshold=threshold,
                min_region_px=min_area_map_px,
                max_band_px=max_band_px,
                clip=(
                    TissueClip.from_files(tissue_mask_png, tissue, level0_downsample, slide)
                    if tissue_mask_png is not None
                    else None
                ),
            )
            for batch in batches:
                totals.n_specks_removed += batch.n_dropped
                polygons, areas = _finish_regions(
                    batch.polygons,
                    min_area_map_px=min_area_map_px,
                    simplify_tolerance_px=simplify_tolerance_px,
                    level0_downsample=level0_downsample,
                    totals=totals,
                )
                _write_features(
                    writer, shifted, polygons, areas,
                    slide_id=slide_id, class_name=class_name, class_color=color,
                    mpp_x=mpp_x, mpp_y=mpp_y, model_weights=model_weights,
                    bounds_x=bounds_x, bounds_y=bounds_y, totals=totals,
                )

    # Statistics: areas only where computed, mm² only where the MPP is known.
    computed = processed or slide_status == status.NO_TISSUE
    tumour_px = totals.area_px_level0 if computed else None
    largest_px = totals.largest_px_level0 if computed else None
    tissue_px = tissue.get("tissue_area_px_level0")
    # Without a tissue mask to clip to, patch footprints overhang the tissue's edge and
    # the fraction can exceed 1.
    fraction = tumour_px / tissue_px if tumour_px is not None and tissue_px else None
    stats = {
        "slide_id": slide_id,
        "path": slide.get("path"),
        "status": slide_status,
        "message": message,
        "vendor": slide.get("vendor"),
        "width": slide.get("width"),
        "height": slide.get("height"),
        "mpp_x": mpp_x,
        "mpp_y": mpp_y,
        "mpp_source": slide.get("mpp_source"),
        "bounds_x": slide.get("bounds_x"),
        "bounds_y": slide.get("bounds_y"),
        "bounds_width": slide.get("bounds_width"),
        "bounds_height": slide.get("bounds_height"),
        "tissue_area_mm2": tissue.get("tissue_area_mm2"),
        "tissue_area_px_level0": tissue_px,
        "tumour_area_mm2": _mm2(tumour_px, mpp_x, mpp_y),
        "tumour_area_px_level0": tumour_px,
        "tumour_fraction": fraction,
        "n_tumour_regions": totals.n_regions if computed else None,
        "largest_region_mm2": _mm2(largest_px, mpp_x, mpp_y),
        "largest_region_px_level0": largest_px,
        "n_specks_removed": totals.n_specks_removed if computed else None,
        "threshold": threshold,
        "min_area_um2": min_area_um2 if mpp_x and mpp_y else None,
        "min_area_px_level0": min_area_px_level0,
        "simplify_tolerance_px": simplify_tolerance_px,
        "output_downsample": attrs.get("output_downsample"),
        "level0_downsample": attrs.get("level0_downsample"),
        "model_weights": model_weights,
        "preprocessing": attrs.get("preprocessing"),
        "wsiseg_version": __version__,
    }
    write_json(out_stats_json, stats)
    logger.info(
        "slide %s: %s, %d tumour regions, %.0f level-0 px² (%d specks dropped) in %.1f s",
        slide_id, slide_status, totals.n_regions, totals.area_px_level0,
        totals.n_specks_removed, time.perf_counter() - started,
    )
    return stats


def _write_features(
    writer: geojson.FeatureCollectionWriter,
    shifted_writer: geojson.FeatureCollectionWriter | None,
    polygons: np.ndarray,
    areas_px_level0: np.ndarray,
    *,
    slide_id: str,
    class_name: str,
    class_color: list[int],
    mpp_x: float | None,
    mpp_y: float | None,
    model_weights: str | None,
    bounds_x: float,
    bounds_y: float,
    totals: RegionTotals,
) -> None:
    if polygons.size == 0:
        return
    geometry_texts = shapely.to_geojson(polygons)
    if shifted_writer is not None:
        moved = shapely.transform(polygons, lambda coords: coords - [bounds_x, bounds_y])
        shifted_texts = shapely.to_geojson(_round_coordinates(moved))

    for index, (geometry_text, area_px) in enumerate(zip(geometry_texts, areas_px_level0)):
        area_px = float(area_px)
        area_um2 = area_px * mpp_x * mpp_y if mpp_x and mpp_y else None
        properties = geojson.annotation_properties(
            class_name=class_name,
            class_color=class_color,
            measurements={geojson.AREA_UM2: area_um2, geojson.AREA_PX: area_px},
            extra={"model_weights": model_weights},
        )
        id_ = geojson.feature_id(slide_id, geometry_text)
        writer.write_text(
            geojson.feature_text(id_=id_, geometry_json=geometry_text, properties=properties)
        )
        if shifted_writer is not None:
            shifted_writer.write_text(
                geojson.feature_text(
                    id_=id_, geometry_json=shifted_texts[index], properties=properties
                )
            )
        totals.n_regions += 1
        totals.area_px_level0 += area_px
        totals.largest_px_level0 = max(totals.largest_px_level0, area_px)
