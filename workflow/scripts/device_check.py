"""Measure inference throughput on one GPU: raw model.predict against the inference stage.

Usage (from the repository root, in the environment the README sets up):

    python workflow/scripts/device_check.py                 # 4096 patches of 256 px
    python workflow/scripts/device_check.py --xla           # also with XLA compilation
    python workflow/scripts/device_check.py --patches 64 --patch-size 64   # a CPU smoke run

The script writes a patches Zarr store of generated tissue-like texture (the layout the
patches stage writes), then, for each precision, starts a child process that:

1. claims a GPU as an inference job does and imports Keras (start-up, part 1);
2. times ``model.predict`` on the patches held in memory as float32, after an identical
   warm-up call that traces the model (raw throughput);
3. runs ``wsiseg.infer.run_infer`` on the store as one shard and reports its throughput
   from the first batch, after the model is traced, to the written store (reading,
   predicting and writing), and over the whole call (model building and tracing included).

Targets on an H100/H200-class GPU: raw mixed_float16 >= 2,000 patches/s of 256 x 256 px,
and stage throughput >= 0.9 x raw. The numbers go to stdout and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_store(path: Path, n_patches: int, patch_px: int, stride_px: int, chunk_px: int) -> int:
    """Write a patches store with a square grid of at least ``n_patches``; return the count."""
    import zarr
    from zarr.codecs import BloscCodec

    side = math.ceil(math.sqrt(n_patches))
    image_px = (side - 1) * stride_px + patch_px
    group = zarr.open_group(str(path), mode="w")
    image = group.create_array(
        "image",
        shape=(image_px, image_px, 3),
        chunks=(chunk_px, chunk_px, 3),
        dtype="uint8",
        fill_value=255,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    )

    # Texture: smooth pink-purple colour fields plus pixel noise, one chunk row at a time.
    rng = np.random.default_rng(0)
    for y0 in range(0, image_px, chunk_px):
        height = min(chunk_px, image_px - y0)
        coarse = rng.integers(90, 230, size=(height // 16 + 1, image_px // 16 + 1, 3))
        block = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :image_px]
        noise = rng.integers(-12, 12, size=block.shape)
        image[y0 : y0 + height] = np.clip(block + noise, 0, 255).astype(np.uint8)

    rows, cols = np.divmod(np.arange(side * side, dtype=np.int64), side)
    grid = np.stack([rows, cols], axis=1)
    group.create_array("grid", data=grid)
    group.create_array("coords", data=grid[:, ::-1] * stride_px)
    group.attrs.update(
        {
            "slide_id": "device-check",
            "patch_size_px": patch_px,
            "stride_px": stride_px,
            "level": 0,
            "analysis_downsample": 1.0,
            "mpp_x": None,
            "mpp_y": None,
            "n_patches": int(grid.shape[0]),
            "n_rows": side,
            "n_cols": side,
            "status": "ok",
            "message": "",
        }
    )
    return int(grid.shape[0])


def write_plan(path: Path, n_patches: int, side: int) -> None:
    """Write a plan with one shard over every row."""
    from wsiseg.shards import plan_shards

    shards = plan_shards([side] * side, n_patches, 1)
    plan = {
        "slide_id": "device-check",
        "status": "ok",
        "n_patches": n_patches,
        "n_shards": 1,
        "shards": shards,
    }
    path.write_text(json.dumps(plan))


def measure(args: argparse.Namespace) -> dict:
    """Run the measurements for one precision in this process and return them."""
    process_started = time.perf_counter()

    # Claim the device before Keras is imported, as the inference stage does.
    from wsiseg.devices import assign_device

    assignment = assign_device(None, args.lock_dir)

    import keras

    from wsiseg import backend
    from wsiseg.model import build_model, preprocess

    precision = backend.configure(args.precision)
    gpus = backend.list_gpus()
    import_s = time.perf_counter() - process_started

    # Raw model.predict on in-memory float32 patches.
    import zarr

    group = zarr.open_group(args.store, mode="r")
    image = group["image"][:]
    grid = group["grid"][:]
    patches = np.stack(
        [
            image[r * args.stride : r * args.stride + args.patch_size,
                  c * args.stride : c * args.stride + args.patch_size]
            for r, c in grid
        ]
    )
    inputs = preprocess(patches, "digipathai")
    del image, patches

    keras.utils.set_random_seed(0)
    build_started = time.perf_counter()
    model = build_model()
    model.compile(jit_compile=args.xla)
    build_s = time.perf_counter() - build_started

    # The warm-up runs the same call as the timed one, so any tracing that model.predict
    # does for the data it is given happens here.
    warm_started = time.perf_counter()
    model.predict(inputs, batch_size=args.batch_size, verbose=0)
    warm_up_s = time.perf_counter() - warm_started

    raw_started = time.perf_counter()
    model.predict(inputs, batch_size=args.batch_size, verbose=0)
    raw_s = time.perf_counter() - raw_started
    n_patches = int(inputs.shape[0])
    del inputs, model

    # The inference stage on the store.
    from wsiseg.infer import run_infer

    out = Path(args.work_dir) / f"shard-{args.precision}-{'xla' if args.xla else 'noxla'}.zarr"
    summary = run_infer(
        args.store,
        args.plan,
        0,
        out,
        output_downsample=4,
        batch_size=args.batch_size,
        precision=args.precision,
        xla=args.xla,
        lock_dir=args.lock_dir,
        seed=0,
    )

    return {
        "precision": precision,
        "xla": args.xla,
        "device": assignment.label,
        "gpus": gpus,
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "patch_size_px": args.patch_size,
        "batch_size": args.batch_size,
        "n_patches": n_patches,
        "startup_import_s": import_s,
        "build_s": build_s,
        "warm_up_s": warm_up_s,
        "raw_patches_per_s": n_patches / raw_s,
        "stage_loop_patches_per_s": summary["loop_patches_per_s"],
        "stage_total_patches_per_s": summary["n_patches"] / summary["seconds"],
        "stage_startup_s": summary["seconds"] - summary["loop_s"],
        "stage_input_wait_s": summary["input_wait_s"],
        "stage_over_raw": summary["loop_patches_per_s"] * raw_s / n_patches,
    }


def print_table(results: list[dict]) -> None:
    """Print one line per configuration."""
    print()
    print(
        f"{'precision':<15}{'xla':<5}{'raw p/s':>10}{'stage p/s':>11}{'stage/raw':>11}"
        f"{'total p/s':>11}{'import s':>10}{'build s':>9}{'warm-up s':>10}{'wait s':>8}"
    )
    for result in results:
        print(
            f"{result['precision']:<15}{'yes' if result['xla'] else 'no':<5}"
            f"{result['raw_patches_per_s']:>10.1f}{result['stage_loop_patches_per_s']:>11.1f}"
            f"{result['stage_over_raw']:>11.2f}{result['stage_total_patches_per_s']:>11.1f}"
            f"{result['startup_import_s']:>10.1f}{result['build_s']:>9.1f}"
            f"{result['warm_up_s']:>10.1f}{result['stage_input_wait_s']:>8.1f}"
        )
    if results:
        print(
            f"\ndevice {results[0]['device']} ({', '.join(results[0]['gpus']) or 'no GPU'}), "
            f"Keras {results[0]['keras_version']} on {results[0]['keras_backend']}, "
            f"{results[0]['n_patches']} patches of {results[0]['patch_size_px']} px, "
            f"batch {results[0]['batch_size']}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--patches", type=int, default=4096, help="number of patches (rounded up to a square)")
    add("--patch-size", type=int, default=256, help="patch side in px (a multiple of 32)")
    add("--stride", type=int, default=None, help="grid stride in px (default: half the patch)")
    add("--chunk-px", type=int, default=1024, help="Zarr chunk side in px")
    add("--batch-size", type=int, default=64, help="patches per model call")
    add("--precisions", default="float32,mixed_float16", help="comma-separated precisions")
    add("--xla", action="store_true", help="also measure with XLA compilation")
    add("--work-dir", default=None, help="folder for the generated store (default: temporary)")
    add("--json", default=None, help="also write the results to this JSON file")
    add("--timeout-s", type=float, default=900, help="maximum run time of each child, in s")
    # Internal: the child process that measures one configuration.
    add("--child", action="store_true", help=argparse.SUPPRESS)
    add("--precision", default=None, help=argparse.SUPPRESS)
    add("--store", default=None, help=argparse.SUPPRESS)
    add("--plan", default=None, help=argparse.SUPPRESS)
    add("--lock-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stride is None:
        args.stride = args.patch_size // 2
    return args


def run_child(args: argparse.Namespace, precision: str, xla: bool, paths: dict) -> dict:
    """Measure one configuration in a fresh process, so each starts as a job does."""
    result_path = Path(paths["work_dir"]) / f"result-{precision}-{int(xla)}.json"
    command = [
        sys.executable, __file__, "--child",
        "--precision", precision,
        "--store", str(paths["store"]),
        "--plan", str(paths["plan"]),
        "--lock-dir", str(paths["lock_dir"]),
        "--work-dir", str(paths["work_dir"]),
        "--patch-size", str(args.patch_size),
        "--stride", str(args.stride),
        "--batch-size", str(args.batch_size),
        "--json", str(result_path),
    ] + (["--xla"] if xla else [])
    print(f"measuring {precision}{' with XLA' if xla else ''} ...", flush=True)
    subprocess.run(command, check=True, timeout=args.timeout_s)
    return json.loads(result_path.read_text())


def main(argv: list[str] | None = None) -> int:
    """Generate the store, measure each configuration, print the table."""
    args = parse_args(argv)

    if args.child:
        import logging

        from wsiseg.logs import setup_logging

        setup_logging(logging.INFO)
        result = measure(args)
        Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="wsiseg-device-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "work_dir": work_dir,
        "store": work_dir / "patches.zarr",
        "plan": work_dir / "shards.json",
        "lock_dir": work_dir / "gpu-locks",
    }

    started = time.perf_counter()
    n_patches = write_store(
        paths["store"], args.patches, args.patch_size, args.stride, args.chunk_px
    )
    write_plan(paths["plan"], n_patches, math.isqrt(n_patches))
    print(f"wrote {n_patches} patches to {paths['store']} in {time.perf_counter() - started:.1f} s")

    results = []
    for precision in args.precisions.split(","):
        for xla in [False, True] if args.xla else [False]:
            results.append(run_child(args, precision.strip(), xla, paths))

    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
