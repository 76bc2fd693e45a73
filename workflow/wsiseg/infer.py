"""Inference stage: tumour probabilities for one shard of a slide's patches.

A shard is a band of whole grid rows (see ``wsiseg.shards``). The stage reads the image
rows that the band covers from the patches Zarr store one chunk row at a time, so each
chunk is decoded once, and cuts the patches out as windows. A producer thread does the
reading and cutting, and a writer thread the summing and writing, while the model
predicts in the calling thread. The last batch is
padded to the full batch size, so the model gets one input shape and is traced once. The
padding's predictions are dropped.

Each patch's tumour map (softmax channel 1), block-mean downsampled by
``output_downsample``, is added with weight 1 over its footprint to a band of output
rows. Output rows that no later patch can reach are written to the Zarr store as soon
as possible, so the memory held is a few chunk rows of the band, not the whole band.

A slide whose status is not processable, or a shard without patches, gets a valid empty
band (zero rows) without Keras being imported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from wsiseg import status as slide_status
from wsiseg.atomic import atomic_dir
from wsiseg.devices import assign_device
from wsiseg.errors import ArtefactError, ConfigError
from wsiseg.tta import parse_tta

logger = logging.getLogger(__name__)

_PROGRESS_INTERVAL_S = 60.0

# Output chunks: 256 rows (1024 analysis px at the default downsample of 4) by 2048 columns.
OUT_CHUNK_ROWS = 256
OUT_CHUNK_COLS = 2048

# Patches queued ahead of the model. One image chunk row yields many patches at once, so
# the queue must cover the time it takes to read the next chunk row.
DEFAULT_PREFETCH_PATCHES = 1024

_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
_QUEUE_POLL_S = 0.5

# Batches of predicted maps waiting for the band writer. They are small (downsampled maps).
_WRITER_QUEUE_BATCHES = 8


@dataclass(frozen=True)
class BandGeometry:
    """Position and size of a shard's band in the output map, in output pixels."""

    out_row0: int  # output row of band row 0
    band_h: int
    width_out: int
    patch_out: int  # patch side in output px
    stride_out: int  # patch stride in output px


