"""Command-line entry point: ``wsiseg <stage> ...``, one sub-command per pipeline stage.

The Snakemake rules call these commands, and each one can be run by hand on one slide.
Stage modules are imported only by the sub-command that needs them, so ``wsiseg inspect``
starts without importing TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from wsiseg import __version__
from wsiseg.errors import WsisegError
from wsiseg.logs import setup_logging

logger = logging.getLogger("wsiseg")


def _add_parser(commands: argparse._SubParsersAction, name: str, **options) -> argparse.ArgumentParser:
    """Add a sub-command whose --help shows each option's default."""
    return commands.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **options)


def _int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value.strip()]


def _str_list(text: str) -> list[str]:
    return [value.strip() for value in text.split(",") if value.strip()]


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "inspect", help="record a slide's metadata and status as JSON")
    parser.add_argument("slide", help="slide file, or a DICOM WSI folder or file")
    parser.add_argument("--slide-id", required=True, help="id used in file names and messages")
    parser.add_argument("--out", required=True, help="slide.json to write")
    parser.add_argument("--mpp", type=float, default=None, help="MPP in µm/px that overrides the metadata")
    parser.add_argument("--mpp-source", default="sample_sheet", choices=["sample_sheet", "config"],
                        help="where --mpp came from, recorded as mpp_source")
    parser.add_argument("--default-mpp", type=float, default=None,
                        help="MPP in µm/px for a slide whose metadata has none (recorded as mpp_source config)")
    parser.add_argument("--mpp-min", type=float, default=0.05, help="smallest plausible MPP in µm/px")
    parser.add_argument("--mpp-max", type=float, default=100.0, help="largest plausible MPP in µm/px")
    parser.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> None:
    from wsiseg.slide import run_inspect

    run_inspect(args.slide, args.slide_id, args.out, mpp=args.mpp, mpp_source=args.mpp_source,
                default_mpp_um=args.default_mpp, mpp_min_um=args.mpp_min, mpp_max_um=args.mpp_max)


def _add_tissue(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "tissue", help="detect tissue on a low-resolution image of the slide")
    parser.add_argument("metadata", help="slide.json from `wsiseg inspect`")
    parser.add_argument("--mask", required=True, help="tissue mask PNG to write")
    parser.add_argument("--thumbnail", required=True, help="thumbnail PNG to write")
    parser.add_argument("--out", required=True, help="tissue.json to write")
    parser.add_argument("--thumbnail-mpp", type=float, default=8.0, help="detection resolution in µm/px")
    parser.add_argument("--max-thumbnail-px", type=int, default=4096, help="maximum side of the detection image in px")
    parser.set_defaults(run=_run_tissue)


def _run_tissue(args: argparse.Namespace) -> None:
    from wsiseg.tissue import run_tissue

    run_tissue(args.metadata, args.mask, args.thumbnail, args.out,
               thumbnail_mpp_um=args.thumbnail_mpp, max_thumbnail_px=args.max_thumbnail_px)


def _add_patches(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "patches", help="extract the tissue under the patch grid into a Zarr store")
    parser.add_argument("metadata", help="slide.json")
    parser.add_argument("tissue", help="tissue.json")
    parser.add_argument("mask", help="tissue mask PNG")
    parser.add_argument("--out", required=True, help="patches.zarr to write")
    parser.add_argument("--plan", required=True, help="shards.json (the shard plan) to write")
    parser.add_argument("--patch-size", type=int, default=256, help="patch side in analysis px (multiple of 32)")
    parser.add_argument("--stride", type=int, default=128, help="grid step in analysis px")
    parser.add_argument("--target-mpp", type=float, default=None, help="analysis resolution in µm/px; unset reads level 0")
    parser.add_argument("--min-tissue-fraction", type=float, default=0.01, help="tissue share a patch needs (0-1)")
    parser.add_argument("--chunk-px", type=int, default=1024, help="Zarr chunk side in px")
    parser.add_argument("--workers", type=int, default=2, help="reader processes, each with its own OpenSlide handle")
    parser.add_argument("--patches-per-shard", type=int, default=270000, help="target patches per inference shard")
    parser.add_argument("--max-shards", type=int, default=64, help="upper bound on shards per slide")
    parser.set_defaults(run=_run_patches)


