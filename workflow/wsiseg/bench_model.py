"""Micro-benchmark of the U-Net: build time, parameters, FLOPs and prediction speed.

Run as ``wsiseg bench-model [options]`` or ``python -m wsiseg.bench_model [options]``.
Prediction runs on random patches, first with ``predict_on_batch`` (one call per batch,
what a patch loop does), then with ``predict`` over several batches (Keras's own batching),
and with ``--eager`` also by calling the model directly. Each is called once untimed
first, so that tracing and graph building stay out of the times. The weights are freshly initialised, which does not change the speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from wsiseg.atomic import write_json

logger = logging.getLogger(__name__)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wsiseg bench-model",
        description="Time building the U-Net and predicting random patches with it.",
    )
    parser.add_argument("--patch-size", type=int, default=256, help="patch side in px (multiple of 32)")
    parser.add_argument(
        "--batch-sizes", default="1,8", help="comma-separated batch sizes to time (patches per call)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per batch size, after one untimed call"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "mixed_float16"],
        help="Keras dtype policy (auto: mixed_float16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument(
        "--no-flops",
        action="store_true",
        help="skip counting FLOPs (that needs a second, fixed-size build of the model)",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="also time calling the model directly (model(x)), which runs eagerly",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def count_conv_flops(model: Any) -> int:
    """Count the FLOPs of a fixed-size model's convolutions for one input image.

    A multiply-add counts as 2 FLOPs. BatchNorm, activations, pooling and additions are
    left out because they are elementwise work, small next to the convolutions.
    """
    import keras

    total = 0
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        _, height_px, width_px, out_channels = layer.output.shape
        kernel_height, kernel_width, in_channels, _ = layer.kernel.shape
        total += 2 * height_px * width_px * kernel_height * kernel_width * in_channels * out_channels
    return int(total)


def _time_calls(function: Any, repeats: int) -> list[float]:
    durations_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        durations_s.append(time.perf_counter() - started)
    return durations_s


def run_benchmark(
    *,
    patch_size_px: int = 256,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    precision: str = "auto",
    count_flops: bool = True,
    eager: bool = False,
) -> dict[str, Any]:
    """Build the model, time its predictions and return the measurements as a dict."""
    from wsiseg.backend import configure, list_gpus
    from wsiseg.model import build_model, check_input_size, preprocess

    check_input_size(patch_size_px, patch_size_px)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    precision_used = configure(precision)

    import keras

    started = time.perf_counter()
    model = build_model()
    build_s = time.perf_counter() - started

    results: dict[str, Any] = {
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "precision": precision_used,
        "gpus": list_gpus(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "patch_size_px": patch_size_px,
        "build_s": round(build_s, 2),
        "parameters": model.count_params(),
        "gflops_per_patch": None,
        "timings": [],
    }

    if count_flops:
        # Convolution output sizes are only known in a model built for one input size.
        fixed_model = build_model((patch_size_px, patch_size_px, 3), name="flops_count")
        results["gflops_per_patch"] = round(count_conv_flops(fixed_model) / 1e9, 2)
        del fixed_model

    rng = np.random.default_rng(0)
    for batch_size in batch_sizes:
        pixels = rng.integers(0, 256, (batch_size, patch_size_px, patch_size_px, 3), dtype=np.uint8)
        batch = preprocess(pixels)

        model.predict_on_batch(batch)
        durations_s = _time_calls(lambda: model.predict_on_batch(batch), repeats)
        median_s = statistics.median(durations_s)
        results["timings"].append(
            {
                "method": "predict_on_batch",
                "batch_size": batch_size,
                "s_per_batch": round(median_s, 3),
                "patches_per_s": round(batch_size / median_s, 2),
            }
        )

        # predict() over `repeats` batches, as one call, timed once.
        many = np.concatenate([batch] * repeats)
        model.predict(batch, batch_size=batch_size, verbose=0)
        (total_s,) = _time_calls(lambda: model.predict(many, batch_size=batch_size, verbose=0), 1)
        results["timings"].append(
            {
                "method": "predict",
                "batch_size": batch_size,
                "s_per_batch": round(total_s / repeats, 3),
                "patches_per_s": round(len(many) / total_s, 2),
            }
        )
        if eager:
            # Calling the model directly runs eagerly, layer by layer, with no traced graph.
            model(batch, training=False)
            durations_s = _time_calls(lambda: np.asarray(model(batch, training=False)), repeats)
            median_s = statistics.median(durations_s)
            results["timings"].append(
                {
                    "method": "model(x), eager",
                    "batch_size": batch_size,
                    "s_per_batch": round(median_s, 3),
                    "patches_per_s": round(batch_size / median_s, 2),
                }
            )
        logger.info("timed batch size %d (%d batches per method)", batch_size, repeats)

    return results


def format_results(results: dict[str, Any]) -> str:
    """Format benchmark results as a short plain-text table."""
    gflops = results["gflops_per_patch"]
    lines = [
        f"backend {results['keras_backend']} (Keras {results['keras_version']}), "
        f"precision {results['precision']}, GPUs: {', '.join(results['gpus']) or 'none'}, "
        f"CPU cores: {results['cpu_cores']}",
        f"build: {results['build_s']:.2f} s, parameters: {results['parameters']:,}",
        f"convolutions: {gflops} GFLOPs per {results['patch_size_px']} px patch"
        if gflops is not None
        else "convolutions: not counted",
        f"{'method':<18}{'batch':>6}{'s/batch':>10}{'patches/s':>11}",
    ]
    for timing in results["timings"]:
        lines.append(
            f"{timing['method']:<18}{timing['batch_size']:>6}"
            f"{timing['s_per_batch']:>10.3f}{timing['patches_per_s']:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from command-line arguments, print its table and return the exit code."""
    args = _parse_args(argv)
    try:
        batch_sizes = [int(value) for value in args.batch_sizes.split(",") if value.strip()]
    except ValueError:
        logger.error("--batch-sizes must be comma-separated integers, got %r", args.batch_sizes)
        return 2
    if not batch_sizes or min(batch_sizes) < 1:
        logger.error("--batch-sizes needs positive integers, got %r", args.batch_sizes)
        return 2

    try:
        results = run_benchmark(
            patch_size_px=args.patch_size,
            batch_sizes=batch_sizes,
            repeats=args.repeats,
            precision=args.precision,
            count_flops=not args.no_flops,
            eager=args.eager,
        )
    except ValueError as error:
        logger.error("invalid benchmark option: %s", error)
        return 2
    print(format_results(results))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    from wsiseg.logs import setup_logging

    setup_logging()
    sys.exit(main())