def run_infer(
    patches_zarr: str | os.PathLike,
    plan_json: str | os.PathLike,
    shard_index: int,
    out_zarr: str | os.PathLike,
    *,
    weights: Sequence[str | os.PathLike] = (),
    imagenet_encoder_weights: str | os.PathLike | None = None,
    preprocessing: str = "digipathai",
    output_downsample: int = 4,
    batch_size: int = 8,
    tta: Sequence[str] = (),
    precision: str = "auto",
    xla: bool = False,
    devices: Sequence[str | int] | None = None,
    lock_dir: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    prefetch_patches: int = DEFAULT_PREFETCH_PATCHES,
) -> dict[str, Any]:
    """Predict one shard's patches and write its band of summed probabilities and weights.

    The band store at ``out_zarr`` contains ``sum`` and ``weight`` (float32, band_h x
    W_out), plus ``variance_sum`` when several weight files are ensembled. The map is
    ``sum / weight`` and the ensemble variance ``variance_sum / weight``. ``tta`` names
    transforms from ``wsiseg.tta.TRANSFORMS``; the identity is always included. ``devices``
    and ``lock_dir`` go to ``wsiseg.devices.assign_device``. ``threads`` limits the CPU
    threads of the framework. Returns a summary with timings.
    """
    started = time.perf_counter()
    plan = _read_plan(plan_json)
    slide_id = plan.get("slide_id")
    shard = _plan_shard(plan, shard_index, slide_id)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", slide_id)
    if output_downsample < 1:
        raise ConfigError(f"output_downsample must be >= 1, got {output_downsample}", slide_id)
    views = parse_tta(tta)

    group = _open_patches(patches_zarr, slide_id)
    attrs = dict(group.attrs)
    upstream_status = attrs.get("status", plan.get("status", slide_status.OK))
    image_shape = group["image"].shape if "image" in group else (0, 0, 3)
    width_out = math.ceil(image_shape[1] / output_downsample)

    band_attrs = {
        "slide_id": slide_id,
        "shard_index": shard_index,
        "output_downsample": output_downsample,
        "preprocessing": preprocessing,
        "tta": [view.name for view in views],
        "precision": precision,
        "device": "none",
        "status": upstream_status,
    }

    if "patch_size_px" in attrs and "stride_px" in attrs:
        _check_downsample(
            int(attrs["patch_size_px"]), int(attrs["stride_px"]), output_downsample, slide_id
        )

    # Nothing to predict: an empty band, written without loading Keras.
    if not slide_status.is_processable(upstream_status) or shard["n_patches"] == 0:
        geometry = BandGeometry(0, 0, width_out, 0, 0)
        band_attrs["weights"] = _weights_records_without_keras(weights)
        logger.info(
            "slide %s: shard %d has no patches to predict (status %s); writing an empty band",
            slide_id,
            shard_index,
            upstream_status,
        )
        _write_empty_band(out_zarr, geometry, band_attrs, n_members=len(weights))
        return _summary(band_attrs, 0, started, loop_s=0.0, predict_s=0.0, input_wait_s=0.0)

    patch_px = int(attrs["patch_size_px"])
    stride_px = int(attrs["stride_px"])
    rows, cols = _shard_patches(group, shard, slide_id)
    _check_footprints(rows, cols, patch_px, stride_px, image_shape, slide_id)
    geometry = _band_geometry(shard, image_shape, patch_px, stride_px, output_downsample)

    # The device must be chosen before the framework is imported (CUDA reads
    # CUDA_VISIBLE_DEVICES when it initialises).
    assignment = assign_device(devices, lock_dir)
    _limit_cpu_threads(threads)
    from wsiseg import backend
    from wsiseg.ensemble import build_predictor

    band_attrs["precision"] = backend.configure(precision)
    band_attrs["device"] = assignment.label
    predictor = build_predictor(
        weights,
        imagenet_encoder_weights=imagenet_encoder_weights,
        preprocessing=preprocessing,
        output_downsample=output_downsample,
        views=views,
        xla=xla,
        seed=seed,
        slide_id=slide_id,
    )
    band_attrs["weights"] = predictor.weights_record
    if predictor.imagenet_encoder is not None:
        band_attrs["imagenet_encoder"] = predictor.imagenet_encoder.to_record()

    logger.info(
        "slide %s: predicting shard %d: %d patches of %d px in grid rows %d-%d, batch %d, "
        "%d TTA views, %d weight file(s), device %s, precision %s",
        slide_id,
        shard_index,
        rows.size,
        patch_px,
        shard["row_start"],
        shard["row_stop"] - 1,
        batch_size,
        len(views),
        max(1, len(predictor.members)),
        assignment.label,
        band_attrs["precision"],
    )

    try:
        timings = _predict_band(
            out_zarr,
            group["image"],
            rows,
            cols,
            geometry,
            predictor,
            band_attrs,
            patch_px=patch_px,
            stride_px=stride_px,
            batch_size=batch_size,
            prefetch_patches=prefetch_patches,
        )
    except Exception as error:
        # Bugs and out-of-memory errors propagate with their traceback; this line ties them
        # to the slide in a cohort log.
        logger.error("slide %s: inference of shard %d failed: %s", slide_id, shard_index, error)
        raise
    loop_s, predict_s, input_wait_s = timings

    summary = _summary(
        band_attrs,
        int(rows.size),
        started,
        loop_s=loop_s,
        predict_s=predict_s,
        input_wait_s=input_wait_s,
    )
    logger.info(
        "slide %s: shard %d done: %d patches in %.1f s, %.1f s of them predicting and "
        "writing (%.1f patches/s; model %.1f s, waiting for input %.1f s)",
        slide_id,
        shard_index,
        summary["n_patches"],
        summary["seconds"],
        loop_s,
        summary["loop_patches_per_s"],
        predict_s,
        input_wait_s,
    )
    return summary


