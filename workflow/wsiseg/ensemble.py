"""Tumour probability maps from one or several weight files, with test-time augmentation.

Each weight file becomes one member: a U-Net wrapped to take uint8 RGB patches. The
wrapper scales the pixels on the device, which moves 4 times less data than float32
input, and returns the softmax's tumour channel (channel 1) block-mean downsampled by the
output downsample factor. With several members, the map is their mean, and the per-pixel
variance across members (population variance, at the output resolution) is the
uncertainty map.

This module imports Keras at import time. Import it only after ``wsiseg.devices`` has set
CUDA_VISIBLE_DEVICES and ``wsiseg.backend.configure`` has set the dtype policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from wsiseg.errors import ConfigError
from wsiseg.model import build_model, preprocess
from wsiseg.tta import Transform, predict_tta
from wsiseg.weights import WeightsInfo, load_imagenet_encoder, load_weights

logger = logging.getLogger(__name__)

TUMOUR_CHANNEL = 1

UNTRAINED = "untrained"

# Inputs 0..255 checked against preprocess() when the scaling moves into the model.
_N_UINT8_LEVELS = 256
_AFFINE_TOLERANCE = 1e-6


@dataclass
class EnsemblePredictor:
    """Members that each map uint8 patches to downsampled tumour probabilities."""

    members: list[keras.Model]
    weights: list[WeightsInfo]  # empty for the untrained network
    imagenet_encoder: WeightsInfo | None
    views: list[Transform]

    @property
    def weights_record(self) -> list[dict[str, str]] | str:
        """Return the ``weights`` attribute of the outputs: file records, or ``untrained``."""
        if not self.weights:
            return UNTRAINED
        return [info.to_record() for info in self.weights]

    def warm_up(self, batch_shape: tuple[int, int, int, int]) -> None:
        """Trace each member's predict function on a white batch of the given shape.

        Tracing takes seconds, so doing it before the timed loop keeps it out of the
        throughput figures. The transforms are symmetries of a square patch, so every
        TTA view has this same shape and no view traces again.
        """
        white = np.full(batch_shape, 255, dtype=np.uint8)
        for member in self.members:
            member.predict_on_batch(white)

    def predict(self, batch_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return the mean map (N, h, w) and, for several members, their variance.

        Each member's map is the TTA mean over ``views``. The variance is None for a
        single member.
        """
        maps = []
        for member in self.members:
            member_map = predict_tta(member.predict_on_batch, batch_uint8, self.views)
            maps.append(member_map[..., 0])

        if len(maps) == 1:
            return maps[0], None
        stacked = np.stack(maps)
        return stacked.mean(axis=0), stacked.var(axis=0)


def preprocessing_affine(mode: str) -> tuple[float, float]:
    """Return (scale, offset) such that ``preprocess(x, mode) == x * scale + offset``.

    The values are read from ``wsiseg.model.preprocess`` itself, so the scaling inside the
    model cannot drift from it. Raises ConfigError when the preprocessing is not affine
    over the 256 uint8 levels.
    """
    levels = np.arange(_N_UINT8_LEVELS, dtype=np.uint8)
    pixels = np.repeat(levels.reshape(1, _N_UINT8_LEVELS, 1), 3, axis=2)
    values = preprocess(pixels, mode)[0, :, 0].astype(np.float64)

    offset = float(values[0])
    scale = float((values[-1] - values[0]) / (_N_UINT8_LEVELS - 1))
    expected = offset + scale * levels.astype(np.float64)
    if np.max(np.abs(values - expected)) > _AFFINE_TOLERANCE:
        raise ConfigError(
            f"preprocessing {mode!r} is not an affine map of the pixel values, so it cannot "
            "run inside the model"
        )
    return scale, offset


def wrap_tumour_map(model: keras.Model, *, preprocessing: str, downsample: int) -> keras.Model:
    """Wrap the U-Net: uint8 input, scaling, tumour channel, block mean by ``downsample``.

    The scaling and the pooling run in float32 whatever the dtype policy. Average pooling
    with pool size and stride ``downsample`` is the block mean when the patch side is a
    multiple of ``downsample``.
    """
    scale, offset = preprocessing_affine(preprocessing)

    inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="patch_uint8")
    scaled = keras.layers.Rescaling(scale, offset, dtype="float32", name="preprocess")(inputs)
    probabilities = model(scaled)
    tumour = probabilities[..., TUMOUR_CHANNEL : TUMOUR_CHANNEL + 1]
    if downsample > 1:
        tumour = keras.layers.AveragePooling2D(
            pool_size=downsample, strides=downsample, dtype="float32", name="block_mean"
        )(tumour)
    return keras.Model(inputs, tumour, name=f"{model.name}_tumour_map")


def build_predictor(
    weights: Sequence[str | os.PathLike],
    *,
    imagenet_encoder_weights: str | os.PathLike | None,
    preprocessing: str,
    output_downsample: int,
    views: list[Transform],
    xla: bool,
    seed: int,
    slide_id: str | None = None,
) -> EnsemblePredictor:
    """Build one wrapped U-Net per weight file, or one untrained U-Net when none is given.

    The untrained network is initialised from ``seed`` (and the ImageNet encoder weights,
    when given) and logs a WARNING, because its masks are meaningless.
    """
    weight_paths = list(weights) or [None]
    members = []
    loaded: list[WeightsInfo] = []
    encoder_info = None

    for path in weight_paths:
        # Seeding before each build makes the untrained network, and any layer that a
        # weights file leaves as initialised, the same on every run.
        keras.utils.set_random_seed(seed)
        model = build_model()

        if path is not None:
            loaded.append(load_weights(model, path))
        else:
            if imagenet_encoder_weights is not None:
                encoder_info = load_imagenet_encoder(model, imagenet_encoder_weights)
            logger.warning(
                "slide %s: no weights configured; predicting with the untrained network "
                "(seed %d%s), so the tumour masks are meaningless",
                slide_id,
                seed,
                ", ImageNet encoder" if encoder_info is not None else "",
            )

        wrapped = wrap_tumour_map(model, preprocessing=preprocessing, downsample=output_downsample)
        # jit_compile is set explicitly, because Keras 3's "auto" turns XLA on for
        # TensorFlow whenever a GPU is visible (Trainer._resolve_auto_jit_compile).
        wrapped.compile(jit_compile=bool(xla))
        members.append(wrapped)

    if imagenet_encoder_weights is not None and weights:
        logger.info(
            "slide %s: the ImageNet encoder weights are not used, because trained weights "
            "replace every layer",
            slide_id,
        )
    return EnsemblePredictor(
        members=members, weights=loaded, imagenet_encoder=encoder_info, views=views
    )
