"""Tests of weight loading: Keras 2 files by topological order, Keras 3 files, errors."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pytest
import tf_keras

import wsiseg.model
from keras2_reference import build_keras2_unet, randomize_weights
from wsiseg.errors import WeightsError
from wsiseg.model import build_model
from wsiseg.weights import (
    IMAGENET_ENCODER_H5,
    KERAS2_H5,
    KERAS3_KERAS,
    KERAS3_WEIGHTS_H5,
    N_ENCODER_WEIGHTED_LAYERS,
    file_sha256,
    load_imagenet_encoder,
    load_weights,
    weighted_layers,
)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """One Keras 3 U-Net for the module. Each test loads the weights it needs."""
    return build_model()


@pytest.fixture(scope="module")
def keras2_files(tmp_path_factory) -> SimpleNamespace:
    """Keras 2 weights-only and full-model HDF5 files of a random U-Net, with its predictions."""
    folder = tmp_path_factory.mktemp("keras2")
    reference = build_keras2_unet()
    randomize_weights(reference, seed=7)

    weights_path = folder / "unet_keras2.h5"
    full_path = folder / "unet_keras2_full.h5"
    reference.save_weights(str(weights_path))
    reference.save(str(full_path), save_format="h5")

    batch = np.random.default_rng(3).uniform(-1.0, 1.0, (2, 64, 64, 3)).astype(np.float32)
    expected = reference.predict(batch, verbose=0)
    return SimpleNamespace(
        weights_path=weights_path, full_path=full_path, batch=batch, expected=expected
    )


def _predict(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict_on_batch(batch))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _zero_weights(model: keras.Model) -> None:
    for variable in model.weights:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))


def _small_keras2_model() -> tf_keras.Model:
    inputs = tf_keras.layers.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = tf_keras.layers.BatchNormalization(scale=False)(x)
    x = tf_keras.layers.Activation("relu")(x)
    outputs = tf_keras.layers.Conv2D(2, 1)(x)
    return tf_keras.Model(inputs, outputs)


def _small_keras3_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(scale=False)(x)
    x = keras.layers.Activation("relu")(x)
    outputs = keras.layers.Conv2D(2, 1)(x)
    return keras.Model(inputs, outputs)


def test_keras2_reference_not_constant(keras2_files):
    """The reference output varies, so that matching it means something."""
    assert keras2_files.expected[..., 1].std() > 0.01


def test_keras2_weights_match_reference(model, keras2_files):
    """A Keras 2 weights-only file loads by order and predicts as the Keras 2 model does."""
    load_weights(model, keras2_files.weights_path)
    actual = _predict(model, keras2_files.batch)
    np.testing.assert_allclose(actual, keras2_files.expected, atol=1e-4)


def test_keras2_layer_swap_detected(model, keras2_files):
    """Swapping two same-shaped BatchNorm layers deep in the encoder changes the output."""
    load_weights(model, keras2_files.weights_path)
    first = model.get_layer("block8_5_branch0_conv1_bn")
    second = model.get_layer("block8_5_branch1_conv1_bn")
    first_weights, second_weights = first.get_weights(), second.get_weights()
    first.set_weights(second_weights)
    second.set_weights(first_weights)

    swapped = _predict(model, keras2_files.batch)
    assert np.abs(swapped - keras2_files.expected).max() > 1e-3


def test_keras2_full_model_file(model, keras2_files):
    """A Keras 2 full-model file loads from its model_weights group."""
    with h5py.File(keras2_files.full_path, "r") as h5_file:
        assert "layer_names" not in h5_file.attrs
        assert "layer_names" in h5_file["model_weights"].attrs

    _zero_weights(model)
    info = load_weights(model, keras2_files.full_path)
    actual = _predict(model, keras2_files.batch)
    assert info.format == KERAS2_H5
    np.testing.assert_allclose(actual, keras2_files.expected, atol=1e-4)


def test_load_weights_info(model, keras2_files):
    """load_weights returns the file's name, path, format and SHA-256."""
    info = load_weights(model, keras2_files.weights_path)
    expected_sha256 = hashlib.sha256(keras2_files.weights_path.read_bytes()).hexdigest()
    assert info.file_name == "unet_keras2.h5"
    assert info.path == str(keras2_files.weights_path)
    assert info.format == KERAS2_H5
    assert info.sha256 == expected_sha256
    assert info.to_record() == {"file": "unet_keras2.h5", "sha256": expected_sha256}