def _predict_band(
    out_zarr: str | os.PathLike,
    image: zarr.Array,
    rows: np.ndarray,
    cols: np.ndarray,
    geometry: BandGeometry,
    predictor: Any,
    band_attrs: dict[str, Any],
    *,
    patch_px: int,
    stride_px: int,
    batch_size: int,
    prefetch_patches: int,
) -> tuple[float, float, float]:
    """Predict the patches into a new band store; return loop, model and input-wait seconds.

    ``predictor`` is a ``wsiseg.ensemble.EnsemblePredictor``. The loop time runs from the
    first batch, after the model is traced, to the last write. The store appears at
    ``out_zarr`` only when it is complete.
    """
    ensembled = len(predictor.members) > 1
    with atomic_dir(out_zarr) as temp_path:
        arrays = _create_band_arrays(temp_path, geometry, variance=ensembled)
        accumulator = BandAccumulator(arrays, geometry)

        def produce() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
            return iter_patch_batches(
                image, rows, cols, patch_px=patch_px, stride_px=stride_px, batch_size=batch_size
            )

        def accumulate(item: tuple[np.ndarray, int, np.ndarray, np.ndarray | None]) -> None:
            indices, n_valid, mean, variance = item
            band_rows = rows[indices] * geometry.stride_out - geometry.out_row0
            band_cols = cols[indices] * geometry.stride_out
            for k in range(n_valid):
                accumulator.add(
                    int(band_rows[k]),
                    int(band_cols[k]),
                    mean[k],
                    None if variance is None else variance[k],
                )

        # Three threads: the producer reads and cuts patches, this thread runs the model,
        # and the writer sums maps into the band and writes finished rows. TensorFlow
        # releases the GIL inside predict_on_batch (a pure-Python thread kept its full
        # speed during the calls), so the other two threads work while the model runs.
        max_batches = max(2, math.ceil(prefetch_patches / batch_size))
        prefetcher = Prefetcher(produce, max_items=max_batches)
        writer = BackgroundWorker(accumulate, max_items=_WRITER_QUEUE_BATCHES, name="band-writer")
        predict_s = 0.0
        with prefetcher, writer:
            # The producer fills its queue while the model is traced.
            predictor.warm_up((batch_size, patch_px, patch_px, 3))
            loop_started = time.perf_counter()
            last_progress = loop_started
            n_done = 0
            for batch, indices, n_valid in prefetcher:
                batch_started = time.perf_counter()
                mean, variance = predictor.predict(batch)
                predict_s += time.perf_counter() - batch_started
                writer.submit((indices, n_valid, mean, variance))

                # A progress line a minute: a CPU shard can run for hours.
                n_done += n_valid
                if time.perf_counter() - last_progress >= _PROGRESS_INTERVAL_S:
                    last_progress = time.perf_counter()
                    elapsed_s = last_progress - loop_started
                    logger.info(
                        "slide %s: %d of %d patches predicted (%.1f patches/s)",
                        band_attrs.get("slide_id"), n_done, rows.size, n_done / elapsed_s,
                    )
        accumulator.close()
        loop_s = time.perf_counter() - loop_started

        band_attrs["out_row0"] = geometry.out_row0
        band_attrs["n_patches"] = int(rows.size)
        zarr.open_group(str(temp_path), mode="r+").attrs.update(band_attrs)

    return loop_s, predict_s, prefetcher.wait_s


