"""Synthetic whole-slide images with known content, for tests and benchmarks.

Every generator writes a tiled TIFF with tifffile, one tile at a time, so memory stays at
a few tiles whatever the slide's size. OpenSlide reads the result as a ``generic-tiff``
slide: each pyramid level is a separate tiled page, largest first, and the MPP comes from
the TIFF resolution tags.

The scene is a set of tissue-coloured discs on a white or pale background, so tissue
areas have an analytic value (sum of pi r^2). Tiles that lie wholly inside or wholly
outside every disc are identical, so each distinct tile is encoded once and every copy in
the file points at the same bytes (TIFF allows tiles to share an offset). That makes a
100,000 x 100,000 px pyramid with textured tissue about 50 MB on disk (30 GB as raw RGB)
and seconds to write.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

logger = logging.getLogger(__name__)

WHITE_RGB = (255, 255, 255)
TISSUE_RGB = (200, 110, 165)  # eosin-pink with some haematoxylin: saturation ~0.45
PALE_RGB = (247, 242, 245)  # a barely stained slide: saturation ~0.02

_UM_PER_CM = 10_000.0
_UM_PER_INCH = 25_400.0


@dataclasses.dataclass(frozen=True)
class Disc:
    """A disc of tissue in level-0 pixels."""

    x_px: float
    y_px: float
    radius_px: float


@dataclasses.dataclass(frozen=True)
class SyntheticSlide:
    """A written synthetic slide and the facts a test can check against."""

    path: Path
    width_px: int
    height_px: int
    mpp_um: float | None
    level_dimensions: tuple[tuple[int, int], ...]
    discs: tuple[Disc, ...]
    file_size_bytes: int

    @property
    def tissue_area_px_level0(self) -> float:
        """Analytic tissue area in level-0 px (discs are placed inside the slide, apart)."""
        return float(sum(math.pi * disc.radius_px**2 for disc in self.discs))

    @property
    def tissue_area_mm2(self) -> float | None:
        """Analytic tissue area in mm², or None without an MPP."""
        if self.mpp_um is None:
            return None
        return self.tissue_area_px_level0 * self.mpp_um**2 / 1e6


def write_slide(
    path: str | os.PathLike,
    *,
    width_px: int,
    height_px: int,
    mpp_um: float | None = 0.5,
    discs: Sequence[Disc] = (),
    level_downsamples: Sequence[float] = (1.0, 4.0, 16.0),
    tile_px: int = 256,
    compression: str = "jpeg",
    jpeg_quality: int = 90,
    resolution_unit: str = "centimeter",
    tissue_rgb: tuple[int, int, int] = TISSUE_RGB,
    background_rgb: tuple[int, int, int] = WHITE_RGB,
    background_noise: int = 0,
    texture: bool = False,
    black_band_px: int = 0,
    seed: int = 0,
) -> SyntheticSlide:
    """Write a tiled pyramidal TIFF of discs on a background and return its description.

    ``level_downsamples`` may hold non-integer factors: level ``k`` is
    ``round(width_px / f_k) x round(height_px / f_k)``, so OpenSlide reports the
    downsamples that those sizes imply (for example 4.000152 rather than 4). Every level
    is rendered from the same discs at its own scale.

    ``mpp_um`` is written as TIFF resolution tags in ``resolution_unit`` ("centimeter"
    or "inch"); ``mpp_um=None`` writes no usable resolution. ``compression`` is "jpeg"
    (YCbCr, 4:2:0), "deflate" (lossless) or "none". ``background_noise`` adds a fixed
    noise pattern of that amplitude (grey levels) to the background, and ``texture``
    draws nuclei-like dots on the tissue, so tiles decode at a realistic cost.
    ``black_band_px`` paints a noisy near-black band of that width (level-0 px) along
    the left edge, like the unscanned area that some scanners fill with black.
    """
    path = Path(path)
    if width_px < 1 or height_px < 1:
        raise ValueError(f"slide size must be positive, got {width_px} x {height_px} px")
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16 (JPEG 4:2:0 blocks), got {tile_px}")
    if not level_downsamples or level_downsamples[0] != 1.0:
        raise ValueError(f"level_downsamples must start with 1.0, got {list(level_downsamples)}")
    if any(b <= a for a, b in zip(level_downsamples, level_downsamples[1:])):
        raise ValueError(f"level_downsamples must increase, got {list(level_downsamples)}")
    if compression not in ("jpeg", "deflate", "none"):
        raise ValueError(f"compression must be jpeg, deflate or none, got {compression!r}")

    level_dimensions = tuple(
        (max(1, round(width_px / factor)), max(1, round(height_px / factor)))
        for factor in level_downsamples
    )
    resolution, unit = _resolution_tags(mpp_um, resolution_unit)
    rng = np.random.default_rng(seed)
    background_tile = _background_tile(tile_px, background_rgb, background_noise, rng)
    tissue_tile = _tissue_tile(tile_px, tissue_rgb, texture, rng)
    band_tile = _background_tile(tile_px, (12, 8, 10), 8, rng)

    # Level 0 over 4 GiB of raw pixels needs BigTIFF offsets.
    bigtiff = width_px * height_px * 3 > 2**32 - 2**25
    path.parent.mkdir(parents=True, exist_ok=True)
    shared_tiles: list[dict[int, int]] = []
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
        for level, (level_width, level_height) in enumerate(level_dimensions):
            scale_x = width_px / level_width
            scale_y = height_px / level_height
            classes = _classify_tiles(
                level_width, level_height, tile_px, discs, black_band_px, scale_x, scale_y
            )
            encoder = _TileEncoder(compression, jpeg_quality)
            renderer = _TileRenderer(
                tile_px, discs, black_band_px, scale_x, scale_y,
                background_tile, tissue_tile, band_tile,
            )
            writer.write(
                _level_tiles(classes, renderer, encoder),
                shape=(level_height, level_width, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(tile_px, tile_px),
                compression=encoder.tifffile_compression,
                subsampling=(2, 2) if compression == "jpeg" else None,
                resolution=resolution,
                resolutionunit=unit,
                # OpenSlide takes a page after the first as a level only when it is
                # marked as a reduced-resolution image.
                subfiletype=1 if level else 0,
                metadata=None,
                software="wsiseg.synthetic",
            )
            shared_tiles.append(encoder.copies)

    _point_copies_at_first_tile(path, shared_tiles)
    slide = SyntheticSlide(
        path=path,
        width_px=width_px,
        height_px=height_px,
        mpp_um=mpp_um,
        level_dimensions=level_dimensions,
        discs=tuple(discs),
        file_size_bytes=path.stat().st_size,
    )
    logger.info(
        "wrote synthetic slide %s: %d x %d px, %d levels, %d discs, %.1f MB",
        path, width_px, height_px, len(level_dimensions), len(discs),
        slide.file_size_bytes / 1e6,
    )
    return slide


def disc_slide(
    path: str | os.PathLike,
    *,
    width_px: int = 4096,
    height_px: int = 3072,
    radius_px: float = 600.0,
    mpp_um: float | None = 0.5,
    **options,
) -> SyntheticSlide:
    """Write a slide with two discs of ``radius_px`` side by side on white."""
    discs = (
        Disc(width_px * 0.30, height_px * 0.5, radius_px),
        Disc(width_px * 0.70, height_px * 0.5, radius_px),
    )
    for disc in discs:
        if disc.x_px - radius_px < 0 or disc.y_px - radius_px < 0 or 2 * radius_px > width_px * 0.4:
            raise ValueError(f"radius {radius_px} px does not fit twice into {width_px} x {height_px} px")
    return write_slide(
        path, width_px=width_px, height_px=height_px, mpp_um=mpp_um, discs=discs, **options
    )


def blank_slide(
    path: str | os.PathLike,
    *,
    width_px: int = 2048,
    height_px: int = 2048,
    pale: bool = False,
    **options,
) -> SyntheticSlide:
    """Write a slide without tissue: plain white, or a very pale pink with faint noise."""
    if pale:
        options.setdefault("background_rgb", PALE_RGB)
        options.setdefault("background_noise", 3)
    return write_slide(path, width_px=width_px, height_px=height_px, discs=(), **options)


def huge_single_level_slide(
    path: str | os.PathLike,
    *,
    width_px: int = 60_000,
    height_px: int = 60_000,
    mpp_um: float = 0.5,
    **options,
) -> SyntheticSlide:
    """Write a one-level tiled TIFF, mostly white, with three discs of tissue.

    Such files (exports of a region, or scanners that write no pyramid) make any reader
    that loads a whole level run out of memory: 60,000 x 60,000 px is 10.8 GB as RGB.
    """
    radius_px = min(width_px, height_px) * 0.06
    discs = tuple(
        Disc(width_px * fraction, height_px * fraction, radius_px)
        for fraction in (0.25, 0.5, 0.75)
    )
    options.setdefault("tile_px", 512)
    return write_slide(
        path,
        width_px=width_px,
        height_px=height_px,
        mpp_um=mpp_um,
        discs=discs,
        level_downsamples=(1.0,),
        **options,
    )


def large_pyramid_slide(
    path: str | os.PathLike,
    *,
    size_px: int = 100_000,
    tissue_fraction: float = 0.3,
    mpp_um: float = 0.25,
    **options,
) -> SyntheticSlide:
    """Write a square JPEG pyramid with textured tissue over ``tissue_fraction`` of its area.

    The tissue is a 3 x 3 grid of equal discs. The default 100,000 x 100,000 px slide
    with levels 1, 4, 16 and 64 took 4 s to write and 49 MB of disk on a 2-core
    machine, because only tiles on a disc's edge are encoded one by one.
    """
    # Nine discs of radius r cover 9 pi r^2; centres W/3 apart keep them disjoint up to
    # a fraction of 9 pi / 36 = 0.785.
    if not 0.0 < tissue_fraction < 0.75:
        raise ValueError(f"tissue_fraction must be in (0, 0.75), got {tissue_fraction}")
    radius_px = size_px * math.sqrt(tissue_fraction / (9 * math.pi))
    centres = (size_px / 6, size_px / 2, size_px * 5 / 6)
    discs = tuple(Disc(x, y, radius_px) for y in centres for x in centres)
    options.setdefault("level_downsamples", (1.0, 4.0, 16.0, 64.0))
    options.setdefault("tile_px", 256)
    options.setdefault("texture", True)
    return write_slide(
        path, width_px=size_px, height_px=size_px, mpp_um=mpp_um, discs=discs, **options
    )


# --- helpers ---------------------------------------------------------------------------

# Tile classes: background only, tissue only, black band only, or a mix to render.
_OUTSIDE, _INSIDE, _BAND, _EDGE = 0, 1, 2, 3


def _resolution_tags(
    mpp_um: float | None, resolution_unit: str
) -> tuple[tuple[float, float] | None, str]:
    if mpp_um is None:
        return None, "NONE"
    if mpp_um <= 0:
        raise ValueError(f"mpp_um must be positive, got {mpp_um}")
    if resolution_unit == "centimeter":
        pixels_per_unit = _UM_PER_CM / mpp_um
        return (pixels_per_unit, pixels_per_unit), "CENTIMETER"
    if resolution_unit == "inch":
        pixels_per_unit = _UM_PER_INCH / mpp_um
        return (pixels_per_unit, pixels_per_unit), "INCH"
    raise ValueError(f"resolution_unit must be centimeter or inch, got {resolution_unit!r}")


def _background_tile(
    tile_px: int, rgb: tuple[int, int, int], noise: int, rng: np.random.Generator
) -> np.ndarray:
    tile = np.empty((tile_px, tile_px, 3), np.int16)
    tile[...] = rgb
    if noise:
        tile += rng.integers(-noise, noise + 1, size=tile.shape, dtype=np.int16)
    return np.clip(tile, 0, 255).astype(np.uint8)


def _tissue_tile(
    tile_px: int, rgb: tuple[int, int, int], texture: bool, rng: np.random.Generator
) -> np.ndarray:
    tile = np.empty((tile_px, tile_px, 3), np.int16)
    tile[...] = rgb
    if not texture:
        return tile.astype(np.uint8)

    # Grain of +-12 grey levels plus haematoxylin-purple nuclei of 3-6 px radius.
    tile += rng.integers(-12, 13, size=tile.shape, dtype=np.int16)
    yy, xx = np.mgrid[0:tile_px, 0:tile_px]
    for _ in range(tile_px * tile_px // 900):
        cx, cy = rng.uniform(0, tile_px, size=2)
        radius = rng.uniform(3.0, 6.0)
        # Nuclei wrap around the tile edge so that neighbouring tiles join up seamlessly.
        dx = np.minimum(np.abs(xx - cx), tile_px - np.abs(xx - cx))
        dy = np.minimum(np.abs(yy - cy), tile_px - np.abs(yy - cy))
        tile[dx * dx + dy * dy <= radius * radius] = (95, 60, 140)
    return np.clip(tile, 0, 255).astype(np.uint8)


def _classify_tiles(
    level_width: int,
    level_height: int,
    tile_px: int,
    discs: Sequence[Disc],
    black_band_px: int,
    scale_x: float,
    scale_y: float,
) -> np.ndarray:
    """Return each tile's class (see _OUTSIDE ... _EDGE), (tiles down, tiles across)."""
    tiles_down = math.ceil(level_height / tile_px)
    tiles_across = math.ceil(level_width / tile_px)
    classes = np.full((tiles_down, tiles_across), _OUTSIDE, np.uint8)

    # Tile boxes in level-0 px. A pixel belongs to a shape when its centre does, so the
    # box spans the outermost pixel centres.
    col = np.arange(tiles_across)
    row = np.arange(tiles_down)
    x0 = ((col * tile_px) + 0.5) * scale_x
    x1 = (np.minimum((col + 1) * tile_px, level_width) - 0.5) * scale_x
    y0 = ((row * tile_px) + 0.5) * scale_y
    y1 = (np.minimum((row + 1) * tile_px, level_height) - 0.5) * scale_y

    touched = np.zeros(classes.shape, bool)
    for disc in discs:
        # Nearest point of each box to the centre: outside when farther than r.
        near_dx = np.maximum(np.maximum(x0 - disc.x_px, disc.x_px - x1), 0.0)
        near_dy = np.maximum(np.maximum(y0 - disc.y_px, disc.y_px - y1), 0.0)
        touches = near_dy[:, None] ** 2 + near_dx[None, :] ** 2 <= disc.radius_px**2
        # Farthest corner of each box: inside when within r.
        far_dx = np.maximum(np.abs(x0 - disc.x_px), np.abs(x1 - disc.x_px))
        far_dy = np.maximum(np.abs(y0 - disc.y_px), np.abs(y1 - disc.y_px))
        covered = far_dy[:, None] ** 2 + far_dx[None, :] ** 2 <= disc.radius_px**2
        classes[covered] = _INSIDE
        touched |= touches & ~covered

    # A tile inside a disc is pure tissue, since discs are drawn over the band.
    band_full = np.broadcast_to(x1 < black_band_px, classes.shape)
    band_part = np.broadcast_to((x0 < black_band_px) & (x1 >= black_band_px), classes.shape)
    not_inside = classes != _INSIDE
    classes[not_inside & band_full] = _BAND
    classes[not_inside & (touched | band_part)] = _EDGE
    return classes