def _run_patches(args: argparse.Namespace) -> None:
    from wsiseg.patches import run_patches

    run_patches(args.metadata, args.tissue, args.mask, args.out, args.plan,
                patch_size_px=args.patch_size, stride_px=args.stride, target_mpp_um=args.target_mpp,
                chunk_px=args.chunk_px, workers=args.workers, patches_per_shard=args.patches_per_shard,
                max_shards=args.max_shards, min_tissue_fraction=args.min_tissue_fraction)


def _add_infer(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "infer", help="predict tumour probabilities for one shard of patches")
    parser.add_argument("patches", help="patches.zarr")
    parser.add_argument("plan", help="shards.json")
    parser.add_argument("--shard", type=int, required=True, help="shard index in the plan")
    parser.add_argument("--out", required=True, help="shard prediction Zarr store to write")
    parser.add_argument("--weights", action="append", default=[],
                        help="weights file (.h5 from DigiPathAI, .weights.h5, .keras); repeat to ensemble")
    parser.add_argument("--imagenet-encoder-weights", default=None,
                        help="Keras InceptionResNetV2 no-top weights file to start the encoder from")
    parser.add_argument("--preprocessing", default="digipathai", choices=["digipathai", "imagenet"],
                        help="input normalisation: (x-128)/128 or x/127.5-1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained network")
    parser.add_argument("--batch-size", type=int, default=8, help="patches per model call")
    parser.add_argument("--tta", action="append", default=[],
                        choices=["flip_h", "flip_v", "rot90", "rot180", "rot270", "transpose", "anti_transpose"],
                        help="test-time augmentation; repeat for several")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_float16"],
                        help="auto: mixed_float16 on a GPU, float32 on a CPU")
    parser.add_argument("--xla", action="store_true", help="compile the model with XLA")
    parser.add_argument("--devices", type=lambda text: _str_list(text) or None, default=None,
                        help="comma-separated GPU ids jobs may claim; empty: every visible GPU")
    parser.add_argument("--lock-dir", default=None, help="folder of the per-GPU lock files")
    parser.add_argument("--output-downsample", type=int, default=4, help="analysis px per output map px")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    parser.set_defaults(run=_run_infer)


def _run_infer(args: argparse.Namespace) -> None:
    from wsiseg.infer import run_infer

    run_infer(args.patches, args.plan, args.shard, args.out, weights=args.weights,
              imagenet_encoder_weights=args.imagenet_encoder_weights, preprocessing=args.preprocessing,
              output_downsample=args.output_downsample, batch_size=args.batch_size, tta=args.tta,
              precision=args.precision, xla=args.xla, devices=args.devices, lock_dir=args.lock_dir,
              seed=args.seed, threads=args.threads)


def _add_stitch(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "stitch", help="merge shard predictions into one probability map")
    parser.add_argument("patches", help="patches.zarr")
    parser.add_argument("shards", nargs="+", help="shard prediction stores")
    parser.add_argument("--out", required=True, help="probability.zarr to write")
    parser.add_argument("--chunk-px", type=int, default=2048, help="map chunk side in px")
    parser.set_defaults(run=_run_stitch)


def _run_stitch(args: argparse.Namespace) -> None:
    from wsiseg.stitch import run_stitch

    run_stitch(args.patches, args.shards, args.out, chunk_px=args.chunk_px)


def _add_vectorise(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "vectorise", help="turn the probability map into GeoJSON polygons and statistics")
    parser.add_argument("probability", help="probability.zarr")
    parser.add_argument("metadata", help="slide.json")
    parser.add_argument("tissue", help="tissue.json")
    parser.add_argument("--out", required=True, help="GeoJSON to write (level-0 px of the full slide)")
    parser.add_argument("--stats", required=True, help="stats.json to write")
    parser.add_argument("--threshold", type=float, default=0.5, help="tumour probability threshold")
    parser.add_argument("--min-area-um2", type=float, default=2000.0, help="smallest region kept, in µm²")
    parser.add_argument("--min-area-px", type=float, default=8000.0,
                        help="smallest region kept, in level-0 px², for slides without MPP")
    parser.add_argument("--simplify-tolerance-px", type=float, default=0.5, help="simplification tolerance in map px")
    parser.add_argument("--class-name", default="Tumor", help="QuPath classification name")
    parser.add_argument("--class-color", type=_int_list, default=[200, 0, 0], help="QuPath colour as r,g,b")
    parser.add_argument("--tissue-mask", default=None,
                        help="tissue mask PNG; tumour is only traced inside tissue")
    parser.add_argument("--bounds-geojson", default=None,
                        help="also write a GeoJSON shifted by the slide's bounds offset (for QuPath)")
    parser.set_defaults(run=_run_vectorise)


