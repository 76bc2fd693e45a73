"""Tests of wsiseg.stitch: shards built by hand in the inference output format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsiseg import status
from wsiseg.errors import ArtefactError, ConfigError
from wsiseg.stitch import run_stitch

SLIDE_ID = "slide-a"
DOWNSAMPLE = 4  # analysis pixels per output pixel
PATCH_OUT_PX = 8  # a 32 px patch at downsample 4
STRIDE_OUT_PX = 4  # a 16 px stride at downsample 4


def write_patch_store(
    path: Path,
    *,
    image_shape: tuple[int, int],
    n_patches: int,
    slide_status: str = status.OK,
    analysis_downsample: float = 2.0,
    mpp: float | None = 0.5,
    slide_id: str = SLIDE_ID,
) -> Path:
    """Write a patch store whose `image` array has no chunks, only its shape and attrs."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array(
        "image", shape=(*image_shape, 3), chunks=(64, 64, 3), dtype="uint8", fill_value=255
    )
    group.attrs.update(
        {
            "slide_id": slide_id,
            "patch_size_px": PATCH_OUT_PX * DOWNSAMPLE,
            "stride_px": STRIDE_OUT_PX * DOWNSAMPLE,
            "level": 0,
            "analysis_downsample": analysis_downsample,
            "mpp_x": mpp,
            "mpp_y": mpp,
            "n_patches": n_patches,
            "status": slide_status,
            "message": "" if slide_status == status.OK else f"status {slide_status}",
        }
    )
    return path


def write_shard(
    path: Path,
    *,
    index: int,
    row0: int,
    band_sum: np.ndarray,
    band_weight: np.ndarray,
    n_patches: int,
    variance_sum: np.ndarray | None = None,
    slide_id: str = SLIDE_ID,
    output_downsample: int = DOWNSAMPLE,
    chunks: tuple[int, int] = (16, 16),
) -> Path:
    """Write one prediction shard: `sum`, `weight` (and `variance_sum`) bands with out_row0."""
    group = zarr.open_group(str(path), mode="w")
    arrays = {"sum": band_sum, "weight": band_weight}
    if variance_sum is not None:
        arrays["variance_sum"] = variance_sum
    for name, values in arrays.items():
        array = group.create_array(
            name, shape=values.shape, chunks=chunks, dtype="float32", fill_value=0.0
        )
        if values.size:
            array[:] = values.astype(np.float32)
    group.attrs.update(
        {
            "slide_id": slide_id,
            "shard_index": index,
            "out_row0": row0,
            "output_downsample": output_downsample,
            "n_patches": n_patches,
            "weights": "untrained",
            "preprocessing": "digipathai",
            "tta": [],
            "precision": "float32",
            "device": "cpu",
            "status": status.OK,
        }
    )
    return path


def grid_patches(height_out: int, width_out: int) -> list[tuple[int, int]]:
    """Top-left output pixel of every patch of the grid, sorted by (row, col)."""
    return [
        (row, col)
        for row in range(0, height_out - PATCH_OUT_PX + 1, STRIDE_OUT_PX)
        for col in range(0, width_out - PATCH_OUT_PX + 1, STRIDE_OUT_PX)
    ]


def build_shards(
    tmp_path: Path,
    patch_maps: dict[tuple[int, int], np.ndarray],
    width_out: int,
    row_splits: list[int],
    *,
    window: np.ndarray | None = None,
) -> list[Path]:
    """Accumulate per-patch maps into shards that split the patch rows at `row_splits`.

    Shard k holds the patches whose top row is in [row_splits[k], row_splits[k + 1]), with
    a band from its first patch row to the bottom of its last patch.
    """
    window = np.ones((PATCH_OUT_PX, PATCH_OUT_PX)) if window is None else window
    paths = []
    for index, (start, stop) in enumerate(zip(row_splits[:-1], row_splits[1:])):
        members = {key: value for key, value in patch_maps.items() if start <= key[0] < stop}
        if members:
            row0 = min(key[0] for key in members)
            row1 = max(key[0] for key in members) + PATCH_OUT_PX
        else:
            row0 = row1 = start
        band_sum = np.zeros((row1 - row0, width_out))
        band_weight = np.zeros_like(band_sum)
        for (row, col), values in members.items():
            footprint = np.s_[row - row0 : row - row0 + PATCH_OUT_PX, col : col + PATCH_OUT_PX]
            band_sum[footprint] += window * values
            band_weight[footprint] += window
        paths.append(
            write_shard(
                tmp_path / f"shard-{index}.zarr",
                index=index,
                row0=row0,
                band_sum=band_sum,
                band_weight=band_weight,
                n_patches=len(members),
            )
        )
    return paths