class _TileRenderer:
    """Renderer of one tile of one level: background, then the black band, then the discs."""

    def __init__(
        self,
        tile_px: int,
        discs: Sequence[Disc],
        black_band_px: int,
        scale_x: float,
        scale_y: float,
        background_tile: np.ndarray,
        tissue_tile: np.ndarray,
        band_tile: np.ndarray,
    ) -> None:
        self.tile_px = tile_px
        self.discs = discs
        self.black_band_px = black_band_px
        self.scale_x = scale_x
        self.scale_y = scale_y
        self.background_tile = background_tile
        self.tissue_tile = tissue_tile
        self.band_tile = band_tile

    def render(self, row: int, col: int) -> np.ndarray:
        offsets = np.arange(self.tile_px) + 0.5
        x_level0 = (col * self.tile_px + offsets) * self.scale_x
        y_level0 = (row * self.tile_px + offsets) * self.scale_y
        inside = np.zeros((self.tile_px, self.tile_px), bool)
        for disc in self.discs:
            dx2 = (x_level0 - disc.x_px) ** 2
            dy2 = (y_level0 - disc.y_px) ** 2
            inside |= dy2[:, None] + dx2[None, :] <= disc.radius_px**2
        band = np.broadcast_to((x_level0 < self.black_band_px)[None, :], inside.shape)
        tile = np.where(band[..., None], self.band_tile, self.background_tile)
        return np.where(inside[..., None], self.tissue_tile, tile)