def _run_vectorise(args: argparse.Namespace) -> None:
    from wsiseg.vectorise import run_vectorise

    run_vectorise(args.probability, args.metadata, args.tissue, args.out, args.stats,
                  threshold=args.threshold, min_area_um2=args.min_area_um2, min_area_px=args.min_area_px,
                  simplify_tolerance_px=args.simplify_tolerance_px, class_name=args.class_name,
                  class_color=args.class_color, bounds_geojson=args.bounds_geojson,
                  tissue_mask_png=args.tissue_mask)


def _add_overlay(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "overlay", help="draw tissue and tumour outlines on the thumbnail")
    parser.add_argument("thumbnail", help="thumbnail PNG")
    parser.add_argument("mask", help="tissue mask PNG")
    parser.add_argument("tissue", help="tissue.json")
    parser.add_argument("geojson", help="tumour GeoJSON")
    parser.add_argument("--out", required=True, help="overlay PNG to write")
    parser.set_defaults(run=_run_overlay)


def _run_overlay(args: argparse.Namespace) -> None:
    from wsiseg.report import render_overlay

    render_overlay(args.thumbnail, args.mask, args.tissue, args.geojson, args.out)


def _add_report(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(commands, "report", help="write the cohort CSV, one row per slide")
    parser.add_argument("stats", nargs="+", help="stats.json files")
    parser.add_argument("--out", required=True, help="report.csv to write")
    parser.add_argument("--benchmarks-dir", default=None,
                        help="folder of Snakemake benchmark files, summed into runtime_s per slide")
    parser.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> None:
    from wsiseg.report import run_report

    run_report(args.stats, args.out, benchmarks_dir=args.benchmarks_dir)


def _add_delegated(commands: argparse._SubParsersAction) -> None:
    # Listed here for `wsiseg --help` only: main() hands their arguments to their own parsers.
    _add_parser(commands, "bench-model", help="time the U-Net's predict() on random patches", add_help=False)
    _add_parser(commands, "benchmark", help="measure each stage against its raw library call", add_help=False)


_SUBCOMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (
    _add_inspect, _add_tissue, _add_patches, _add_infer, _add_stitch, _add_vectorise,
    _add_overlay, _add_report, _add_delegated,
)


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of ``wsiseg`` and all its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="wsiseg",
        description="Run one stage of the wsiseg pipeline on one slide. "
                    "`wsiseg <stage> --help` lists a stage's options.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wsiseg {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for add in _SUBCOMMANDS:
        add(commands)
    return parser


# Sub-commands with parsers of their own: everything after the name goes to them,
# --help included, which argparse's REMAINDER would not pass on.
_DELEGATED = {"bench-model": "wsiseg.bench_model", "benchmark": "wsiseg.benchmark"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; return the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in _DELEGATED:
        import importlib

        setup_logging("INFO")
        return int(importlib.import_module(_DELEGATED[arguments[0]]).main(arguments[1:]) or 0)

    parser = build_parser()
    args = parser.parse_args(arguments)
    setup_logging(args.log_level)

    started = time.perf_counter()
    logger.info("wsiseg %s %s started", __version__, args.command)
    try:
        args.run(args)
    except WsisegError as error:
        # Expected failures (bad config, unwritable output): one clear line, no traceback.
        logger.error("wsiseg %s failed: %s", args.command, error)
        return 1
    except OSError as error:
        # Unwritable results folder, full disk: the message names the path to fix.
        logger.error("wsiseg %s failed: %s", args.command, error)
        return 1
    logger.info("wsiseg %s finished in %.1f s", args.command, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
