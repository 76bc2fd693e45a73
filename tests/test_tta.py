"""Property tests of the test-time augmentation transforms and of TTA averaging."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.errors import ConfigError
from wsiseg.tta import TRANSFORMS, parse_tta, predict_tta

NAMES = sorted(TRANSFORMS)

# Random batches (N, H, W, C), square and not, with odd and even sides.
SHAPES = [(1, 1, 1, 1), (2, 5, 5, 3), (3, 4, 6, 2), (1, 7, 3, 1), (2, 8, 8, 4)]

# Each transform written out by hand with numpy indexing, independent of the module's
# table: (forward, inverse) on (N, H, W, C) arrays.
HAND_WRITTEN = {
    "identity": (lambda x: x, lambda y: y),
    "flip_h": (lambda x: x[:, :, ::-1], lambda y: y[:, :, ::-1]),
    "flip_v": (lambda x: x[:, ::-1], lambda y: y[:, ::-1]),
    "rot90": (lambda x: x.transpose(0, 2, 1, 3)[:, ::-1], lambda y: y[:, ::-1].transpose(0, 2, 1, 3)),
    "rot180": (lambda x: x[:, ::-1, ::-1], lambda y: y[:, ::-1, ::-1]),
    "rot270": (lambda x: x[:, ::-1].transpose(0, 2, 1, 3), lambda y: y.transpose(0, 2, 1, 3)[:, ::-1]),
    "transpose": (lambda x: x.transpose(0, 2, 1, 3), lambda y: y.transpose(0, 2, 1, 3)),
    "anti_transpose": (
        lambda x: x[:, ::-1, ::-1].transpose(0, 2, 1, 3),
        lambda y: y[:, ::-1, ::-1].transpose(0, 2, 1, 3),
    ),
}


def random_batches(seed: int = 0):
    """Yield random float batches of every shape in SHAPES, several per shape."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        for _ in range(5):
            yield rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_inverse_after_forward_is_identity(name):
    """inverse(forward(x)) == x for random arrays of several shapes."""
    transform = TRANSFORMS[name]
    for batch in random_batches():
        assert np.array_equal(transform.inverse(transform.forward(batch)), batch)


@pytest.mark.parametrize("name", NAMES)
def test_forward_after_inverse_is_identity(name):
    """forward(inverse(y)) == y, so the inverse is two-sided."""
    transform = TRANSFORMS[name]
    for batch in random_batches(seed=1):
        assert np.array_equal(transform.forward(transform.inverse(batch)), batch)


@pytest.mark.parametrize("name", NAMES)
def test_transform_matches_hand_written(name):
    """Each named transform moves pixels as its hand-written numpy indexing does."""
    forward, inverse = HAND_WRITTEN[name]
    for batch in random_batches(seed=2):
        assert np.array_equal(TRANSFORMS[name].forward(batch), forward(batch))
        assert np.array_equal(TRANSFORMS[name].inverse(batch), inverse(batch))


def test_transforms_are_distinct():
    """The eight transforms give eight different images of a random square batch."""
    batch = np.random.default_rng(3).normal(size=(1, 6, 6, 1))
    images = {TRANSFORMS[name].forward(batch).tobytes() for name in NAMES}
    assert len(images) == 8


def test_parse_tta_identity_first():
    """The identity comes first, each transform once, in the configured order."""
    views = parse_tta(["rot90", "flip_h", "rot90", "identity"])
    assert [view.name for view in views] == ["identity", "rot90", "flip_h"]


def test_parse_tta_empty_is_identity():
    """No augmentation configured means the identity alone."""
    assert [view.name for view in parse_tta([])] == ["identity"]


def test_parse_tta_rejects_unknown():
    """An unknown transform name raises ConfigError listing the valid names."""
    with pytest.raises(ConfigError, match="flip_h"):
        parse_tta(["mirror"])


def small_model(seed: int):
    """A small fully convolutional Keras model that is not symmetric under any transform."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(4, (3, 5), padding="same", activation="relu")(x)
    outputs = keras.layers.Conv2D(2, 3, padding="same", activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_tta_is_mean_of_inverse_mapped_predictions():
    """TTA output equals the mean of each view's prediction mapped back by hand."""
    model = small_model(seed=5)
    batch = np.random.default_rng(5).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    views = parse_tta(NAMES)

    expected = []
    for name in [view.name for view in views]:
        forward, inverse = HAND_WRITTEN[name]
        expected.append(inverse(model.predict_on_batch(np.ascontiguousarray(forward(batch)))))
    expected_mean = np.mean(expected, axis=0)

    result = predict_tta(model.predict_on_batch, batch, views)
    np.testing.assert_allclose(result, expected_mean, rtol=0, atol=1e-6)


def test_tta_views_do_not_accumulate():
    """With two flips, the second view receives the original batch flipped once, not twice."""
    seen = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return batch

    batch = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    predict_tta(record, batch, parse_tta(["flip_h", "flip_v"]))
    assert np.array_equal(seen[1], batch[:, :, ::-1])
    assert np.array_equal(seen[2], batch[:, ::-1])


def test_tta_of_pixelwise_model_is_unchanged():
    """A model that acts on each pixel alone gives the same map under every view."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input(shape=(None, None, 3))
    outputs = keras.layers.Conv2D(2, 1, activation="softmax")(inputs)
    model = keras.Model(inputs, outputs)
    batch = np.random.default_rng(7).uniform(size=(3, 6, 6, 3)).astype(np.float32)

    plain = model.predict_on_batch(batch)
    augmented = predict_tta(model.predict_on_batch, batch, parse_tta(NAMES))
    np.testing.assert_allclose(augmented, plain, rtol=0, atol=1e-6)


def test_tta_commutes_with_block_mean_on_unet():
    """On the U-Net wrapped with a block mean, TTA equals the block mean of TTA'd full maps."""
    import keras

    from wsiseg.ensemble import wrap_tumour_map
    from wsiseg.model import build_model, preprocess

    keras.utils.set_random_seed(0)
    unet = build_model()
    wrapped = wrap_tumour_map(unet, preprocessing="digipathai", downsample=4)
    batch = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    views = parse_tta(NAMES)

    full_maps = []
    for view in views:
        forward, inverse = HAND_WRITTEN[view.name]
        scaled = preprocess(np.ascontiguousarray(forward(batch)), "digipathai")
        tumour = keras.ops.convert_to_numpy(unet(scaled, training=False))[..., 1:2]
        full_maps.append(inverse(tumour))
    full_mean = np.mean(full_maps, axis=0)
    expected = full_mean.reshape(2, 8, 4, 8, 4, 1).mean(axis=(2, 4))

    result = predict_tta(wrapped.predict_on_batch, batch, views)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