def dyadic_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Probabilities that are multiples of 1/256, so sums and means are exact in float32."""
    return rng.integers(0, 257, size=shape) / 256.0


@pytest.mark.parametrize("chunk_px", [5, 16, 64])
def test_stitch_reproduces_known_map(tmp_path: Path, chunk_px: int) -> None:
    """Overlapping patches that agree with a known map stitch back to it exactly."""
    rng = np.random.default_rng(0)
    height_out, width_out = 36, 44
    known = dyadic_map(rng, (height_out, width_out))
    patches = grid_patches(height_out, width_out)
    # Leave out two patches so part of the map is not covered at all.
    patches = [key for key in patches if key not in {(0, 0), (0, 4)}]
    patch_maps = {key: known[key[0] : key[0] + 8, key[1] : key[1] + 8] for key in patches}
    # A weighting window with dyadic values keeps sums exact.
    window = np.full((PATCH_OUT_PX, PATCH_OUT_PX), 0.5)
    window[2:6, 2:6] = 1.0
    shards = build_shards(tmp_path, patch_maps, width_out, [0, 12, 20, 40], window=window)
    store = write_patch_store(
        tmp_path / "patches.zarr",
        image_shape=(height_out * DOWNSAMPLE - 3, width_out * DOWNSAMPLE - 1),
        n_patches=len(patches),
    )

    run_stitch(store, shards, tmp_path / "probability.zarr", chunk_px=chunk_px)

    covered = np.zeros((height_out, width_out), dtype=bool)
    for row, col in patches:
        covered[row : row + 8, col : col + 8] = True
    group = zarr.open_group(str(tmp_path / "probability.zarr"), mode="r")
    probability = group["probability"][:]
    assert probability.dtype == np.float32
    assert probability.shape == (height_out, width_out)
    np.testing.assert_array_equal(probability, np.where(covered, known, 0).astype(np.float32))
    np.testing.assert_array_equal(group["coverage"][:], covered.astype(np.uint8))
    assert group["probability"].chunks == (chunk_px, chunk_px)


def test_stitch_averages_disagreeing_patches(tmp_path: Path) -> None:
    """Where patches disagree, the map is their mean, computed patch by patch."""
    rng = np.random.default_rng(1)
    height_out, width_out = 28, 24
    patches = grid_patches(height_out, width_out)
    patch_maps = {key: rng.random((PATCH_OUT_PX, PATCH_OUT_PX)) for key in patches}
    shards = build_shards(tmp_path, patch_maps, width_out, [0, 8, 100])
    store = write_patch_store(
        tmp_path / "patches.zarr",
        image_shape=(height_out * DOWNSAMPLE, width_out * DOWNSAMPLE),
        n_patches=len(patches),
    )

    run_stitch(store, shards, tmp_path / "probability.zarr", chunk_px=16)

    total = np.zeros((height_out, width_out))
    count = np.zeros_like(total)
    for (row, col), values in patch_maps.items():
        total[row : row + 8, col : col + 8] += values
        count[row : row + 8, col : col + 8] += 1
    probability = zarr.open_group(str(tmp_path / "probability.zarr"), mode="r")["probability"][:]
    np.testing.assert_allclose(probability, total / count, rtol=0, atol=1e-6)


def test_stitch_attributes(tmp_path: Path) -> None:
    """The map records its downsamples, MPP, weights and the slide's status."""
    height_out, width_out = 12, 12
    patches = grid_patches(height_out, width_out)
    patch_maps = {key: np.full((8, 8), 0.25) for key in patches}
    shards = build_shards(tmp_path, patch_maps, width_out, [0, 100])
    store = write_patch_store(
        tmp_path / "patches.zarr",
        image_shape=(height_out * DOWNSAMPLE, width_out * DOWNSAMPLE),
        n_patches=len(patches),
        analysis_downsample=2.000076,
        mpp=0.25,
    )

    returned = run_stitch(store, shards, tmp_path / "probability.zarr")

    attrs = dict(zarr.open_group(str(tmp_path / "probability.zarr"), mode="r").attrs)
    assert attrs == returned
    assert attrs["slide_id"] == SLIDE_ID
    assert attrs["status"] == status.OK
    assert attrs["output_downsample"] == DOWNSAMPLE
    assert attrs["level0_downsample"] == pytest.approx(2.000076 * DOWNSAMPLE)
    assert attrs["mpp_x"] == pytest.approx(0.25 * DOWNSAMPLE)
    assert attrs["weights"] == "untrained"
    assert attrs["n_patches"] == len(patches)


def test_stitch_variance_mean(tmp_path: Path) -> None:
    """Shards with variance_sum give a variance map of sum / weight."""
    band_sum = np.full((8, 8), 1.5)
    band_weight = np.full((8, 8), 2.0)
    variance_sum = np.full((8, 8), 0.5)
    shard = write_shard(
        tmp_path / "shard-0.zarr", index=0, row0=0, band_sum=band_sum,
        band_weight=band_weight, n_patches=2, variance_sum=variance_sum,
    )
    store = write_patch_store(tmp_path / "patches.zarr", image_shape=(32, 32), n_patches=2)

    run_stitch(store, [shard], tmp_path / "probability.zarr", chunk_px=4)

    group = zarr.open_group(str(tmp_path / "probability.zarr"), mode="r")
    np.testing.assert_array_equal(group["variance"][:], np.full((8, 8), 0.25, dtype=np.float32))
    np.testing.assert_array_equal(group["probability"][:], np.full((8, 8), 0.75, dtype=np.float32))


