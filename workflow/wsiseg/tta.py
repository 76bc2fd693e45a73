"""Test-time augmentation (TTA) with flips and 90° rotations that have exact inverses.

Each transform acts on the two spatial axes of a batch shaped (N, H, W, C), so it applies
to an input batch of patches and to the model's output maps alike. A TTA prediction runs
the model once per view (the identity plus each configured transform), maps each output
back with that transform's inverse, and returns the mean of the mapped outputs. Every view
starts from the original batch, so the transforms never accumulate.

The eight transforms are the symmetries of a square (the dihedral group of order 8). They
map square blocks aligned to the patch origin onto such blocks, so they commute with the
block-mean downsampling of a square map whose side is a multiple of the block size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from wsiseg.errors import ConfigError

logger = logging.getLogger(__name__)

# Spatial axes of a batch shaped (N, H, W, C).
_ROW_AXIS = 1
_COL_AXIS = 2

ArrayFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Transform:
    """A named spatial transform of (N, H, W, C) batches and its inverse."""

    name: str
    forward: ArrayFunction
    inverse: ArrayFunction


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _flip_rows(x: np.ndarray) -> np.ndarray:
    return np.flip(x, axis=_ROW_AXIS)


def _flip_cols(x: np.ndarray) -> np.ndarray:
    return np.flip(x, axis=_COL_AXIS)


def _rotate(quarter_turns: int) -> ArrayFunction:
    def rotate(x: np.ndarray) -> np.ndarray:
        return np.rot90(x, k=quarter_turns, axes=(_ROW_AXIS, _COL_AXIS))

    return rotate


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, _ROW_AXIS, _COL_AXIS)


def _anti_transpose(x: np.ndarray) -> np.ndarray:
    # Reflection about the anti-diagonal: transpose, then rotate by 180°.
    return np.rot90(np.swapaxes(x, _ROW_AXIS, _COL_AXIS), k=2, axes=(_ROW_AXIS, _COL_AXIS))


# flip_h mirrors left to right and flip_v top to bottom. Rotations turn counter-clockwise
# as numpy.rot90 does; the inverse of k quarter turns is -k quarter turns. Every flip and
# transpose is its own inverse.
TRANSFORMS: dict[str, Transform] = {
    "identity": Transform("identity", _identity, _identity),
    "flip_h": Transform("flip_h", _flip_cols, _flip_cols),
    "flip_v": Transform("flip_v", _flip_rows, _flip_rows),
    "rot90": Transform("rot90", _rotate(1), _rotate(-1)),
    "rot180": Transform("rot180", _rotate(2), _rotate(-2)),
    "rot270": Transform("rot270", _rotate(3), _rotate(-3)),
    "transpose": Transform("transpose", _transpose, _transpose),
    "anti_transpose": Transform("anti_transpose", _anti_transpose, _anti_transpose),
}


def parse_tta(names: Sequence[str] | None) -> list[Transform]:
    """Return the views of a TTA run: the identity first, then each named transform once.

    An empty or missing list means no augmentation (the identity alone). Unknown names
    raise ConfigError listing the valid ones.
    """
    views = [TRANSFORMS["identity"]]
    for name in names or []:
        if name not in TRANSFORMS:
            valid = ", ".join(TRANSFORMS)
            raise ConfigError(f"invalid TTA transform {name!r}; expected one of: {valid}")
        if any(view.name == name for view in views):
            logger.warning("TTA transform %r is listed twice; it is used once", name)
            continue
        views.append(TRANSFORMS[name])
    return views


def predict_tta(
    predict: ArrayFunction,
    batch: np.ndarray,
    views: Sequence[Transform],
) -> np.ndarray:
    """Return the mean over ``views`` of ``inverse(predict(forward(batch)))``.

    ``predict`` maps an (N, H, W, C) batch to (N, H', W', K) maps whose spatial grid is
    aligned with its input's (the same size, or downsampled by a factor dividing H and W).
    Each view transforms the original batch, so no view receives another view's transform.
    The mean is accumulated in float32.
    """
    if not views:
        raise ConfigError("TTA needs at least one view; use parse_tta to build the list")

    total: np.ndarray | None = None
    for view in views:
        # A contiguous copy: some backends reject the negative strides of a numpy view.
        transformed = np.ascontiguousarray(view.forward(batch))
        mapped_back = view.inverse(np.asarray(predict(transformed), dtype=np.float32))
        total = mapped_back.copy() if total is None else total + mapped_back

    return total / np.float32(len(views))