def test_model_module_exports_load_weights():
    """load_weights is also reachable next to build_model."""
    assert wsiseg.model.load_weights is load_weights


def test_keras3_weights_round_trip(model, keras2_files, tmp_path):
    """A Keras 3 .weights.h5 file restores the weights it was saved from."""
    load_weights(model, keras2_files.weights_path)
    path = tmp_path / "unet.weights.h5"
    model.save_weights(path)

    _zero_weights(model)
    info = load_weights(model, path)
    actual = _predict(model, keras2_files.batch)
    assert info.format == KERAS3_WEIGHTS_H5
    np.testing.assert_allclose(actual, keras2_files.expected, atol=1e-4)


def test_keras_archive_round_trip(model, keras2_files, tmp_path):
    """The weights of a whole-model .keras file load into a freshly built model."""
    load_weights(model, keras2_files.weights_path)
    path = tmp_path / "unet.keras"
    model.save(path)

    _zero_weights(model)
    info = load_weights(model, path)
    actual = _predict(model, keras2_files.batch)
    assert info.format == KERAS3_KERAS
    np.testing.assert_allclose(actual, keras2_files.expected, atol=1e-4)


def test_keras2_shape_mismatch_keeps_model(model, keras2_files, tmp_path):
    """A Keras 2 file whose last layer has another shape is rejected and leaves the model unchanged."""
    path = tmp_path / "three_classes.h5"
    shutil.copyfile(keras2_files.weights_path, path)
    with h5py.File(path, "r+") as h5_file:
        last_layer = h5_file[_text(h5_file.attrs["layer_names"][-1])]
        kernel_name = _text(last_layer.attrs["weight_names"][0])
        del last_layer[kernel_name]
        last_layer.create_dataset(kernel_name, data=np.zeros((1, 1, 64, 3), dtype=np.float32))

    load_weights(model, keras2_files.weights_path)
    with pytest.raises(WeightsError) as caught:
        load_weights(model, path)
    message = str(caught.value)
    assert str(path) in message
    assert "(1, 1, 64, 2)" in message
    assert "(1, 1, 64, 3)" in message
    np.testing.assert_allclose(_predict(model, keras2_files.batch), keras2_files.expected, atol=1e-4)


def test_keras3_shape_mismatch_keeps_model(model, keras2_files, tmp_path):
    """A Keras 3 file of a 3-class model is rejected and the model keeps its weights."""
    path = tmp_path / "three_classes.weights.h5"
    build_model(num_classes=3, name="three_classes").save_weights(path)

    load_weights(model, keras2_files.weights_path)
    with pytest.raises(WeightsError, match="three_classes.weights.h5"):
        load_weights(model, path)
    np.testing.assert_allclose(_predict(model, keras2_files.batch), keras2_files.expected, atol=1e-4)


def test_keras2_layer_count_mismatch(model, tmp_path):
    """A Keras 2 file of another network names the expected and found layer counts."""
    path = tmp_path / "small.h5"
    _small_keras2_model().save_weights(str(path))
    with pytest.raises(WeightsError, match="expected 469 layers with weights .* found 3"):
        load_weights(model, path)


def test_keras3_layer_count_mismatch(model, tmp_path):
    """A Keras 3 file of another network names the expected and found layer counts."""
    path = tmp_path / "small.weights.h5"
    _small_keras3_model().save_weights(path)
    with pytest.raises(WeightsError, match="expected 469 layers with weights .* found 3"):
        load_weights(model, path)