class _TileEncoder:
    """Tile encoder with tifffile's settings that remembers which tiles repeat earlier bytes."""

    def __init__(self, compression: str, jpeg_quality: int) -> None:
        self.compression = compression
        self.jpeg_quality = jpeg_quality
        self.first_index: dict[object, int] = {}
        self.encoded: dict[object, bytes] = {}
        # Tile index -> index of the first tile with the same bytes.
        self.copies: dict[int, int] = {}

    @property
    def tifffile_compression(self) -> str | None:
        if self.compression == "jpeg":
            return "jpeg"
        if self.compression == "deflate":
            return "zlib"
        return None

    def encode(self, tile: np.ndarray) -> bytes:
        if self.compression == "jpeg":
            # The same arguments tifffile passes for RGB data with 2 x 2 subsampling, so the
            # tags it writes (Photometric YCbCr, YCbCrSubSampling) describe these bytes.
            return imagecodecs.jpeg8_encode(
                tile,
                level=self.jpeg_quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=(2, 2),
            )
        if self.compression == "deflate":
            return imagecodecs.zlib_encode(tile, level=6)
        return tile.tobytes()

    def encode_shared(self, key: object, index: int, tile: np.ndarray) -> tuple[bytes, int]:
        """Return (bytes to write, byte count): empty bytes for a repeat of ``key``."""
        if key in self.first_index:
            self.copies[index] = self.first_index[key]
            return b"", len(self.encoded[key])
        data = self.encode(tile)
        self.first_index[key] = index
        self.encoded[key] = data
        return data, len(data)


