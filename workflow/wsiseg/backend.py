"""Device and precision set-up: the one module that calls TensorFlow directly.

Everything else in wsiseg uses ``keras`` and ``keras.ops`` only, so it runs on any Keras 3
backend. Here TensorFlow is imported only when it is the active Keras backend, and the
other backends get the same functions with their own device query.

Call ``configure`` once per process, before the first model is built: TensorFlow fixes
GPU memory growth when it first touches a GPU, and layers take the dtype policy that is
in force when they are created.
"""

from __future__ import annotations

import importlib
import logging

import keras

from wsiseg.errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_float16")


def configure(precision: str = "auto", *, memory_growth: bool = True) -> str:
    """Set the Keras dtype policy and GPU memory growth, and return the precision in use.

    ``auto`` picks ``mixed_float16`` when a GPU is visible and ``float32`` otherwise.
    On a 2-core AVX-512 Xeon with TensorFlow 2.21, ``wsiseg bench-model`` ran 1.2 to 1.6
    times slower with mixed_float16 than with float32, so float16 is no default on a CPU.
    An explicit ``mixed_float16`` on a CPU is honoured with a warning.
    Memory growth (TensorFlow only) makes each process take GPU memory as it needs it
    instead of all at once, so that several jobs can share one GPU host.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}"
        )

    if memory_growth:
        _enable_memory_growth()

    has_gpu = gpu_available()
    if precision == "auto":
        chosen = "mixed_float16" if has_gpu else "float32"
    else:
        chosen = precision
    if chosen == "mixed_float16" and not has_gpu:
        logger.warning(
            "precision mixed_float16 requested without a GPU: float16 on a CPU can run "
            "slower than float32. Use precision float32 or auto there"
        )

    keras.mixed_precision.set_global_policy(chosen)
    logger.info(
        "Keras backend %s, precision %s (requested %s), GPUs: %s",
        keras.backend.backend(),
        chosen,
        precision,
        ", ".join(list_gpus()) or "none",
    )
    return chosen


def gpu_available() -> bool:
    """Return True when the active Keras backend can see at least one GPU."""
    return bool(list_gpus())


def list_gpus() -> list[str]:
    """Return the names of the GPUs that the active Keras backend can see."""
    backend = keras.backend.backend()

    if backend == "tensorflow":
        tf = importlib.import_module("tensorflow")
        return [device.name for device in tf.config.list_physical_devices("GPU")]

    # NOTE: the JAX and PyTorch branches follow those libraries' documented device
    # queries but have not been run, because neither library is installed in CI.
    if backend == "jax":
        jax = importlib.import_module("jax")
        return [str(device) for device in jax.devices() if device.platform == "gpu"]

    if backend == "torch":
        torch = importlib.import_module("torch")
        return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]

    return []


def _enable_memory_growth() -> None:
    """Turn on TensorFlow's on-demand GPU memory allocation for every visible GPU."""
    if keras.backend.backend() != "tensorflow":
        # PyTorch allocates on demand already. JAX preallocates most of the GPU unless
        # XLA_PYTHON_CLIENT_PREALLOCATE=false is set before JAX starts.
        logger.debug(
            "memory growth skipped: it is a TensorFlow setting and the backend is %s",
            keras.backend.backend(),
        )
        return

    tf = importlib.import_module("tensorflow")
    for device in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except RuntimeError as error:
            # TensorFlow rejects the change once the GPU has been initialised.
            logger.warning(
                "could not enable memory growth on %s (GPU already initialised): %s",
                device.name,
                error,
            )