def test_keras2_chunked_layer_names(tmp_path):
    """Layer names split over numbered attributes (layer_names0, ...) are read in order."""
    source = _small_keras2_model()
    randomize_weights(source, seed=1)
    path = tmp_path / "chunked.h5"
    source.save_weights(str(path))
    with h5py.File(path, "r+") as h5_file:
        names = list(h5_file.attrs["layer_names"])
        del h5_file.attrs["layer_names"]
        h5_file.attrs["layer_names0"] = names[:2]
        h5_file.attrs["layer_names1"] = names[2:]

    target = _small_keras3_model()
    load_weights(target, path)
    batch = np.random.default_rng(0).uniform(-1.0, 1.0, (1, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(
        _predict(target, batch), source.predict(batch, verbose=0), atol=1e-5
    )


def test_missing_file(model, tmp_path):
    """A missing file is named in the error."""
    path = tmp_path / "absent.h5"
    with pytest.raises(WeightsError, match="not found: .*absent.h5"):
        load_weights(model, path)


def test_unknown_extension(model, tmp_path):
    """An unknown extension is rejected with the extensions that are read."""
    path = tmp_path / "unet.pt"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match=r"unet.pt: unknown file type.*\.weights\.h5"):
        load_weights(model, path)


def test_h5_with_keras3_layout(model, tmp_path):
    """A Keras 3 weights file named .h5 is rejected with the rename that fixes it."""
    path = tmp_path / "renamed.h5"
    _small_keras3_model().save_weights(tmp_path / "small.weights.h5")
    shutil.copyfile(tmp_path / "small.weights.h5", path)
    with pytest.raises(WeightsError, match="Rename it to end in .weights.h5"):
        load_weights(model, path)


def test_h5_without_layer_names(model, tmp_path):
    """An HDF5 file that is no Keras weights file names the missing attribute."""
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as h5_file:
        h5_file["values"] = np.arange(4)
    with pytest.raises(WeightsError, match="data.h5: expected .*'layer_names'"):
        load_weights(model, path)


def test_h5_not_hdf5(model, tmp_path):
    """A file named .h5 that is not HDF5 is rejected."""
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    with pytest.raises(WeightsError, match="text.h5: expected an HDF5 file"):
        load_weights(model, path)


def test_keras_not_zip(model, tmp_path):
    """A file named .keras that is not a zip archive is rejected."""
    path = tmp_path / "text.keras"
    path.write_text("not a zip")
    with pytest.raises(WeightsError, match="text.keras: expected a .keras zip archive"):
        load_weights(model, path)


def test_imagenet_encoder_weights(model, tmp_path):
    """A Keras InceptionResNetV2 no-top file fills the encoder in order and leaves the decoder."""
    encoder = tf_keras.applications.InceptionResNetV2(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    randomize_weights(encoder, seed=5)
    path = tmp_path / "inception_resnet_v2_notop.h5"
    encoder.save_weights(str(path))

    layers = weighted_layers(model)
    decoder_before = [weight.numpy() for layer in layers[448:] for weight in layer.weights]
    info = load_imagenet_encoder(model, path)

    assert info.format == IMAGENET_ENCODER_H5
    source_layers = [layer for layer in encoder.layers if layer.weights]
    for index, (target, source) in enumerate(zip(layers, source_layers)):
        for target_weight, source_weight in zip(target.weights, source.weights):
            np.testing.assert_array_equal(
                target_weight.numpy(), source_weight.numpy(), err_msg=f"layer {index}"
            )
    decoder_after = [weight.numpy() for layer in layers[448:] for weight in layer.weights]
    for before, after in zip(decoder_before, decoder_after):
        np.testing.assert_array_equal(after, before)


def test_imagenet_encoder_rejects_unet_file(model, keras2_files):
    """The encoder loader rejects a file that is not 448 layers with weights."""
    with pytest.raises(WeightsError, match=f"expected {N_ENCODER_WEIGHTED_LAYERS} .* found 469"):
        load_imagenet_encoder(model, keras2_files.weights_path)


def test_file_sha256(tmp_path):
    """file_sha256 returns the SHA-256 of the file's bytes, also across read blocks."""
    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 5000  # over 1 MiB, so more than one read block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_file_sha256_accepts_str(tmp_path):
    """file_sha256 takes a str path as well as a Path."""
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    assert file_sha256(str(path)) == hashlib.sha256(b"").hexdigest()


def test_weights_module_imports_without_keras():
    """Importing wsiseg.weights loads neither Keras nor TensorFlow."""
    code = (
        "import sys, wsiseg.weights; "
        "print(sorted(name for name in ('keras', 'tensorflow') if name in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"
