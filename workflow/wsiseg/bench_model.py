"""Micro-benchmark of the U-Net: build time, parameters, FLOPs and prediction speed.

Run as ``wsiseg bench-model [options]`` or ``python -m wsiseg.bench_model [options]``.
Prediction runs on random patches with ``predict_on_batch`` (what a patch loop calls),
with ``predict`` (Keras's own loop, which adds its per-call set-up) and, with ``--eager``,
by calling the model directly. Every call predicts one batch. Each method is called once
untimed first, so that tracing and graph building stay out of the times. The weights are freshly initialised, which does not change the speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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
        "--repeats",
        type=int,
        default=3,
        help="timed calls per method and batch size, after one untimed call",
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


def _busy_cpu_s() -> float | None:
    """Return the CPU seconds all processes have used since boot, or None off Linux."""
    try:
        with open("/proc/stat") as stream:
            fields = stream.readline().split()[1:]
    except OSError:
        return None
    # user, nice, system, idle, iowait, irq, softirq, steal: all but idle and iowait count.
    ticks = [int(value) for value in fields[:8]]
    busy_ticks = sum(ticks) - ticks[3] - ticks[4]
    return busy_ticks / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _time_method(
    method: str, batch_size: int, call: Callable[[], Any], repeats: int
) -> dict[str, Any]:
    """Call once untimed, then time ``repeats`` calls that each predict one batch.

    ``other_cpu_s`` is the CPU time that other processes (and the hypervisor, as steal
    time) took during the timed calls. Near zero, the times are free of contention.
    Otherwise they are inflated, and the best call is the closer estimate of the speed.
    """
    call()

    busy_before_s = _busy_cpu_s()
    own_before_s = _own_cpu_s()
    durations_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        durations_s.append(time.perf_counter() - started)
    busy_after_s = _busy_cpu_s()
    own_after_s = _own_cpu_s()

    other_cpu_s = None
    if busy_before_s is not None and busy_after_s is not None:
        other_cpu_s = max(0.0, (busy_after_s - busy_before_s) - (own_after_s - own_before_s))

    median_s = statistics.median(durations_s)
    best_s = min(durations_s)
    return {
        "method": method,
        "batch_size": batch_size,
        "median_s_per_batch": round(median_s, 3),
        "best_s_per_batch": round(best_s, 3),
        "patches_per_s": round(batch_size / median_s, 2),
        "best_patches_per_s": round(batch_size / best_s, 2),
        "other_cpu_s": None if other_cpu_s is None else round(other_cpu_s, 2),
    }


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

        methods: list[tuple[str, Callable[[], Any]]] = [
            ("predict_on_batch", lambda: model.predict_on_batch(batch)),
            ("predict", lambda: model.predict(batch, batch_size=batch_size, verbose=0)),
        ]
        if eager:
            # Calling the model directly runs eagerly, layer by layer, with no traced graph.
            methods.append(("model(x), eager", lambda: np.asarray(model(batch, training=False))))

        for method, call in methods:
            results["timings"].append(_time_method(method, batch_size, call, repeats))
        logger.info("timed batch size %d (%d calls per method)", batch_size, repeats)

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
        "patches/s from the median and the best call; other CPU s: CPU time other "
        "processes took meanwhile",
        f"{'method':<18}{'batch':>6}{'median s':>10}{'best s':>8}"
        f"{'patches/s':>11}{'best':>7}{'other CPU s':>13}",
    ]
    for timing in results["timings"]:
        other = timing["other_cpu_s"]
        lines.append(
            f"{timing['method']:<18}{timing['batch_size']:>6}"
            f"{timing['median_s_per_batch']:>10.3f}{timing['best_s_per_batch']:>8.3f}"
            f"{timing['patches_per_s']:>11.2f}{timing['best_patches_per_s']:>7.2f}"
            f"{'n/a' if other is None else f'{other:.2f}':>13}"
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
