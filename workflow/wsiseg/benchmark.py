"""Benchmark each stage against the library call beneath it, in one run on one machine.

Run as ``wsiseg benchmark [--quick | --full] [--json PATH]`` or
``python -m wsiseg.benchmark``. Every stage runs in a child process of its own, so its
peak resident set size (RSS) is its own. The child reports its peak RSS (VmHWM) and CPU
time, and this process samples the RSS of the child and its worker processes every
50 ms. The sections:

a. reading: raw OpenSlide ``read_region`` patches/s in one thread against the patches
   stage's patches/s per worker, for 1 up to ``--max-workers`` workers;
b. inference: raw ``model.predict`` patches/s on patches held in memory against
   ``wsiseg.infer.run_infer``'s patches/s, which include reading the Zarr store and
   writing the band;
c. stitching and vectorising: seconds per gigapixel of slide (level-0 area) and peak RSS
   at output downsample 4. No model predicts the patches here: generated prediction
   shards, in the format the inference stage writes, feed the stitch stage, and the
   output states this;
d. pipeline overhead on the bundled CMU-1 slide: the stages run in sequence, and the
   wall time minus the model's own time (``predict_s`` of ``run_infer``) is taken as a
   fraction of the total;
e. memory against slide area: peak RSS of tissue detection and patch extraction on the
   large synthetic slide and on one with a quarter of its side.

Sizes come from a preset (``--quick`` for a smoke test, the default, ``--full`` for the
100,000 x 100,000 px slide) and can be overridden one by one. Generated files go to a
temporary folder that is deleted at the end unless ``--work-dir`` names one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.atomic import write_json
from wsiseg.errors import WsisegError

logger = logging.getLogger(__name__)

# The bundled real slide (Aperio SVS, 2220 x 2967 px, MPP 0.499) used by sections b and d.
BUNDLED_SLIDE = Path(__file__).resolve().parents[2] / "tests" / "data" / "CMU-1-Small-Region.svs"

SECTIONS = "abcde"

# Targets. The memory criterion of section e is this benchmark's own: a peak RSS on the
# large slide at most 25 % above the one on a slide with 1/16 of its area.
READ_PER_WORKER_TARGET = 0.9
INFER_RATIO_TARGET = 0.95
MAP_STAGE_RSS_TARGET_BYTES = 2 * 1024**3
OVERHEAD_FRACTION_TARGET = 0.15
RSS_GROWTH_TARGET = 1.25

# Patch grid of sections a, c and e: DigiPathAI's 256 px patches at stride 128, level 0.
PATCH_PX = 256
STRIDE_PX = 128
OUTPUT_DOWNSAMPLE = 4

# Generated tumour map of section c: inside each tissue disc of radius R, a tumour disc of
# radius 0.6 R at probability 0.9 over tissue at 0.1. Every second one has a hole of
# radius 0.25 R.
TUMOUR_RADIUS_FRACTION = 0.6
HOLE_RADIUS_FRACTION = 0.25
TUMOUR_PROBABILITY = 0.9
TISSUE_PROBABILITY = 0.1

_RSS_SAMPLE_S = 0.05
_GIB = 1024**3
_MIB = 1024**2


class BenchmarkError(WsisegError):
    """A benchmark step failed."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of one benchmark run."""

    large_slide_px: int  # side of the large synthetic slide (sections c, e)
    small_slide_px: int  # side of the small one (sections a, c, e)
    raw_read_patches: int  # patches read one by one in section a
    infer_patch_px: int  # patch side in section b
    infer_patches: int  # about this many patches in section b (whole grid rows)
    infer_target_mpp_um: float | None  # analysis resolution of section b; None: level 0
    infer_batch_size: int
    infer_rounds: int  # rounds of raw predictions and the stage in section b
    pipeline_patch_px: int  # patch side in section d (stride is half of it)
    pipeline_target_mpp_um: float | None  # analysis resolution of section d; None: level 0
    # Side of a slide whose tissue thumbnail reaches max_thumbnail_px (section e); None: skip.
    capped_thumbnail_slide_px: int | None = None


PRESETS = {
    "quick": Sizes(
        large_slide_px=8_192, small_slide_px=2_048, raw_read_patches=200,
        infer_patch_px=32, infer_patches=32, infer_target_mpp_um=8.0, infer_batch_size=8, infer_rounds=1,
        pipeline_patch_px=32, pipeline_target_mpp_um=8.0,
    ),
    "standard": Sizes(
        large_slide_px=25_000, small_slide_px=6_250, raw_read_patches=1_000,
        infer_patch_px=64, infer_patches=128, infer_target_mpp_um=2.0, infer_batch_size=16, infer_rounds=2,
        pipeline_patch_px=128, pipeline_target_mpp_um=2.0,
    ),
    "full": Sizes(
        large_slide_px=100_000, small_slide_px=25_000, raw_read_patches=2_000,
        infer_patch_px=64, infer_patches=512, infer_target_mpp_um=None, infer_batch_size=16, infer_rounds=2,
        pipeline_patch_px=256, pipeline_target_mpp_um=None,
        # At 0.25 µm/px and 8 µm/px per thumbnail pixel, above 131,072 px on a side.
        capped_thumbnail_slide_px=160_000,
    ),
}


# --- child processes -------------------------------------------------------------------


def _peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Return a process's peak RSS (VmHWM of /proc/PID/status), or None where unreadable.

    getrusage's ru_maxrss is no substitute: Linux carries a parent's RSS at fork time
    over into the child's value across exec, so a worker started by a large parent
    reports at least the parent's size. VmHWM belongs to the process's own address space.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status_file:
            for line in status_file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError):
        return None
    return None


def _usage_fields(baseline_rss_bytes: int) -> dict[str, float]:
    """Return this process's peak RSS and the CPU seconds of it and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = _peak_rss_bytes()
    return {
        "baseline_rss_bytes": baseline_rss_bytes,
        "peak_rss_bytes": peak if peak is not None else own.ru_maxrss * 1024,
        "cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
    }


class _TreeSampler:
    """Samples the RSS of a process tree: the peak of the sum, and each worker's own peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak_sum_bytes = 0
        self.worker_peaks: dict[int, int] = {}

    def sample(self) -> None:
        import psutil

        try:
            workers = self.process.children(recursive=True)
        except psutil.Error:
            return
        total = 0
        for member in [self.process, *workers]:
            try:
                total += member.memory_info().rss
            except psutil.Error:
                continue
        self.peak_sum_bytes = max(self.peak_sum_bytes, total)
        for worker in workers:
            peak = _peak_rss_bytes(worker.pid)
            if peak is not None:
                self.worker_peaks[worker.pid] = max(peak, self.worker_peaks.get(worker.pid, 0))