def _level_tiles(
    classes: np.ndarray, renderer: _TileRenderer, encoder: _TileEncoder
) -> Iterator[tuple[bytes, int]]:
    tiles_across = classes.shape[1]
    for (row, col), tile_class in np.ndenumerate(classes):
        index = row * tiles_across + col
        if tile_class == _OUTSIDE:
            yield encoder.encode_shared("background", index, renderer.background_tile)
        elif tile_class == _INSIDE:
            yield encoder.encode_shared("tissue", index, renderer.tissue_tile)
        elif tile_class == _BAND:
            yield encoder.encode_shared("band", index, renderer.band_tile)
        else:
            data = encoder.encode(renderer.render(row, col))
            yield data, len(data)


def _point_copies_at_first_tile(path: Path, shared_tiles: list[dict[int, int]]) -> None:
    """Rewrite the TileOffsets of repeated tiles to the offset of their first copy.

    tifffile wrote zero bytes for each repeat, so until this runs a repeat's offset
    points at whatever follows it.
    """
    patches: list[tuple[int, np.ndarray]] = []
    with tifffile.TiffFile(path) as tiff:
        byteorder = tiff.byteorder
        for page, copies in zip(tiff.pages, shared_tiles):
            if not copies:
                continue
            tag = page.tags["TileOffsets"]
            offsets = np.array(tag.value, dtype=np.uint64)
            repeats = np.fromiter(copies.keys(), np.int64, len(copies))
            firsts = np.fromiter(copies.values(), np.int64, len(copies))
            offsets[repeats] = offsets[firsts]
            item = "u8" if tiff.is_bigtiff else "u4"
            patches.append((tag.valueoffset, offsets.astype(byteorder + item)))

    with open(path, "r+b") as stream:
        for value_offset, offsets in patches:
            stream.seek(value_offset)
            stream.write(offsets.tobytes())