def iter_patch_batches(
    image: zarr.Array,
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    patch_px: int,
    stride_px: int,
    batch_size: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield ``(batch, indices, n_valid)`` for the patches at grid ``rows`` and ``cols``.

    ``rows`` must be sorted. ``batch`` is uint8 (batch_size, P, P, 3), and its first
    ``n_valid`` entries are the patches at positions ``indices`` of ``rows``. The rest of
    the last batch is white padding. The image is read in whole chunk rows, restricted to
    the chunk columns that the patches touch, and each chunk row is read once.
    """
    if rows.size == 0:
        return
    chunk_h = int(image.chunks[0])
    chunk_w = int(image.chunks[1])
    image_h = int(image.shape[0])

    # Column extent of the band, widened to whole chunks.
    x0 = (int(cols.min()) * stride_px // chunk_w) * chunk_w
    right_px = int(cols.max()) * stride_px + patch_px
    x1 = min(int(image.shape[1]), math.ceil(right_px / chunk_w) * chunk_w)

    buffer = np.empty((0, x1 - x0, 3), dtype=np.uint8)
    buffer_y0 = 0  # image row of buffer row 0
    batch = np.full((batch_size, patch_px, patch_px, 3), 255, dtype=np.uint8)
    indices = np.empty(batch_size, dtype=np.int64)
    n_in_batch = 0

    row_starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 1))
    row_stops = np.append(row_starts[1:], rows.size)
    for start, stop in zip(row_starts, row_stops, strict=True):
        y = int(rows[start]) * stride_px

        # Restart at the chunk row holding y when the buffer ends above it (chunk rows
        # without patches are skipped unread), else drop the rows above y. The buffer's
        # end stays on a chunk row boundary, so every read below is whole chunk rows.
        buffer_y1 = buffer_y0 + buffer.shape[0]
        if buffer_y1 <= y:
            buffer_y0 = (y // chunk_h) * chunk_h
            buffer = buffer[:0]
        elif y > buffer_y0:
            buffer = buffer[y - buffer_y0 :]
            buffer_y0 = y

        # Read chunk rows until the patch row fits.
        while buffer_y0 + buffer.shape[0] < y + patch_px:
            read_y0 = buffer_y0 + buffer.shape[0]
            read_y1 = min(image_h, (read_y0 // chunk_h + 1) * chunk_h)
            buffer = np.concatenate([buffer, image[read_y0:read_y1, x0:x1]], axis=0)

        top = y - buffer_y0
        for index in range(start, stop):
            x = int(cols[index]) * stride_px - x0
            batch[n_in_batch] = buffer[top : top + patch_px, x : x + patch_px]
            indices[n_in_batch] = index
            n_in_batch += 1
            if n_in_batch == batch_size:
                yield batch, indices.copy(), n_in_batch
                batch = np.full_like(batch, 255)
                n_in_batch = 0

    # The last partial batch, padded with white patches.
    if n_in_batch:
        yield batch, indices[:n_in_batch].copy(), n_in_batch


class Prefetcher:
    """Run an iterator in a producer thread, keeping up to ``max_items`` ready in a queue.

    Iterating yields the items in order and re-raises an exception from the producer.
    ``wait_s`` is the time the consumer spent waiting for an item, so a model that waits
    on input shows it. Use as a context manager so the thread stops on early exit.
    """

    _DONE = object()

    def __init__(self, make_iterator: Callable[[], Iterator[Any]], max_items: int) -> None:
        self._make_iterator = make_iterator
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_items))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="patch-reader", daemon=True)
        self.wait_s = 0.0

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Iterator[Any]:
        while True:
            waited = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - waited
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_QUEUE_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._make_iterator():
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(error)
            return
        self._put(self._DONE)


class BackgroundWorker:
    """Apply a function to submitted items, in order, in one worker thread.

    ``submit`` blocks while ``max_items`` are waiting. An exception in the function stops
    the processing of later items and is raised by the next ``submit``, or when the
    ``with`` block ends without an exception of its own.
    """

    _DONE = object()

    def __init__(self, function: Callable[[Any], None], max_items: int, name: str) -> None:
        self._function = function
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_items))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def __enter__(self) -> BackgroundWorker:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # The worker keeps taking items after an error, so this put waits at most for the
        # items ahead of it.
        self._queue.put(self._DONE)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def submit(self, item: Any) -> None:
        """Queue one item, raising the worker's error if an earlier item failed."""
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if self._error is not None:
                continue
            try:
                self._function(item)
            except BaseException as error:  # noqa: BLE001 - raised in the submitting thread
                self._error = error


class BandAccumulator:
    """Sum patch maps into a rolling window of band rows and write finished chunk rows.

    Patches must arrive with non-decreasing band rows, as a shard's sorted grid gives
    them. Once a patch starts at or below the window's first chunk row's end, no later
    patch can reach that chunk row, so it is written and the window moves down.
    """

    def __init__(self, arrays: dict[str, zarr.Array], geometry: BandGeometry) -> None:
        self._arrays = arrays
        self._geometry = geometry
        self._chunk_rows = int(arrays["sum"].chunks[0])
        window_h = self._chunk_rows + geometry.patch_out
        self._window = {
            name: np.zeros((window_h, geometry.width_out), dtype=np.float32) for name in arrays
        }
        self._window_row0 = 0  # band row of window row 0
        self._touched = False
        self._last_row = 0

    def add(
        self, band_row: int, band_col: int, mean: np.ndarray, variance: np.ndarray | None
    ) -> None:
        """Add one patch's map (patch_out x patch_out) with its top-left at a band pixel."""
        if band_row < self._last_row:
            raise ArtefactError(
                f"patch rows arrived out of order (band row {band_row} after {self._last_row})"
            )
        self._last_row = band_row

        # Move the window down until the patch fits in it.
        while band_row >= self._window_row0 + self._chunk_rows:
            if not self._touched:
                self._window_row0 = (band_row // self._chunk_rows) * self._chunk_rows
                break
            self._flush_chunk_row()

        side = self._geometry.patch_out
        top = band_row - self._window_row0
        footprint = np.s_[top : top + side, band_col : band_col + side]
        self._window["sum"][footprint] += mean
        self._window["weight"][footprint] += 1.0
        if "variance_sum" in self._window and variance is not None:
            self._window["variance_sum"][footprint] += variance
        self._touched = True

    def close(self) -> None:
        """Write every remaining row of the band."""
        while self._touched and self._window_row0 < self._geometry.band_h:
            self._flush_chunk_row()

    def _flush_chunk_row(self) -> None:
        row0 = self._window_row0
        row1 = min(row0 + self._chunk_rows, self._geometry.band_h)
        for name, window in self._window.items():
            if row1 > row0:
                self._arrays[name][row0:row1, :] = window[: row1 - row0]
            # Shift the rows below up by one chunk row and clear the freed rows.
            window[: -self._chunk_rows] = window[self._chunk_rows :]
            window[-self._chunk_rows :] = 0.0
        self._window_row0 += self._chunk_rows
        self._touched = bool(self._window["weight"].any())


def _read_plan(plan_json: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(plan_json, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ArtefactError(f"cannot read the shard plan {plan_json}: {error}") from error


def _plan_shard(plan: dict[str, Any], shard_index: int, slide_id: str | None) -> dict[str, Any]:
    shards = plan.get("shards", [])
    matches = [shard for shard in shards if shard.get("index") == shard_index]
    if not matches:
        raise ConfigError(
            f"shard {shard_index} is not in the plan, which has shards "
            f"{[shard.get('index') for shard in shards]}",
            slide_id,
        )
    return matches[0]


def _open_patches(patches_zarr: str | os.PathLike, slide_id: str | None) -> zarr.Group:
    try:
        return zarr.open_group(str(patches_zarr), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise ArtefactError(
            f"patches store {patches_zarr} not found or not a Zarr group; rerun the patches stage",
            slide_id,
        ) from error


def _check_downsample(patch_px: int, stride_px: int, downsample: int, slide_id: str | None) -> None:
    # Block means of whole patches land on whole output pixels only when both divide.
    if patch_px % downsample or stride_px % downsample:
        raise ConfigError(
            f"output_downsample {downsample} must divide patch_size_px {patch_px} and "
            f"stride_px {stride_px}; choose a common divisor such as "
            f"{math.gcd(patch_px, stride_px)}",
            slide_id,
        )


def _shard_patches(
    group: zarr.Group, shard: dict[str, Any], slide_id: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the grid rows and columns of the shard's patches (sorted by row, column)."""
    grid = np.asarray(group["grid"][:], dtype=np.int64)
    first = int(np.searchsorted(grid[:, 0], shard["row_start"], side="left"))
    stop = int(np.searchsorted(grid[:, 0], shard["row_stop"], side="left"))
    rows = grid[first:stop, 0]
    cols = grid[first:stop, 1]

    if rows.size != shard["n_patches"]:
        raise ArtefactError(
            f"shard {shard['index']} lists {shard['n_patches']} patches in grid rows "
            f"{shard['row_start']}-{shard['row_stop'] - 1}, but the patches store has "
            f"{rows.size} there; rerun the patches stage",
            slide_id,
        )
    if rows.size > 1 and np.any(np.diff(rows * (int(cols.max()) + 1) + cols) <= 0):
        raise ArtefactError(
            "patch grid is not sorted by (row, col); rerun the patches stage", slide_id
        )
    return rows, cols


def _check_footprints(
    rows: np.ndarray,
    cols: np.ndarray,
    patch_px: int,
    stride_px: int,
    image_shape: tuple[int, ...],
    slide_id: str | None,
) -> None:
    bottom_px = int(rows.max()) * stride_px + patch_px
    right_px = int(cols.max()) * stride_px + patch_px
    if bottom_px > image_shape[0] or right_px > image_shape[1]:
        raise ArtefactError(
            f"patches reach {right_px} x {bottom_px} px but the image is only "
            f"{image_shape[1]} x {image_shape[0]} px; rerun the patches stage",
            slide_id,
        )


def _band_geometry(
    shard: dict[str, Any],
    image_shape: tuple[int, ...],
    patch_px: int,
    stride_px: int,
    downsample: int,
) -> BandGeometry:
    out_row0 = shard["row_start"] * stride_px // downsample
    bottom_px = min((shard["row_stop"] - 1) * stride_px + patch_px, int(image_shape[0]))
    return BandGeometry(
        out_row0=out_row0,
        band_h=math.ceil(bottom_px / downsample) - out_row0,
        width_out=math.ceil(image_shape[1] / downsample),
        patch_out=patch_px // downsample,
        stride_out=stride_px // downsample,
    )


def _create_band_arrays(
    path: Path, geometry: BandGeometry, *, variance: bool
) -> dict[str, zarr.Array]:
    group = zarr.open_group(str(path), mode="w")
    shape = (geometry.band_h, geometry.width_out)
    # Zarr needs chunk sides >= 1, also for an empty band.
    chunks = (
        max(1, min(OUT_CHUNK_ROWS, geometry.band_h)),
        max(1, min(OUT_CHUNK_COLS, geometry.width_out)),
    )
    names = ["sum", "weight"] + (["variance_sum"] if variance else [])

    arrays = {}
    for name in names:
        arrays[name] = group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype="float32",
            fill_value=0.0,
            compressors=_COMPRESSOR,
        )
    return arrays


def _write_empty_band(
    out_zarr: str | os.PathLike, geometry: BandGeometry, attrs: dict[str, Any], *, n_members: int
) -> None:
    with atomic_dir(out_zarr) as temp_path:
        _create_band_arrays(temp_path, geometry, variance=n_members > 1)
        attrs["out_row0"] = 0
        attrs["n_patches"] = 0
        zarr.open_group(str(temp_path), mode="r+").attrs.update(attrs)


def _weights_records_without_keras(
    weights: Sequence[str | os.PathLike],
) -> list[dict[str, str]] | str:
    """Return the ``weights`` attribute for a band that loads no model."""
    # wsiseg.weights imports Keras for type hints only, so this stays Keras-free.
    from wsiseg.weights import file_sha256

    if not weights:
        return "untrained"
    return [{"file": Path(path).name, "sha256": file_sha256(path)} for path in weights]


def _limit_cpu_threads(threads: int | None) -> None:
    """Limit the framework's CPU thread pools through environment variables read at start-up."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    # TensorFlow 2 reads TF_NUM_INTRAOP_THREADS and TF_NUM_INTEROP_THREADS, and OpenMP
    # code reads OMP_NUM_THREADS, when their thread pools start. Values set by the user win.
    for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1" if threads == 1 else "2")


def _summary(
    attrs: dict[str, Any],
    n_patches: int,
    started: float,
    *,
    loop_s: float,
    predict_s: float,
    input_wait_s: float,
) -> dict[str, Any]:
    """Return the stage's summary: ``seconds`` is the whole call, start-up included, and
    ``loop_s`` the reading, predicting and writing after the model is traced."""
    seconds = time.perf_counter() - started
    return {
        "slide_id": attrs["slide_id"],
        "shard_index": attrs["shard_index"],
        "status": attrs["status"],
        "n_patches": n_patches,
        "device": attrs["device"],
        "precision": attrs["precision"],
        "weights": attrs["weights"],
        "seconds": seconds,
        "loop_s": loop_s,
        "predict_s": predict_s,
        "input_wait_s": input_wait_s,
        "loop_patches_per_s": n_patches / loop_s if loop_s > 0 else 0.0,
    }