class ChildRunner:
    """Runs benchmark tasks in child processes and records their time and memory."""

    def __init__(self, work_dir: Path, *, verbose: bool) -> None:
        self.work_dir = work_dir
        self.verbose = verbose
        self.count = 0

    def run(self, task: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run ``task`` with ``params`` in a fresh Python process and return its result.

        The result gets ``tree_peak_rss_bytes`` (the sampled peak of the summed RSS of
        the child and its workers), ``worker_peak_rss_bytes`` (the largest worker's own
        peak, 0 without workers), ``process_s`` (the child's wall time, interpreter start
        included) and ``load_average``. Samples are 50 ms apart, so a worker's last
        50 ms can be missed. Raises BenchmarkError with the end of the child's log when
        it fails.
        """
        self.count += 1
        stem = self.work_dir / "children" / f"{self.count:02d}-{task}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        params_path = stem.with_suffix(".params.json")
        result_path = stem.with_suffix(".result.json")
        log_path = stem.with_suffix(".log")
        write_json(params_path, params)

        command = [
            sys.executable, "-m", "wsiseg.benchmark",
            "--child", task, str(params_path), str(result_path),
        ]
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        logger.info("running %s in a child process", task)
        started = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=None if self.verbose else subprocess.STDOUT, env=env
            )
            sampler = _TreeSampler(process.pid)
            while process.poll() is None:
                sampler.sample()
                time.sleep(_RSS_SAMPLE_S)
        process_s = time.perf_counter() - started

        if process.returncode != 0 or not result_path.exists():
            tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
            raise BenchmarkError(
                f"benchmark task {task} failed with exit code {process.returncode}; "
                f"end of its log {log_path}:\n{tail}"
            )
        result = json.loads(result_path.read_text(encoding="utf-8"))
        result["tree_peak_rss_bytes"] = max(sampler.peak_sum_bytes, result["peak_rss_bytes"])
        result["worker_peak_rss_bytes"] = max(sampler.worker_peaks.values(), default=0)
        result["process_s"] = process_s
        result["load_average"] = list(os.getloadavg())
        return result


def _run_child_task(task: str, params_path: str, result_path: str) -> int:
    """Run one task in this (child) process and write its result as JSON."""
    import psutil

    from wsiseg.logs import setup_logging

    setup_logging("INFO")
    params = json.loads(Path(params_path).read_text(encoding="utf-8"))
    baseline = psutil.Process().memory_info().rss
    result = TASKS[task](params)
    result.update(_usage_fields(baseline))
    write_json(result_path, result)
    return 0


# --- tasks (each runs in a child process) ----------------------------------------------


def _timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def _task_inspect_tissue(params: dict[str, Any]) -> dict[str, Any]:
    """Inspect a slide and detect its tissue."""
    from wsiseg.slide import run_inspect
    from wsiseg.tissue import run_tissue

    out = Path(params["out_dir"])
    record, inspect_s = _timed(run_inspect, params["slide"], params["slide_id"], out / "slide.json")
    tissue, tissue_s = _timed(
        run_tissue, out / "slide.json", out / "tissue_mask.png", out / "thumbnail.png",
        out / "tissue.json",
    )
    return {
        "inspect_s": inspect_s,
        "tissue_s": tissue_s,
        "width": record["width"],
        "height": record["height"],
        "tissue_area_px_level0": tissue["tissue_area_px_level0"],
        "thumbnail_px": [tissue["mask_width"], tissue["mask_height"]],
    }


def _task_patches(params: dict[str, Any]) -> dict[str, Any]:
    """Run the patches stage with the given options."""
    from wsiseg.patches import run_patches

    out = Path(params["out_dir"])
    store = Path(params["out_zarr"])
    attrs, seconds = _timed(
        run_patches, out / "slide.json", out / "tissue.json", out / "tissue_mask.png",
        store, params["out_plan"], **params["options"],
    )
    chunk_files = (store / "image" / "c").rglob("*")
    chunks_written = sum(1 for path in chunk_files if path.is_file())
    chunk_px = params["options"].get("chunk_px", 1024)
    return {
        "seconds": seconds,
        "n_patches": attrs["n_patches"],
        "chunks_written": chunks_written,
        "pixels_written": chunks_written * chunk_px * chunk_px,
        "workers": params["options"].get("workers", 2),
        "store_bytes": _folder_bytes(store),
    }


def _task_raw_read(params: dict[str, Any]) -> dict[str, Any]:
    """Time OpenSlide's read_region on consecutive patches of the store's grid, one thread."""
    import openslide
    import zarr

    coords = zarr.open_group(params["patches_zarr"], mode="r")["coords"][:]
    count = min(params["n_patches"], len(coords))
    if count == 0:
        raise BenchmarkError("the patches store has no patches to read")
    # A run of consecutive patches from the middle of the grid, in the order an
    # extractor that reads patch by patch would read them.
    start = max(0, len(coords) // 2 - count // 2)
    patch_px = params["patch_px"]

    slide = openslide.OpenSlide(params["slide"])
    started = time.perf_counter()
    for x, y in coords[start : start + count]:
        slide.read_region((int(x), int(y)), 0, (patch_px, patch_px))
    seconds = time.perf_counter() - started
    slide.close()
    return {"n_patches": int(count), "seconds": seconds, "patches_per_s": count / seconds}


def _task_shards(params: dict[str, Any]) -> dict[str, Any]:
    """Write generated prediction shards for a patches store, one per planned shard."""
    import zarr
    from zarr.codecs import BloscCodec

    from wsiseg.atomic import atomic_dir
    from wsiseg.infer import OUT_CHUNK_COLS, OUT_CHUNK_ROWS, BandAccumulator, BandGeometry

    # The chunks and codec of the inference stage's bands, so stitching decodes the same.
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")

    group = zarr.open_group(params["patches_zarr"], mode="r")
    attrs = dict(group.attrs)
    plan = json.loads(Path(params["plan_json"]).read_text(encoding="utf-8"))
    grid = group["grid"][:]
    image_h, image_w = group["image"].shape[:2]
    downsample = params["output_downsample"]
    patch_px, stride_px = int(attrs["patch_size_px"]), int(attrs["stride_px"])
    patch_out, stride_out = patch_px // downsample, stride_px // downsample
    width_out = math.ceil(image_w / downsample)
    level0_per_out = float(attrs["analysis_downsample"]) * downsample
    shapes = _tumour_shapes(params["discs"], level0_per_out)

    started = time.perf_counter()
    paths = []
    for shard in plan["shards"]:
        first, stop = np.searchsorted(grid[:, 0], [shard["row_start"], shard["row_stop"]])
        rows, cols = grid[first:stop, 0], grid[first:stop, 1]
        out_row0 = shard["row_start"] * stride_px // downsample
        bottom_px = min((shard["row_stop"] - 1) * stride_px + patch_px, image_h)
        band_h = math.ceil(bottom_px / downsample) - out_row0 if rows.size else 0
        geometry = BandGeometry(out_row0, band_h, width_out, patch_out, stride_out)
        field = _tumour_field(shapes, out_row0, band_h, width_out)

        path = Path(params["out_dir"]) / f"shard-{shard['index']}.zarr"
        with atomic_dir(path) as temp:
            band = zarr.open_group(str(temp), mode="w")
            chunks = (max(1, min(OUT_CHUNK_ROWS, band_h)), max(1, min(OUT_CHUNK_COLS, width_out)))
            arrays = {
                name: band.create_array(
                    name, shape=(band_h, width_out), chunks=chunks, dtype="float32",
                    fill_value=0.0, compressors=compressor,
                )
                for name in ("sum", "weight")
            }
            accumulator = BandAccumulator(arrays, geometry)
            for row, col in zip(rows, cols, strict=True):
                top, left = int(row) * stride_out - out_row0, int(col) * stride_out
                accumulator.add(top, left, field[top : top + patch_out, left : left + patch_out], None)
            accumulator.close()
            band.attrs.update({
                "slide_id": attrs["slide_id"],
                "shard_index": shard["index"],
                "out_row0": out_row0,
                "output_downsample": downsample,
                "n_patches": int(rows.size),
                "weights": "untrained",
                "preprocessing": "digipathai",
                "tta": ["identity"],
                "precision": "float32",
                "device": "none",
                "status": attrs["status"],
                "generated_by": "wsiseg.benchmark (no model was run)",
            })
        paths.append(str(path))

    return {
        "seconds": time.perf_counter() - started,
        "shards": paths,
        "expected_tumour_px_level0": _expected_tumour_px(shapes) * level0_per_out**2,
        "expected_regions": len(shapes),
    }


def _task_stitch(params: dict[str, Any]) -> dict[str, Any]:
    """Run the stitch stage."""
    from wsiseg.stitch import run_stitch

    attrs, seconds = _timed(run_stitch, params["patches_zarr"], params["shards"], params["out_zarr"])
    return {"seconds": seconds, "n_shards": attrs["n_shards"], "store_bytes": _folder_bytes(Path(params["out_zarr"]))}


def _task_vectorise(params: dict[str, Any]) -> dict[str, Any]:
    """Run the vectorise stage."""
    from wsiseg.vectorise import run_vectorise

    out = Path(params["out_dir"])
    stats, seconds = _timed(
        run_vectorise, params["probability_zarr"], out / "slide.json", out / "tissue.json",
        out / "tumour.geojson", out / "stats.json",
    )
    return {
        "seconds": seconds,
        "n_tumour_regions": stats["n_tumour_regions"],
        "tumour_area_px_level0": stats["tumour_area_px_level0"],
    }


def _task_inference(params: dict[str, Any]) -> dict[str, Any]:
    """Time raw predictions on in-memory patches, then the inference stage on the store."""
    import zarr

    from wsiseg import backend
    from wsiseg.infer import run_infer

    precision = backend.configure("auto")
    import keras

    from wsiseg.ensemble import build_predictor
    from wsiseg.model import preprocess
    from wsiseg.tta import parse_tta

    # The shard's patches, cut from the store into memory.
    group = zarr.open_group(params["patches_zarr"], mode="r")
    patch_px, stride_px = int(group.attrs["patch_size_px"]), int(group.attrs["stride_px"])
    plan = json.loads(Path(params["plan_json"]).read_text(encoding="utf-8"))
    shard = plan["shards"][0]
    grid = group["grid"][shard["patch_start"] : shard["patch_stop"]]
    image = group["image"][:]
    patches = np.stack([
        image[row * stride_px : row * stride_px + patch_px, col * stride_px : col * stride_px + patch_px]
        for row, col in grid
    ])
    del image
    batch_size = params["batch_size"]
    n_patches = len(patches)

    # The stage's predictor: the U-Net wrapped to take uint8 patches and return the
    # downsampled tumour map.
    predictor = build_predictor(
        [], imagenet_encoder_weights=None, preprocessing="digipathai",
        output_downsample=params["output_downsample"], views=parse_tta([]), xla=False, seed=0,
    )
    (wrapped,) = predictor.members
    unet = next(layer for layer in wrapped.layers if isinstance(layer, keras.Model))

    # Raw 1 is the bare U-Net's model.predict on preprocessed float32 patches, raw 2 the
    # call the stage makes: predict_on_batch of the wrapped model on uint8 batches, the
    # last one padded. Each is called once untimed first, so tracing stays out of the
    # times.
    inputs = preprocess(patches)
    batches = []
    for start in range(0, n_patches, batch_size):
        batch = np.full((batch_size, patch_px, patch_px, 3), 255, dtype=np.uint8)
        chunk = patches[start : start + batch_size]
        batch[: len(chunk)] = chunk
        batches.append(batch)

    def predict_batches() -> None:
        for batch in batches:
            predictor.predict(batch)

    unet.predict(inputs, batch_size=batch_size, verbose=0)
    predictor.warm_up((batch_size, patch_px, patch_px, 3))

    # Rounds of raw 1, raw 2 and the stage, so that a change in the machine's load
    # during the run affects all three alike.
    rounds = []
    for index in range(params["rounds"]):
        _, predict_s = _timed(unet.predict, inputs, batch_size=batch_size, verbose=0)
        _, batch_calls_s = _timed(predict_batches)
        summary = run_infer(
            params["patches_zarr"], params["plan_json"], 0, params["out_zarr"],
            output_downsample=params["output_downsample"], batch_size=batch_size,
        )
        rounds.append({
            "raw_predict_patches_per_s": n_patches / predict_s,
            "raw_batch_calls_patches_per_s": n_patches / batch_calls_s,
            "stage_patches_per_s": summary["loop_patches_per_s"],
            "stage": summary,
            "load_average": list(os.getloadavg()),
        })
        logger.info("inference round %d of %d done", index + 1, params["rounds"])

    return {
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "precision": precision,
        "gpus": backend.list_gpus(),
        "patch_px": patch_px,
        "batch_size": batch_size,
        "n_patches": n_patches,
        "rounds": rounds,
    }


def _task_pipeline(params: dict[str, Any]) -> dict[str, Any]:
    """Run every stage on one slide in sequence and time each."""
    from wsiseg.infer import run_infer
    from wsiseg.patches import run_patches
    from wsiseg.report import run_report
    from wsiseg.slide import run_inspect
    from wsiseg.stitch import run_stitch
    from wsiseg.tissue import run_tissue
    from wsiseg.vectorise import run_vectorise

    out = Path(params["out_dir"])
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    _, seconds["inspect"] = _timed(run_inspect, params["slide"], params["slide_id"], out / "slide.json")
    _, seconds["tissue"] = _timed(
        run_tissue, out / "slide.json", out / "tissue_mask.png", out / "thumbnail.png", out / "tissue.json"
    )
    attrs, seconds["patches"] = _timed(
        run_patches, out / "slide.json", out / "tissue.json", out / "tissue_mask.png",
        out / "patches.zarr", out / "shards.json", **params["patches_options"],
    )
    plan = json.loads((out / "shards.json").read_text(encoding="utf-8"))

    infer_started = time.perf_counter()
    summaries = []
    for shard in plan["shards"]:
        summaries.append(run_infer(
            out / "patches.zarr", out / "shards.json", shard["index"],
            out / "predictions" / f"shard-{shard['index']}.zarr",
            output_downsample=params["output_downsample"],
        ))
    seconds["infer"] = time.perf_counter() - infer_started

    shard_paths = [out / "predictions" / f"shard-{s['index']}.zarr" for s in plan["shards"]]
    _, seconds["stitch"] = _timed(run_stitch, out / "patches.zarr", shard_paths, out / "probability.zarr")
    _, seconds["vectorise"] = _timed(
        run_vectorise, out / "probability.zarr", out / "slide.json", out / "tissue.json",
        out / "tumour.geojson", out / "stats.json",
    )
    _, seconds["report"] = _timed(run_report, [out / "stats.json"], out / "report.csv")
    total_s = time.perf_counter() - started

    return {
        "n_patches": attrs["n_patches"],
        "n_shards": len(plan["shards"]),
        "analysis_downsample": attrs["analysis_downsample"],
        "stage_s": seconds,
        "total_s": total_s,
        "model_s": sum(summary["predict_s"] for summary in summaries),
        "infer_loop_s": sum(summary["loop_s"] for summary in summaries),
        "infer_startup_s": sum(summary["seconds"] - summary["loop_s"] for summary in summaries),
    }


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "inspect_tissue": _task_inspect_tissue,
    "patches": _task_patches,
    "raw_read": _task_raw_read,
    "shards": _task_shards,
    "stitch": _task_stitch,
    "vectorise": _task_vectorise,
    "inference": _task_inference,
    "pipeline": _task_pipeline,
}


# --- generated tumour map (section c) ---------------------------------------------------


def _tumour_shapes(discs: Sequence[Sequence[float]], level0_per_out: float) -> list[tuple[float, ...]]:
    """Return (x, y, radius, hole radius) of each tumour disc in output px."""
    shapes = []
    for index, (x, y, radius) in enumerate(discs):
        hole = HOLE_RADIUS_FRACTION * radius if index % 2 else 0.0
        shapes.append(
            (x / level0_per_out, y / level0_per_out,
             TUMOUR_RADIUS_FRACTION * radius / level0_per_out, hole / level0_per_out)
        )
    return shapes


def _expected_tumour_px(shapes: Sequence[tuple[float, ...]]) -> float:
    """Return the analytic tumour area in output px²."""
    return float(sum(math.pi * (radius**2 - hole**2) for _, _, radius, hole in shapes))


def _tumour_field(
    shapes: Sequence[tuple[float, ...]], row0: int, height: int, width: int
) -> np.ndarray:
    """Return the generated tumour probability of output rows [row0, row0 + height)."""
    field = np.full((height, width), TISSUE_PROBABILITY, dtype=np.float32)
    for x, y, radius, hole in shapes:
        # Only the disc's bounding box is evaluated. Pixel centres sit at +0.5.
        top, bottom = max(row0, math.floor(y - radius)), min(row0 + height, math.ceil(y + radius) + 1)
        left, right = max(0, math.floor(x - radius)), min(width, math.ceil(x + radius) + 1)
        if top >= bottom or left >= right:
            continue
        dy2 = (np.arange(top, bottom) + 0.5 - y) ** 2
        dx2 = (np.arange(left, right) + 0.5 - x) ** 2
        distance2 = dy2[:, None] + dx2[None, :]
        inside = (distance2 <= radius**2) & (distance2 > hole**2)
        field[top - row0 : bottom - row0, left:right][inside] = TUMOUR_PROBABILITY
    return field


# --- sections --------------------------------------------------------------------------


def _folder_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


@dataclasses.dataclass
class SlideRun:
    """A synthetic slide with its inspect, tissue and patches results."""

    label: str
    folder: Path
    slide_path: Path
    side_px: int
    discs: list[list[float]]
    file_bytes: int
    tissue: dict[str, Any] | None = None
    patches: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


class Benchmark:
    """One benchmark run: the sections in order, their results and the report lines."""

    def __init__(self, sizes: Sizes, sections: str, work_dir: Path, max_workers: int, *, verbose: bool) -> None:
        self.sizes = sizes
        self.sections = sections
        self.work_dir = work_dir
        self.max_workers = max_workers
        self.runner = ChildRunner(work_dir, verbose=verbose)
        self.results: dict[str, Any] = {}
        self.slides: dict[str, SlideRun] = {}

    def say(self, line: str = "") -> None:
        """Print one line of the report as it is measured."""
        print(line, flush=True)

    # Slides and their front stages.

    def slide(self, label: str, side_px: int) -> SlideRun:
        """Write a synthetic slide once and run inspect and tissue on it."""
        if label in self.slides:
            return self.slides[label]
        from wsiseg.synthetic import large_pyramid_slide

        folder = self.work_dir / label
        written, seconds = _timed(large_pyramid_slide, folder / "slide.tiff", size_px=side_px)
        run = SlideRun(
            label, folder, written.path, side_px,
            [[disc.x_px, disc.y_px, disc.radius_px] for disc in written.discs],
            written.file_size_bytes,
        )
        self.say(
            f"  {label} slide: {side_px:,} x {side_px:,} px, 30 % tissue, JPEG pyramid of "
            f"{written.file_size_bytes / _MIB:.0f} MiB written in {seconds:.1f} s"
        )
        run.tissue = self.runner.run(
            "inspect_tissue", {"slide": str(run.slide_path), "slide_id": label, "out_dir": str(folder)}
        )
        self.slides[label] = run
        return run

    def patches(self, run: SlideRun, workers: int) -> dict[str, Any]:
        """Run the patches stage on a slide with ``workers`` workers (once per count)."""
        if workers not in run.patches:
            store = run.folder / f"patches-w{workers}.zarr"
            result = self.runner.run("patches", {
                "out_dir": str(run.folder),
                "out_zarr": str(store),
                "out_plan": str(run.folder / f"shards-w{workers}.json"),
                "options": {"patch_size_px": PATCH_PX, "stride_px": STRIDE_PX, "workers": workers},
            })
            result["store"] = str(store)
            result["plan"] = str(run.folder / f"shards-w{workers}.json")
            run.patches[workers] = result
        return run.patches[workers]

    def drop_other_stores(self, run: SlideRun, keep_workers: int) -> None:
        """Delete the patches stores of other worker counts, to keep the disk use small."""
        for workers, result in run.patches.items():
            if workers != keep_workers:
                shutil.rmtree(result["store"], ignore_errors=True)

    # a. reading

    def section_reading(self) -> None:
        self.say(f"\na. reading: raw OpenSlide read_region (one thread) against the patches stage")
        run = self.slide("small", self.sizes.small_slide_px)
        worker_counts = list(range(1, self.max_workers + 1))
        stages = [self.patches(run, workers) for workers in worker_counts]
        raw = self.runner.run("raw_read", {
            "slide": str(run.slide_path), "patches_zarr": stages[-1]["store"],
            "n_patches": self.sizes.raw_read_patches, "patch_px": PATCH_PX,
        })
        self.drop_other_stores(run, self.max_workers)
        self.say(
            f"  raw read_region: {raw['patches_per_s']:.0f} patches/s of {PATCH_PX} px "
            f"({raw['n_patches']} consecutive grid patches, one thread)"
        )

        rows = []
        single_rate = stages[0]["n_patches"] / stages[0]["seconds"]
        for workers, stage in zip(worker_counts, stages, strict=True):
            rate = stage["n_patches"] / stage["seconds"]
            per_worker = rate / workers
            ratio = per_worker / raw["patches_per_s"]
            rows.append({
                "workers": workers,
                "n_patches": stage["n_patches"],
                "seconds": stage["seconds"],
                "patches_per_s": rate,
                "patches_per_s_per_worker": per_worker,
                "per_worker_over_raw": ratio,
                "speed_up_over_one_worker": rate / single_rate,
                "megapixels_written_per_s": stage["pixels_written"] / stage["seconds"] / 1e6,
                "cpu_s": stage["cpu_s"],
                "cores_used": stage["cpu_s"] / stage["process_s"],
                "load_average": stage["load_average"],
            })
            self.say(
                f"  patches stage, {workers} worker(s): {stage['n_patches']:,} patches in "
                f"{stage['seconds']:.1f} s = {rate:.0f} patches/s, {per_worker:.0f} per worker, "
                f"ratio {ratio:.2f} ({_verdict(ratio >= READ_PER_WORKER_TARGET)} target >= "
                f"{READ_PER_WORKER_TARGET}), x{rate / single_rate:.2f} over 1 worker; "
                f"{rows[-1]['cores_used']:.2f} cores busy on average, load {_load_text(stage['load_average'])}"
            )
        self.results["a_reading"] = {
            "slide_px": run.side_px,
            "patch_px": PATCH_PX,
            "stride_px": STRIDE_PX,
            "raw": raw,
            "stage": rows,
            "target_per_worker_ratio": READ_PER_WORKER_TARGET,
            "met": all(row["per_worker_over_raw"] >= READ_PER_WORKER_TARGET for row in rows),
        }

    # b. inference

    def section_inference(self) -> None:
        sizes = self.sizes
        self.say(
            f"\nb. inference: raw model.predict on in-memory patches against run_infer "
            f"(Zarr reading and writing included)"
        )
        folder = self.work_dir / "bundled-infer"

        # A patches store of the bundled slide with a first shard of whole grid rows.
        self.runner.run(
            "inspect_tissue", {"slide": str(BUNDLED_SLIDE), "slide_id": "CMU-1-Small-Region", "out_dir": str(folder)}
        )
        self.runner.run("patches", {
            "out_dir": str(folder),
            "out_zarr": str(folder / "patches.zarr"),
            "out_plan": str(folder / "shards.json"),
            "options": {
                "patch_size_px": sizes.infer_patch_px,
                "stride_px": sizes.infer_patch_px // 2,
                "target_mpp_um": sizes.infer_target_mpp_um,
                "workers": 1,
                "patches_per_shard": sizes.infer_patches,
            },
        })
        result = self.runner.run("inference", {
            "patches_zarr": str(folder / "patches.zarr"),
            "plan_json": str(folder / "shards.json"),
            "out_zarr": str(folder / "shard-0.zarr"),
            "batch_size": sizes.infer_batch_size,
            "output_downsample": OUTPUT_DOWNSAMPLE,
            "rounds": sizes.infer_rounds,
        })

        resolution = _resolution_text(sizes.infer_target_mpp_um)
        self.say(
            f"  {result['n_patches']} patches of {result['patch_px']} px at {resolution} of the "
            f"bundled slide, batch {result['batch_size']}, {result['keras_backend']} "
            f"{result['precision']}, GPUs: {', '.join(result['gpus']) or 'none'}"
        )
        if not result["gpus"]:
            self.say("  (no GPU: small patches keep this section to minutes on a CPU)")
        for index, round_ in enumerate(result["rounds"], start=1):
            stage = round_["stage"]
            self.say(
                f"  round {index}: raw model.predict {round_['raw_predict_patches_per_s']:.1f}, "
                f"raw predict_on_batch {round_['raw_batch_calls_patches_per_s']:.1f}, run_infer "
                f"{round_['stage_patches_per_s']:.1f} patches/s (model {stage['predict_s']:.1f} s of "
                f"{stage['loop_s']:.1f} s, waiting for input {stage['input_wait_s']:.2f} s, start-up "
                f"{stage['seconds'] - stage['loop_s']:.1f} s), load {_load_text(round_['load_average'])}"
            )

        raw_predict = float(np.mean([r["raw_predict_patches_per_s"] for r in result["rounds"]]))
        raw_calls = float(np.mean([r["raw_batch_calls_patches_per_s"] for r in result["rounds"]]))
        stage_rate = float(np.mean([r["stage_patches_per_s"] for r in result["rounds"]]))
        ratio = stage_rate / raw_predict
        ratio_calls = stage_rate / raw_calls
        self.say(
            f"  mean run_infer / raw model.predict {ratio:.2f} ({_verdict(ratio >= INFER_RATIO_TARGET)} "
            f"target >= {INFER_RATIO_TARGET}); run_infer / raw predict_on_batch {ratio_calls:.2f}"
        )
        shutil.rmtree(folder, ignore_errors=True)
        self.results["b_inference"] = {
            **result,
            "target_mpp_um": sizes.infer_target_mpp_um,
            "raw_predict_patches_per_s": raw_predict,
            "raw_batch_calls_patches_per_s": raw_calls,
            "stage_patches_per_s": stage_rate,
            "stage_over_raw_predict": ratio,
            "stage_over_raw_batch_calls": ratio_calls,
            "target_ratio": INFER_RATIO_TARGET,
            "met": ratio >= INFER_RATIO_TARGET,
        }

    # c. stitching and vectorising

    def section_map(self) -> None:
        self.say(
            f"\nc. stitch and vectorise at output downsample {OUTPUT_DOWNSAMPLE}: the shards are "
            f"GENERATED (no model runs here; user runs always predict them)"
        )
        rows = []
        for label, side_px in (("small", self.sizes.small_slide_px), ("large", self.sizes.large_slide_px)):
            run = self.slide(label, side_px)
            rows.append(self._map_stages(run, self.patches(run, self.max_workers)))
        # No later section reads the patches stores (the large one takes GBs).
        for run in self.slides.values():
            self.drop_other_stores(run, keep_workers=0)
        self.results["c_map"] = {
            "output_downsample": OUTPUT_DOWNSAMPLE,
            "shards_generated": True,
            "sizes": rows,
            "target_rss_bytes": MAP_STAGE_RSS_TARGET_BYTES,
            "met": all(
                row["stitch"]["tree_peak_rss_bytes"] < MAP_STAGE_RSS_TARGET_BYTES
                and row["vectorise"]["tree_peak_rss_bytes"] < MAP_STAGE_RSS_TARGET_BYTES
                for row in rows
            ),
        }

    def _map_stages(self, run: SlideRun, patches: dict[str, Any]) -> dict[str, Any]:
        folder = run.folder
        shards = self.runner.run("shards", {
            "patches_zarr": patches["store"],
            "plan_json": patches["plan"],
            "out_dir": str(folder / "predictions"),
            "output_downsample": OUTPUT_DOWNSAMPLE,
            "discs": run.discs,
        })
        stitch = self.runner.run("stitch", {
            "patches_zarr": patches["store"], "shards": shards["shards"],
            "out_zarr": str(folder / "probability.zarr"),
        })
        vectorise = self.runner.run("vectorise", {
            "probability_zarr": str(folder / "probability.zarr"), "out_dir": str(folder),
        })
        gigapixels = run.side_px**2 / 1e9
        area_error = vectorise["tumour_area_px_level0"] / shards["expected_tumour_px_level0"] - 1.0
        self.say(
            f"  {run.side_px:,} px slide ({gigapixels:.2f} gigapixels, {patches['n_patches']:,} patches, "
            f"{len(shards['shards'])} generated shards written in {shards['seconds']:.0f} s):"
        )
        for name, result in (("stitch", stitch), ("vectorise", vectorise)):
            self.say(
                f"    {name:<9} {result['seconds']:7.1f} s = {result['seconds'] / gigapixels:6.1f} s per "
                f"gigapixel ({result['cpu_s']:.1f} CPU s in the child), peak RSS {_mib(result['tree_peak_rss_bytes'])} "
                f"({_verdict(result['tree_peak_rss_bytes'] < MAP_STAGE_RSS_TARGET_BYTES)} target < 2 GiB), "
                f"load {_load_text(result['load_average'])}"
            )
        self.say(
            f"    check: {vectorise['n_tumour_regions']} polygons for {shards['expected_regions']} "
            f"generated tumour discs, tumour area {area_error:+.2%} from the analytic area"
        )
        for path in [*shards["shards"], folder / "probability.zarr"]:
            shutil.rmtree(path, ignore_errors=True)
        return {
            "slide_px": run.side_px,
            "gigapixels": gigapixels,
            "n_patches": patches["n_patches"],
            "n_shards": len(shards["shards"]),
            "stitch": {**stitch, "s_per_gigapixel": stitch["seconds"] / gigapixels},
            "vectorise": {**vectorise, "s_per_gigapixel": vectorise["seconds"] / gigapixels},
            "n_expected_regions": shards["expected_regions"],
            "tumour_area_relative_error": area_error,
        }

    # d. pipeline overhead

    def section_overhead(self) -> None:
        sizes = self.sizes
        self.say("\nd. pipeline overhead on the bundled slide: (wall time - model time) / wall time")
        folder = self.work_dir / "bundled-pipeline"

        # The stage functions' defaults, except for the patch size and the resolution.
        options: dict[str, Any] = {
            "patch_size_px": sizes.pipeline_patch_px,
            "stride_px": sizes.pipeline_patch_px // 2,
            "target_mpp_um": sizes.pipeline_target_mpp_um,
            "workers": min(2, self.max_workers),
        }
        result = self.runner.run("pipeline", {
            "slide": str(BUNDLED_SLIDE), "slide_id": "CMU-1-Small-Region", "out_dir": str(folder),
            "patches_options": options, "output_downsample": OUTPUT_DOWNSAMPLE,
        })

        total_s, model_s, startup_s = result["total_s"], result["model_s"], result["infer_startup_s"]
        fraction = (total_s - model_s) / total_s
        fraction_after_startup = (total_s - startup_s - model_s) / (total_s - startup_s)
        resolution = _resolution_text(sizes.pipeline_target_mpp_um)
        self.say(
            f"  {result['n_patches']} patches of {sizes.pipeline_patch_px} px at {resolution}, "
            f"{result['n_shards']} shard(s); stages: "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["stage_s"].items())
        )
        self.say(
            f"  total {total_s:.1f} s, model {model_s:.1f} s, overhead {fraction:.1%} "
            f"({_verdict(fraction < OVERHEAD_FRACTION_TARGET)} target < {OVERHEAD_FRACTION_TARGET:.0%}); "
            f"inference start-up (Keras import, model build, tracing) {startup_s:.1f} s, "
            f"overhead without it {fraction_after_startup:.1%}, load {_load_text(result['load_average'])}"
        )
        shutil.rmtree(folder, ignore_errors=True)
        self.results["d_overhead"] = {
            **result,
            "patch_px": sizes.pipeline_patch_px,
            "target_mpp_um": sizes.pipeline_target_mpp_um,
            "overhead_fraction": fraction,
            "overhead_fraction_without_startup": fraction_after_startup,
            "target_fraction": OVERHEAD_FRACTION_TARGET,
            "met": fraction < OVERHEAD_FRACTION_TARGET,
        }

    # e. memory against slide area

    def section_memory(self) -> None:
        self.say(
            f"\ne. peak RSS against slide area: tissue detection and patch extraction "
            f"({self.max_workers} worker(s))"
        )
        rows = {}
        for label, side_px in (("small", self.sizes.small_slide_px), ("large", self.sizes.large_slide_px)):
            run = self.slide(label, side_px)
            patches = self.patches(run, self.max_workers)
            rows[label] = {
                "slide_px": side_px,
                "thumbnail_px": run.tissue["thumbnail_px"],
                "tissue_peak_rss_bytes": run.tissue["tree_peak_rss_bytes"],
                "tissue_s": run.tissue["tissue_s"],
                "patches_tree_peak_rss_bytes": patches["tree_peak_rss_bytes"],
                "patches_main_peak_rss_bytes": patches["peak_rss_bytes"],
                "patches_worker_peak_rss_bytes": patches["worker_peak_rss_bytes"],
                "patches_s": patches["seconds"],
                "n_patches": patches["n_patches"],
                "patches_store_bytes": patches["store_bytes"],
            }
            self.say(
                f"  {side_px:,} px: tissue {_mib(rows[label]['tissue_peak_rss_bytes'])} "
                f"({run.tissue['tissue_s']:.1f} s, thumbnail {_size_text(run.tissue['thumbnail_px'])}); "
                f"patches {_mib(patches['tree_peak_rss_bytes'])} for all processes (main "
                f"{_mib(patches['peak_rss_bytes'])}, largest worker "
                f"{_mib(patches['worker_peak_rss_bytes'])}), {patches['n_patches']:,} patches in "
                f"{patches['seconds']:.1f} s, store {patches['store_bytes'] / _MIB:.0f} MiB on disk"
            )

        # The tissue thumbnail grows with the slide until max_thumbnail_px caps it, so a
        # slide beyond the cap shows the bound of tissue detection.
        if self.sizes.capped_thumbnail_slide_px:
            run = self.slide("capped", self.sizes.capped_thumbnail_slide_px)
            rows["capped"] = {
                "slide_px": run.side_px,
                "thumbnail_px": run.tissue["thumbnail_px"],
                "tissue_peak_rss_bytes": run.tissue["tree_peak_rss_bytes"],
                "tissue_s": run.tissue["tissue_s"],
            }
            self.say(
                f"  {run.side_px:,} px: tissue {_mib(run.tissue['tree_peak_rss_bytes'])} "
                f"({run.tissue['tissue_s']:.1f} s, thumbnail {_size_text(run.tissue['thumbnail_px'])}, "
                f"at its size cap); tissue detection only"
            )
            run.slide_path.unlink()

        growth = {
            name: rows["large"][key] / rows["small"][key]
            for name, key in (("tissue", "tissue_peak_rss_bytes"), ("patches", "patches_tree_peak_rss_bytes"))
        }
        area_ratio = (self.sizes.large_slide_px / self.sizes.small_slide_px) ** 2
        met = {name: value <= RSS_GROWTH_TARGET for name, value in growth.items()}
        self.say(
            f"  {area_ratio:.0f}x the area: tissue RSS x{growth['tissue']:.2f} "
            f"({_verdict(met['tissue'])} target <= x{RSS_GROWTH_TARGET}), patches RSS "
            f"x{growth['patches']:.2f} ({_verdict(met['patches'])} target <= x{RSS_GROWTH_TARGET})"
        )
        self.results["e_memory"] = {
            "sizes": rows,
            "area_ratio": area_ratio,
            "rss_growth": growth,
            "target_growth": RSS_GROWTH_TARGET,
            "met": all(met.values()),
        }

    def summarise(self) -> None:
        """Print one line per target: the measured values and whether they meet it."""
        results = self.results
        self.say("\nsummary: target, measured values, verdict")
        if "a_reading" in results:
            section = results["a_reading"]
            values = ", ".join(
                f"{row['per_worker_over_raw']:.2f} ({row['workers']} worker(s))" for row in section["stage"]
            )
            self.say(f"  a. patches stage per worker / raw read_region >= {READ_PER_WORKER_TARGET}: "
                     f"{values}: {_verdict(section['met'])}")
        if "b_inference" in results:
            section = results["b_inference"]
            self.say(f"  b. run_infer / raw model.predict >= {INFER_RATIO_TARGET}: "
                     f"{section['stage_over_raw_predict']:.2f}: {_verdict(section['met'])}")
        if "c_map" in results:
            section = results["c_map"]
            values = ", ".join(
                f"stitch {_mib(row['stitch']['tree_peak_rss_bytes'])} and vectorise "
                f"{_mib(row['vectorise']['tree_peak_rss_bytes'])} at {row['slide_px']:,} px"
                for row in section["sizes"]
            )
            self.say(f"  c. peak RSS < 2 GiB: {values}: {_verdict(section['met'])}")
        if "d_overhead" in results:
            section = results["d_overhead"]
            self.say(f"  d. pipeline overhead < {OVERHEAD_FRACTION_TARGET:.0%}: "
                     f"{section['overhead_fraction']:.1%}: {_verdict(section['met'])}")
        if "e_memory" in results:
            section = results["e_memory"]
            growth = section["rss_growth"]
            self.say(f"  e. peak RSS growth over {section['area_ratio']:.0f}x the area <= x{RSS_GROWTH_TARGET}: "
                     f"tissue x{growth['tissue']:.2f}, patches x{growth['patches']:.2f}: {_verdict(section['met'])}")

    def run(self) -> dict[str, Any]:
        """Run the chosen sections and return every result."""
        started = time.perf_counter()
        self.results["machine"] = machine_info()
        self.results["sizes"] = dataclasses.asdict(self.sizes)
        self.results["max_workers"] = self.max_workers
        machine = self.results["machine"]
        self.say(
            f"wsiseg benchmark on {machine['cpu_model']}, {machine['cpu_cores']} cores, "
            f"{machine['memory_bytes'] / _GIB:.0f} GiB, load average {_load_text(machine['load_average_start'])} "
            f"(1, 5, 15 min) at the start"
        )
        # c and e reuse the slides and stores of a; b and d use the bundled slide.
        steps = {
            "a": self.section_reading,
            "e": self.section_memory,
            "c": self.section_map,
            "b": self.section_inference,
            "d": self.section_overhead,
        }
        for letter, step in steps.items():
            if letter in self.sections:
                step()

        self.summarise()
        self.results["seconds"] = time.perf_counter() - started
        self.results["load_average_end"] = list(os.getloadavg())
        self.say(
            f"\ndone in {self.results['seconds']:.0f} s, load average "
            f"{_load_text(self.results['load_average_end'])} at the end"
        )
        return self.results


def machine_info() -> dict[str, Any]:
    """Return the CPU, memory, load and library versions of this machine."""
    import openslide
    import psutil
    import zarr

    import wsiseg

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wsiseg": wsiseg.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "openslide_python": openslide.__version__,
        "openslide": openslide.__library_version__,
    }


def _verdict(met: bool) -> str:
    return "meets" if met else "MISSES"


def _mib(value_bytes: float) -> str:
    return f"{value_bytes / _MIB:.0f} MiB"


def _resolution_text(target_mpp_um: float | None) -> str:
    return "level 0" if target_mpp_um is None else f"{target_mpp_um:g} µm/px"


def _size_text(size_px: Sequence[int]) -> str:
    return f"{size_px[0]:,} x {size_px[1]:,} px"


def _load_text(load: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


# --- command line ----------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wsiseg benchmark",
        description=(
            "Measure each stage's throughput against the library call beneath it, and the "
            "memory of the stages on large synthetic slides."
        ),
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (about a minute)")
    preset.add_argument(
        "--full", action="store_true",
        help="the 100,000 x 100,000 px slide and the bundled slide at level 0 (7 to 9 min on 2 CPU cores)",
    )
    parser.add_argument("--sections", default=SECTIONS, help=f"letters of the sections to run (default {SECTIONS})")
    parser.add_argument("--large-slide-px", type=int, help="side of the large synthetic slide in px")
    parser.add_argument("--small-slide-px", type=int, help="side of the small synthetic slide in px")
    parser.add_argument("--max-workers", type=int, help="maximum number of patches workers (default: the CPU cores)")
    parser.add_argument("--infer-patches", type=int, help="about this many patches in section b")
    parser.add_argument("--infer-patch-px", type=int, help="patch side in px in section b (multiple of 32)")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--work-dir", default=None, help="folder for generated files, kept afterwards (default: a temporary folder, deleted)")
    parser.add_argument("--verbose", action="store_true", help="show the child processes' logs")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "PARAMS", "RESULT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _sizes_from_args(args: argparse.Namespace) -> Sizes:
    preset = "standard"
    if args.quick:
        preset = "quick"
    elif args.full:
        preset = "full"
    overrides = {
        field: value
        for field, value in (
            ("large_slide_px", args.large_slide_px),
            ("small_slide_px", args.small_slide_px),
            ("infer_patches", args.infer_patches),
            ("infer_patch_px", args.infer_patch_px),
        )
        if value is not None
    }
    sizes = dataclasses.replace(PRESETS[preset], **overrides)
    if sizes.small_slide_px < 1024 or sizes.large_slide_px < sizes.small_slide_px:
        raise ValueError(
            f"slide sides must satisfy 1024 <= small <= large, got small {sizes.small_slide_px} "
            f"and large {sizes.large_slide_px} px"
        )
    if sizes.infer_patch_px % 32 or sizes.infer_patch_px < 32:
        raise ValueError(f"--infer-patch-px must be a positive multiple of 32, got {sizes.infer_patch_px}")
    if sizes.infer_patches < 1:
        raise ValueError(f"--infer-patches must be positive, got {sizes.infer_patches}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from command-line arguments; return the exit code."""
    args = _parse_args(argv)
    if args.child:
        return _run_child_task(*args.child)

    try:
        sizes = _sizes_from_args(args)
    except ValueError as error:
        logger.error("invalid benchmark option: %s", error)
        return 2
    sections = "".join(letter for letter in SECTIONS if letter in args.sections)
    if not sections or set(args.sections) - set(SECTIONS):
        logger.error("--sections takes letters from %s, got %r", SECTIONS, args.sections)
        return 2
    if set(sections) & set("bd") and not BUNDLED_SLIDE.is_file():
        logger.error(
            "sections b and d need the bundled slide %s, which only a source checkout of "
            "wsiseg contains; run them from one, or choose --sections ace", BUNDLED_SLIDE,
        )
        return 2
    max_workers = args.max_workers or len(os.sched_getaffinity(0))
    if max_workers < 1:
        logger.error("--max-workers must be positive, got %d", max_workers)
        return 2

    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="wsiseg-benchmark-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = Benchmark(sizes, sections, work_dir, max_workers, verbose=args.verbose).run()
    except BenchmarkError as error:
        logger.error("%s", error)
        return 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    from wsiseg.logs import setup_logging

    setup_logging("INFO")
    sys.exit(main())