@pytest.mark.parametrize("slide_status", [status.NO_TISSUE, status.UNREADABLE])
def test_stitch_unprocessed_slide(tmp_path: Path, slide_status: str) -> None:
    """A slide with zero patches gets an all-zero map carrying its status."""
    shard = write_shard(
        tmp_path / "shard-0.zarr", index=0, row0=0, band_sum=np.zeros((0, 10)),
        band_weight=np.zeros((0, 10)), n_patches=0,
    )
    shape = (37, 40) if slide_status == status.NO_TISSUE else (0, 0)
    store = write_patch_store(
        tmp_path / "patches.zarr", image_shape=shape, n_patches=0, slide_status=slide_status
    )

    attrs = run_stitch(store, [shard], tmp_path / "probability.zarr", chunk_px=16)

    group = zarr.open_group(str(tmp_path / "probability.zarr"), mode="r")
    assert attrs["status"] == slide_status
    assert group["probability"].shape == (math.ceil(shape[0] / 4), math.ceil(shape[1] / 4))
    assert not group["probability"][:].any()
    assert not group["coverage"][:].any()


def test_stitch_rejects_missing_shard(tmp_path: Path) -> None:
    """Shards that hold fewer patches than the patch store are rejected."""
    height_out, width_out = 20, 12
    patches = grid_patches(height_out, width_out)
    patch_maps = {key: np.full((8, 8), 0.5) for key in patches}
    shards = build_shards(tmp_path, patch_maps, width_out, [0, 8, 100])
    store = write_patch_store(
        tmp_path / "patches.zarr",
        image_shape=(height_out * DOWNSAMPLE, width_out * DOWNSAMPLE),
        n_patches=len(patches),
    )

    with pytest.raises(ArtefactError, match="rerun inference"):
        run_stitch(store, shards[:1], tmp_path / "probability.zarr")
    assert not (tmp_path / "probability.zarr").exists()


def test_stitch_rejects_other_slide(tmp_path: Path) -> None:
    """A shard written for another slide is rejected with both slide ids named."""
    shard = write_shard(
        tmp_path / "shard-0.zarr", index=0, row0=0, band_sum=np.zeros((8, 8)),
        band_weight=np.ones((8, 8)), n_patches=1, slide_id="slide-b",
    )
    store = write_patch_store(tmp_path / "patches.zarr", image_shape=(32, 32), n_patches=1)

    with pytest.raises(ArtefactError, match="slide-b"):
        run_stitch(store, [shard], tmp_path / "probability.zarr")


def test_stitch_rejects_wrong_width(tmp_path: Path) -> None:
    """A shard whose band width is not ceil(image width / downsample) is rejected."""
    shard = write_shard(
        tmp_path / "shard-0.zarr", index=0, row0=0, band_sum=np.zeros((8, 9)),
        band_weight=np.ones((8, 9)), n_patches=1,
    )
    store = write_patch_store(tmp_path / "patches.zarr", image_shape=(32, 32), n_patches=1)

    with pytest.raises(ArtefactError, match="9 px wide"):
        run_stitch(store, [shard], tmp_path / "probability.zarr")


def test_stitch_rejects_mixed_downsamples(tmp_path: Path) -> None:
    """Shards predicted at different output downsamples are rejected."""
    first = write_shard(
        tmp_path / "shard-0.zarr", index=0, row0=0, band_sum=np.zeros((4, 8)),
        band_weight=np.ones((4, 8)), n_patches=1,
    )
    second = write_shard(
        tmp_path / "shard-1.zarr", index=1, row0=4, band_sum=np.zeros((2, 4)),
        band_weight=np.ones((2, 4)), n_patches=1, output_downsample=8,
    )
    store = write_patch_store(tmp_path / "patches.zarr", image_shape=(32, 32), n_patches=2)

    with pytest.raises(ArtefactError, match="output_downsample"):
        run_stitch(store, [first, second], tmp_path / "probability.zarr")


def test_stitch_rejects_bad_chunk_size(tmp_path: Path) -> None:
    """A chunk size below one pixel is a configuration error."""
    shard = write_shard(
        tmp_path / "shard-0.zarr", index=0, row0=0, band_sum=np.zeros((8, 8)),
        band_weight=np.ones((8, 8)), n_patches=1,
    )
    store = write_patch_store(tmp_path / "patches.zarr", image_shape=(32, 32), n_patches=1)

    with pytest.raises(ConfigError, match="chunk_px"):
        run_stitch(store, [shard], tmp_path / "probability.zarr", chunk_px=0)


def test_stitch_missing_patch_store(tmp_path: Path) -> None:
    """A missing patch store is an artefact error naming the path."""
    with pytest.raises(ArtefactError, match="patches.zarr"):
        run_stitch(tmp_path / "patches.zarr", [tmp_path / "shard-0.zarr"], tmp_path / "out.zarr")
