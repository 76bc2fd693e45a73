"""Shard planning: split a slide's patch grid into bands of whole rows, one per GPU job.

A shard is a band of consecutive grid rows, so the inference job that predicts it decodes
each image chunk it touches once. Each shard is a separate process that pays the start-up
cost (importing the framework, building the model, loading weights) once, so shards must be
large enough for that cost to vanish next to the prediction time.

Rule of thumb for ``patches_per_shard``. With start-up time ``s`` and throughput ``r``
patches per second, a shard of ``n`` patches spends ``s + n / r`` seconds, and start-up
is at most a fraction ``f`` of that when ``n >= r * s * (1 - f) / f``:

- GPU, r = 2,000 patches/s (256 x 256 px, float16, H100/H200 class), s = 7 s, f = 5 %:
  n >= 2000 * 7 * 19 = 266,000 patches (``min_patches_per_shard(7, 2000)``).
- CPU, r = 1.5 patches/s: 2,048 patches take about 23 minutes, and 7 s of start-up is
  0.5 % of that.

Here s = 7 s is an estimate. On a 2-core CPU machine, importing TensorFlow took 2-7 s,
building the U-Net 2.5 s and tracing its predict function 4 s. On a GPU, CUDA
initialisation and weight loading add to it, and a larger s only raises the bound.
``workflow/scripts/device_check.py`` prints the start-up it measures.

The 5 % bound and spreading one slide over every GPU pull in opposite directions. A
100,000 x 100,000 px slide with 30 % tissue at stride 128 has about
0.3 * (100000 / 128)^2 = 183,000 patches, which is 92 s of GPU time. As one shard, it
finishes in 99 s with 7 % start-up. As two shards on two GPUs, it finishes in 53 s with
13 % start-up. In a cohort, Snakemake runs several slides at once and keeps every GPU
busy whatever the shard size, so there the bound on start-up matters more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from wsiseg.errors import ConfigError

logger = logging.getLogger(__name__)


class Shard(TypedDict):
    """One entry of a plan's ``shards`` list: grid rows [row_start, row_stop).

    ``patch_start`` and ``patch_stop`` give the shard's index range in the store's
    ``coords`` and ``grid`` arrays, which are sorted by (row, col).
    """

    index: int
    row_start: int
    row_stop: int
    n_patches: int
    patch_start: int
    patch_stop: int


def min_patches_per_shard(
    startup_s: float, patches_per_s: float, max_startup_fraction: float = 0.05
) -> int:
    """Return the smallest shard, in patches, whose start-up is at most the given fraction.

    Solves ``startup_s <= max_startup_fraction * (startup_s + n / patches_per_s)`` for n.
    """
    if startup_s < 0:
        raise ConfigError(f"startup_s must be >= 0, got {startup_s}")
    if patches_per_s <= 0:
        raise ConfigError(f"patches_per_s must be > 0, got {patches_per_s}")
    if not 0 < max_startup_fraction < 1:
        raise ConfigError(
            f"max_startup_fraction must be between 0 and 1, got {max_startup_fraction}"
        )

    ratio = (1.0 - max_startup_fraction) / max_startup_fraction
    return math.ceil(patches_per_s * startup_s * ratio)


def plan_shards(
    n_rows_patches: Sequence[int], patches_per_shard: int, max_shards: int
) -> list[Shard]:
    """Split grid rows into bands of whole rows holding about ``patches_per_shard`` each.

    ``n_rows_patches[r]`` is the number of patches in grid row r. The plan has
    ``min(max_shards, ceil(n_patches / patches_per_shard))`` shards, fewer when whole rows
    cannot be cut that finely (no shard is left without patches), and one shard covering
    every row when there are no patches. The bands cover rows 0 to ``len(n_rows_patches)``
    without gaps; each cut sits at the row boundary closest to an equal share of patches.
    """
    if patches_per_shard < 1:
        raise ConfigError(f"patches_per_shard must be >= 1, got {patches_per_shard}")
    if max_shards < 1:
        raise ConfigError(f"max_shards must be >= 1, got {max_shards}")
    counts = np.asarray(n_rows_patches, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ConfigError("n_rows_patches must be a list of non-negative patch counts per row")

    n_rows = int(counts.size)
    n_patches = int(counts.sum())
    if n_patches == 0:
        return [
            Shard(index=0, row_start=0, row_stop=n_rows, n_patches=0, patch_start=0, patch_stop=0)
        ]

    # cumulative[b] = patches in rows [0, b); a cut at row boundary b splits there.
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    n_wanted = min(max_shards, math.ceil(n_patches / patches_per_shard))

    # Place each cut at the boundary whose patch count is closest to k / n_wanted of the
    # total, then drop cuts that would leave a shard empty.
    cuts = [0]
    for k in range(1, n_wanted):
        target = n_patches * k / n_wanted
        boundary = int(np.argmin(np.abs(cumulative - target)))
        if cumulative[boundary] > cumulative[cuts[-1]] and cumulative[boundary] < n_patches:
            cuts.append(boundary)
    cuts.append(n_rows)

    shards = []
    for index, (row_start, row_stop) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        patch_start = int(cumulative[row_start])
        patch_stop = int(cumulative[row_stop])
        shards.append(
            Shard(
                index=index,
                row_start=row_start,
                row_stop=row_stop,
                n_patches=patch_stop - patch_start,
                patch_start=patch_start,
                patch_stop=patch_stop,
            )
        )

    if len(shards) < n_wanted:
        logger.info(
            "%d patches in %d rows fit %d shards of whole rows, not the %d requested",
            n_patches,
            n_rows,
            len(shards),
            n_wanted,
        )
    return shards
