"""Inception-ResNet-v2 U-Net: the segmentation network of the DigiPathAI project in Keras 3.

The encoder is Inception-ResNet-v2 (Szegedy et al., 2016, "Inception-v4,
Inception-ResNet and the Impact of Residual Connections on Learning") up to its 1536-channel
``conv_7b``. A U-Net decoder climbs back to full resolution through five upsampling stages,
four of them joined to encoder skips, and ends in a 1x1 convolution with a 2-class softmax
(channel 0 background, channel 1 tumour).

Every convolution and pooling uses 'same' padding, so an input whose sides are multiples of
32 px gives an output of the same height and width. With 2 classes the model has 469 layers
with weights (255 Conv2D, 214 BatchNormalization) and 65,893,154 parameters. Its first 448
layers with weights match ``keras.applications.InceptionResNetV2(include_top=False)`` shape
for shape and in order, which is what lets ImageNet weights seed the encoder.

The graph mirrors the Keras 2 original layer for layer: the same layers, with the same
inputs in the same order. DigiPathAI's released weight files are loaded by topological
order, so an extra or reordered layer would shift weights onto the wrong layers. Only the
layer names differ, and names play no part in that loading.

The model uses Keras 3 layers and no TensorFlow calls, so it builds on any Keras 3 backend.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from wsiseg.errors import ConfigError
# load_weights is public here too, next to build_model, because callers use the two together.
from wsiseg.weights import load_weights  # noqa: F401

logger = logging.getLogger(__name__)

# The encoder halves the resolution five times (stem conv, two stem poolings, mixed_6a,
# mixed_7a) and the decoder doubles it five times, so both sides must divide by 2**5.
SIZE_MULTIPLE_PX = 32

DEFAULT_NAME = "inception_resnet_v2_unet"

PREPROCESSING_MODES = ("digipathai", "imagenet")

# Residual scales per block type, and how many blocks of each the encoder stacks.
BLOCK35_SCALE = 0.17
BLOCK17_SCALE = 0.1
BLOCK8_SCALE = 0.2
N_BLOCK35 = 10
N_BLOCK17 = 20
N_BLOCK8 = 10

# Decoder stages from the deepest up: filters, and the encoder skip joined after upsampling
# (None for the last stage, which has no skip at full resolution).
_DECODER_STAGES = (
    (320, "block17"),
    (256, "block35"),
    (128, "stem_192"),
    (96, "stem_64"),
    (64, None),
)


@keras.saving.register_keras_serializable(package="wsiseg")
class ResidualScale(keras.layers.Layer):
    """Add a scaled residual branch to its shortcut: ``shortcut + scale * residual``.

    Inception-ResNet scales each block's residual down (0.1 to 0.2, except 1.0 in the last
    block) before the sum, which keeps training of a deep stack of blocks stable. A named layer with ``get_config`` replaces the original
    Lambda, so that a ``.keras`` file loads again with ``safe_mode=True``.
    """

    def __init__(self, scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs: list) -> Any:
        shortcut, residual = inputs
        return shortcut + residual * self.scale

    def compute_output_shape(self, input_shape: list) -> tuple:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["scale"] = self.scale
        return config


def check_input_size(height_px: int | None, width_px: int | None) -> None:
    """Raise ValueError unless both sides are positive multiples of 32 px.

    ``None`` means a side left open (a model built for any size) and passes.
    """
    problems = []
    for side, size_px in (("height", height_px), ("width", width_px)):
        if size_px is None:
            continue
        if size_px <= 0 or size_px % SIZE_MULTIPLE_PX != 0:
            lower_px = max(SIZE_MULTIPLE_PX, (size_px // SIZE_MULTIPLE_PX) * SIZE_MULTIPLE_PX)
            upper_px = max(SIZE_MULTIPLE_PX, -(-size_px // SIZE_MULTIPLE_PX) * SIZE_MULTIPLE_PX)
            nearest = f"{lower_px}" if lower_px == upper_px else f"{lower_px} or {upper_px}"
            problems.append(f"{side} {size_px} px (nearest valid: {nearest})")

    if problems:
        raise ValueError(
            f"invalid input size {height_px}x{width_px} px: the model needs sides that are "
            f"positive multiples of {SIZE_MULTIPLE_PX} px, but got " + ", ".join(problems)
        )


def preprocess(patches_uint8: np.ndarray, mode: str = "digipathai") -> np.ndarray:
    """Scale RGB uint8 pixels to the float32 range the weights were trained on.

    ``digipathai``: ``(x - 128) / 128``, the scaling DigiPathAI trained its weights with
    (range -1 to 0.992). ``imagenet``: ``x / 127.5 - 1``, as Keras's
    ``inception_resnet_v2.preprocess_input`` does for ImageNet weights (range -1 to 1).
    The last axis must be the 3 RGB channels.
    """
    if mode not in PREPROCESSING_MODES:
        raise ConfigError(
            f"unknown preprocessing {mode!r}: expected one of {', '.join(PREPROCESSING_MODES)}"
        )
    patches_uint8 = np.asarray(patches_uint8)
    if patches_uint8.dtype != np.uint8:
        # Scaling an array that is already float would silently preprocess it twice.
        raise ValueError(f"preprocess expects uint8 RGB pixels, got dtype {patches_uint8.dtype}")
    if patches_uint8.ndim < 3 or patches_uint8.shape[-1] != 3:
        raise ValueError(
            f"preprocess expects RGB pixels with 3 channels last, got shape {patches_uint8.shape}"
        )

    pixels = patches_uint8.astype(np.float32)
    if mode == "digipathai":
        return (pixels - np.float32(128.0)) / np.float32(128.0)
    return pixels / np.float32(127.5) - np.float32(1.0)


def _conv_bn(
    x: Any,
    filters: int,
    kernel_size: int | tuple[int, int],
    name: str,
    *,
    strides: int = 1,
    activation: str | None = "relu",
    use_bias: bool = False,
) -> Any:
    """Add an encoder convolution: Conv2D, then BatchNorm and ReLU unless it has a bias."""
    x = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=use_bias, name=name
    )(x)
    if not use_bias:
        # The BatchNorm shift replaces the bias. The scale is left out because the next
        # convolution can absorb it (ReLU commutes with a positive scale).
        x = keras.layers.BatchNormalization(axis=3, scale=False, name=f"{name}_bn")(x)
    if activation is not None:
        x = keras.layers.Activation(activation, name=f"{name}_ac")(x)
    return x


def _residual_block(
    x: Any, block_type: str, block_index: int, scale: float, *, activation: str | None = "relu"
) -> Any:
    """Add one Inception-ResNet block: parallel branches, a 1x1 projection, a scaled sum."""
    name = f"{block_type}_{block_index}"

    def conv(inputs: Any, filters: int, kernel_size: Any, branch: int, step: int) -> Any:
        return _conv_bn(inputs, filters, kernel_size, f"{name}_branch{branch}_conv{step}")

    if block_type == "block35":
        branch_0 = conv(x, 32, 1, 0, 1)
        branch_1 = conv(x, 32, 1, 1, 1)
        branch_1 = conv(branch_1, 32, 3, 1, 2)
        branch_2 = conv(x, 32, 1, 2, 1)
        branch_2 = conv(branch_2, 48, 3, 2, 2)
        branch_2 = conv(branch_2, 64, 3, 2, 3)
        branches = [branch_0, branch_1, branch_2]
    elif block_type == "block17":
        branch_0 = conv(x, 192, 1, 0, 1)
        branch_1 = conv(x, 128, 1, 1, 1)
        branch_1 = conv(branch_1, 160, (1, 7), 1, 2)
        branch_1 = conv(branch_1, 192, (7, 1), 1, 3)
        branches = [branch_0, branch_1]
    elif block_type == "block8":
        branch_0 = conv(x, 192, 1, 0, 1)
        branch_1 = conv(x, 192, 1, 1, 1)
        branch_1 = conv(branch_1, 224, (1, 3), 1, 2)
        branch_1 = conv(branch_1, 256, (3, 1), 1, 3)
        branches = [branch_0, branch_1]
    else:
        raise ValueError(
            f"unknown block type {block_type!r}: expected block35, block17 or block8"
        )

    mixed = keras.layers.Concatenate(axis=3, name=f"{name}_mixed")(branches)

    # The projection back to the block's input width has a bias and no BatchNorm.
    channels = x.shape[-1]
    residual = _conv_bn(mixed, channels, 1, f"{name}_conv", activation=None, use_bias=True)

    x = ResidualScale(scale, name=name)([x, residual])
    if activation is not None:
        x = keras.layers.Activation(activation, name=f"{name}_ac")(x)
    return x


def _encoder(inputs: Any) -> dict[str, Any]:
    """Build Inception-ResNet-v2 with 'same' padding and return its outputs by skip name."""
    skips = {}

    # Stem: H/2 x W/2 x 64 (skip), then H/4 x W/4 x 192 (skip), pooled to H/8 x W/8 x 192.
    x = _conv_bn(inputs, 32, 3, "stem_conv1", strides=2)
    x = _conv_bn(x, 32, 3, "stem_conv2")
    x = _conv_bn(x, 64, 3, "stem_conv3")
    skips["stem_64"] = x
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool1")(x)
    x = _conv_bn(x, 80, 1, "stem_conv4")
    x = _conv_bn(x, 192, 3, "stem_conv5")
    skips["stem_192"] = x
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool2")(x)

    # mixed_5b (Inception-A): H/8 x W/8 x 320.
    branch_0 = _conv_bn(x, 96, 1, "mixed_5b_branch0_conv1")
    branch_1 = _conv_bn(x, 48, 1, "mixed_5b_branch1_conv1")
    branch_1 = _conv_bn(branch_1, 64, 5, "mixed_5b_branch1_conv2")
    branch_2 = _conv_bn(x, 64, 1, "mixed_5b_branch2_conv1")
    branch_2 = _conv_bn(branch_2, 96, 3, "mixed_5b_branch2_conv2")
    branch_2 = _conv_bn(branch_2, 96, 3, "mixed_5b_branch2_conv3")
    branch_3 = keras.layers.AveragePooling2D(
        3, strides=1, padding="same", name="mixed_5b_branch3_pool"
    )(x)
    branch_3 = _conv_bn(branch_3, 64, 1, "mixed_5b_branch3_conv1")
    x = keras.layers.Concatenate(axis=3, name="mixed_5b")([branch_0, branch_1, branch_2, branch_3])

    # 10 x block35 (Inception-ResNet-A): H/8 x W/8 x 320 (skip).
    for block_index in range(1, N_BLOCK35 + 1):
        x = _residual_block(x, "block35", block_index, BLOCK35_SCALE)
    skips["block35"] = x

    # mixed_6a (Reduction-A): H/16 x W/16 x 1088.
    branch_0 = _conv_bn(x, 384, 3, "mixed_6a_branch0_conv1", strides=2)
    branch_1 = _conv_bn(x, 256, 1, "mixed_6a_branch1_conv1")
    branch_1 = _conv_bn(branch_1, 256, 3, "mixed_6a_branch1_conv2")
    branch_1 = _conv_bn(branch_1, 384, 3, "mixed_6a_branch1_conv3", strides=2)
    branch_2 = keras.layers.MaxPooling2D(
        3, strides=2, padding="same", name="mixed_6a_branch2_pool"
    )(x)
    x = keras.layers.Concatenate(axis=3, name="mixed_6a")([branch_0, branch_1, branch_2])

    # 20 x block17 (Inception-ResNet-B): H/16 x W/16 x 1088 (skip).
    for block_index in range(1, N_BLOCK17 + 1):
        x = _residual_block(x, "block17", block_index, BLOCK17_SCALE)
    skips["block17"] = x

    # mixed_7a (Reduction-B): H/32 x W/32 x 2080.
    branch_0 = _conv_bn(x, 256, 1, "mixed_7a_branch0_conv1")
    branch_0 = _conv_bn(branch_0, 384, 3, "mixed_7a_branch0_conv2", strides=2)
    branch_1 = _conv_bn(x, 256, 1, "mixed_7a_branch1_conv1")
    branch_1 = _conv_bn(branch_1, 288, 3, "mixed_7a_branch1_conv2", strides=2)
    branch_2 = _conv_bn(x, 256, 1, "mixed_7a_branch2_conv1")
    branch_2 = _conv_bn(branch_2, 288, 3, "mixed_7a_branch2_conv2")
    branch_2 = _conv_bn(branch_2, 320, 3, "mixed_7a_branch2_conv3", strides=2)
    branch_3 = keras.layers.MaxPooling2D(
        3, strides=2, padding="same", name="mixed_7a_branch3_pool"
    )(x)
    x = keras.layers.Concatenate(axis=3, name="mixed_7a")([branch_0, branch_1, branch_2, branch_3])

    # 10 x block8 (Inception-ResNet-C): H/32 x W/32 x 2080. The last block adds its
    # residual at full scale and passes the sum on without a ReLU.
    for block_index in range(1, N_BLOCK8):
        x = _residual_block(x, "block8", block_index, BLOCK8_SCALE)
    x = _residual_block(x, "block8", N_BLOCK8, 1.0, activation=None)

    # conv_7b: H/32 x W/32 x 1536, the bottom of the U.
    skips["conv_7b"] = _conv_bn(x, 1536, 1, "conv_7b")
    return skips


def _decoder_conv(x: Any, filters: int, name: str) -> Any:
    """Add a decoder convolution: 3x3 Conv2D with bias, BatchNorm with scale, ReLU."""
    x = keras.layers.Conv2D(
        filters, 3, padding="same", kernel_initializer="he_normal", name=name
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_ac")(x)


def build_model(
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    *,
    num_classes: int = 2,
    name: str = DEFAULT_NAME,
) -> keras.Model:
    """Build the Inception-ResNet-v2 U-Net with freshly initialised weights.

    ``input_shape`` is (height_px, width_px, 3); a side left as None accepts any multiple
    of 32 px at prediction time. The output has the input's height and width and
    ``num_classes`` softmax channels. Load trained weights with
    ``wsiseg.weights.load_weights``. The layers take the global Keras dtype policy in
    force when this is called (see ``wsiseg.backend.configure``), except the softmax
    layer, which always computes in float32.
    """
    if len(input_shape) != 3 or input_shape[2] != 3:
        raise ValueError(f"input_shape must be (height_px, width_px, 3), got {input_shape}")
    check_input_size(input_shape[0], input_shape[1])
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")

    inputs = keras.Input(shape=input_shape, name="image")
    skips = _encoder(inputs)

    # Decoder: each stage doubles the resolution, from H/16 x W/16 x 320 up to H x W x 64.
    x = skips["conv_7b"]
    for stage_index, (filters, skip_name) in enumerate(_DECODER_STAGES, start=1):
        stage = f"decoder{stage_index}"
        x = keras.layers.UpSampling2D(2, name=f"{stage}_up")(x)
        x = _decoder_conv(x, filters, f"{stage}_conv1")
        if skip_name is not None:
            x = keras.layers.Concatenate(axis=-1, name=f"{stage}_concat")([x, skips[skip_name]])
        x = _decoder_conv(x, filters, f"{stage}_conv2")

    # float32 softmax: under mixed precision, float16 would round small probabilities to 0.
    outputs = keras.layers.Conv2D(
        num_classes, 1, padding="same", activation="softmax", dtype="float32", name="classifier"
    )(x)

    model = keras.Model(inputs, outputs, name=name)
    logger.debug(
        "built %s for input %s: %d layers, %d parameters",
        name,
        input_shape,
        len(model.layers),
        model.count_params(),
    )
    return model

