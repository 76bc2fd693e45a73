"""Tests of the inference stage on small real patches stores with the real U-Net."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from wsiseg.infer import iter_patch_batches, run_infer
from wsiseg.shards import plan_shards

SLIDE_ID = "tiny-slide"
PATCH_PX = 64
STRIDE_PX = 32
DOWNSAMPLE = 4
CHUNK_PX = 64
BATCH_SIZE = 8
SEED = 3

# A 6 x 8 patch grid over a 224 x 288 px image. The tissue mask leaves gaps, so rows and
# columns hold different numbers of patches, and 29 patches do not fill whole batches of 8.
TISSUE = np.array(
    [
        [0, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 1],
        [0, 0, 1, 1, 1, 1, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1, 0],
    ],
    dtype=bool,
)
IMAGE_H = (TISSUE.shape[0] - 1) * STRIDE_PX + PATCH_PX
IMAGE_W = (TISSUE.shape[1] - 1) * STRIDE_PX + PATCH_PX


def write_patches_store(path: Path, tissue: np.ndarray, *, status: str = "ok", seed: int = 0) -> None:
    """Write a patches store with the stage's layout: image, coords, grid and attributes."""
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(tissue)
    image_h = (tissue.shape[0] - 1) * STRIDE_PX + PATCH_PX
    image_w = (tissue.shape[1] - 1) * STRIDE_PX + PATCH_PX

    # Smooth random colour fields, so patches differ from each other and from white.
    coarse = rng.integers(60, 230, size=(image_h // 16 + 1, image_w // 16 + 1, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:image_h, :image_w]
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 20, size=image.shape), 0, 255)

    group = zarr.open_group(str(path), mode="w")
    stored = group.create_array(
        "image",
        shape=(image_h, image_w, 3),
        chunks=(CHUNK_PX, CHUNK_PX, 3),
        dtype="uint8",
        fill_value=255,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    )
    # Only pixels under a patch are written; the rest reads as the white fill value.
    for row, col in zip(rows, cols, strict=True):
        window = np.s_[row * STRIDE_PX : row * STRIDE_PX + PATCH_PX, col * STRIDE_PX : col * STRIDE_PX + PATCH_PX]
        stored[window] = image[window].astype(np.uint8)

    grid = np.stack([rows, cols], axis=1).astype(np.int64)
    group.create_array("grid", data=grid)
    group.create_array("coords", data=grid[:, ::-1] * STRIDE_PX)
    group.attrs.update(
        {
            "slide_id": SLIDE_ID,
            "patch_size_px": PATCH_PX,
            "stride_px": STRIDE_PX,
            "level": 0,
            "analysis_downsample": 1.0,
            "mpp_x": 0.5,
            "mpp_y": 0.5,
            "n_patches": int(rows.size),
            "n_rows": int(tissue.shape[0]),
            "n_cols": int(tissue.shape[1]),
            "status": status,
            "message": "",
        }
    )


def write_plan(path: Path, tissue: np.ndarray, *, patches_per_shard: int, status: str = "ok") -> dict:
    """Write a shard plan over the tissue grid and return it."""
    shards = plan_shards(tissue.sum(axis=1).tolist(), patches_per_shard, 64)
    plan = {
        "slide_id": SLIDE_ID,
        "status": status,
        "n_patches": int(tissue.sum()),
        "n_shards": len(shards),
        "shards": shards,
    }
    path.write_text(json.dumps(plan))
    return plan


def read_band(path: Path) -> dict:
    """Return a band store's arrays and attributes."""
    group = zarr.open_group(str(path), mode="r")
    band = {name: group[name][:] for name in group.array_keys()}
    band["attrs"] = dict(group.attrs)
    return band


def expected_band(models: list, store: Path, shard: dict) -> dict:
    """Predict the shard's patches with eager Keras calls and sum their maps by hand."""
    from wsiseg.model import preprocess

    group = zarr.open_group(str(store), mode="r")
    image = group["image"][:]
    grid = group["grid"][:]
    inside = (grid[:, 0] >= shard["row_start"]) & (grid[:, 0] < shard["row_stop"])
    rows, cols = grid[inside, 0], grid[inside, 1]

    out_row0 = shard["row_start"] * STRIDE_PX // DOWNSAMPLE
    bottom_px = min((shard["row_stop"] - 1) * STRIDE_PX + PATCH_PX, image.shape[0])
    band_h = math.ceil(bottom_px / DOWNSAMPLE) - out_row0
    width_out = math.ceil(image.shape[1] / DOWNSAMPLE)
    side = PATCH_PX // DOWNSAMPLE

    patches = np.stack(
        [
            image[r * STRIDE_PX : r * STRIDE_PX + PATCH_PX, c * STRIDE_PX : c * STRIDE_PX + PATCH_PX]
            for r, c in zip(rows, cols, strict=True)
        ]
    )
    import keras

    maps = []
    for model in models:
        # An eager call: no traced function, so no code path shared with the stage.
        probabilities = model(preprocess(patches, "digipathai"), training=False)
        tumour = keras.ops.convert_to_numpy(probabilities)[..., 1]
        maps.append(tumour.reshape(-1, side, DOWNSAMPLE, side, DOWNSAMPLE).mean(axis=(2, 4)))
    maps = np.stack(maps)
    mean, variance = maps.mean(axis=0), maps.var(axis=0)

    band = {name: np.zeros((band_h, width_out), np.float64) for name in ("sum", "weight", "variance_sum")}
    for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
        y = r * STRIDE_PX // DOWNSAMPLE - out_row0
        x = c * STRIDE_PX // DOWNSAMPLE
        band["sum"][y : y + side, x : x + side] += mean[k]
        band["weight"][y : y + side, x : x + side] += 1.0
        band["variance_sum"][y : y + side, x : x + side] += variance[k]
    band["out_row0"] = out_row0
    return band


def untrained_model(seed: int):
    """Build the U-Net as the stage does for a run without weights."""
    import keras

    from wsiseg.model import build_model

    keras.utils.set_random_seed(seed)
    return build_model()


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> dict:
    """A patches store, a two-shard plan, and shard 1 predicted once as the reference."""
    folder = tmp_path_factory.mktemp("infer")
    store = folder / "patches.zarr"
    plan_path = folder / "shards.json"
    write_patches_store(store, TISSUE)
    plan = write_plan(plan_path, TISSUE, patches_per_shard=15)

    reference = folder / "reference.zarr"
    summary = run_infer(
        store, plan_path, 1, reference, output_downsample=DOWNSAMPLE, batch_size=BATCH_SIZE,
        seed=SEED, lock_dir=folder / "locks",
    )
    return {"folder": folder, "store": store, "plan_path": plan_path, "plan": plan,
            "reference": reference, "summary": summary}


def test_plan_has_partial_batches(slide):
    """Fixture check: both shards end in a partial batch, so the tests below cover one."""
    counts = [shard["n_patches"] for shard in slide["plan"]["shards"]]
    assert len(counts) == 2
    assert all(count % BATCH_SIZE for count in counts)


def test_batches_cover_every_patch(slide):
    """Batches hold each patch once, in order, with the window the grid gives it."""
    group = zarr.open_group(str(slide["store"]), mode="r")
    grid = group["grid"][:]
    image = group["image"][:]
    batches = list(iter_patch_batches(group["image"], grid[:, 0], grid[:, 1], patch_px=PATCH_PX,
                                      stride_px=STRIDE_PX, batch_size=BATCH_SIZE))

    indices = np.concatenate([indices for _, indices, _ in batches])
    assert indices.tolist() == list(range(len(grid)))
    assert batches[-1][2] == len(grid) % BATCH_SIZE
    for batch, batch_indices, n_valid in batches:
        for k in range(n_valid):
            r, c = grid[batch_indices[k]]
            window = image[r * STRIDE_PX : r * STRIDE_PX + PATCH_PX, c * STRIDE_PX : c * STRIDE_PX + PATCH_PX]
            assert np.array_equal(batch[k], window)


def test_infer_matches_direct_prediction(slide):
    """The band equals per-patch predictions summed by hand, the last partial batch included."""
    shard = slide["plan"]["shards"][1]
    expected = expected_band([untrained_model(SEED)], slide["store"], shard)
    band = read_band(slide["reference"])

    assert band["attrs"]["out_row0"] == expected["out_row0"]
    assert np.array_equal(band["weight"], expected["weight"])
    np.testing.assert_allclose(band["sum"], expected["sum"], rtol=0, atol=2e-5)


def test_infer_attributes(slide):
    """The band records the slide, shard, geometry and an untrained network."""
    attrs = read_band(slide["reference"])["attrs"]
    assert attrs["slide_id"] == SLIDE_ID
    assert attrs["shard_index"] == 1
    assert attrs["n_patches"] == slide["plan"]["shards"][1]["n_patches"]
    assert attrs["output_downsample"] == DOWNSAMPLE
    assert attrs["weights"] == "untrained"
    assert attrs["precision"] == "float32"
    assert attrs["device"] == "cpu"
    assert attrs["tta"] == ["identity"]
    assert attrs["status"] == "ok"


def test_infer_untrained_warns(slide, caplog):
    """A run without weights logs a WARNING that the masks are meaningless."""
    with caplog.at_level("WARNING", logger="wsiseg.ensemble"):
        run_infer(slide["store"], slide["plan_path"], 0, slide["folder"] / "shard-0.zarr",
                  output_downsample=DOWNSAMPLE, batch_size=BATCH_SIZE, seed=SEED)
    assert any("meaningless" in record.getMessage() for record in caplog.records)


def test_infer_shards_cover_every_patch(slide):
    """Shards 0 and 1 together give every patch footprint its full weight."""
    shard_0 = slide["folder"] / "shard-0.zarr"
    if not shard_0.exists():
        run_infer(slide["store"], slide["plan_path"], 0, shard_0, output_downsample=DOWNSAMPLE,
                  batch_size=BATCH_SIZE, seed=SEED)

    weight = np.zeros((math.ceil(IMAGE_H / DOWNSAMPLE), math.ceil(IMAGE_W / DOWNSAMPLE)))
    for path in (shard_0, slide["reference"]):
        band = read_band(path)
        row0 = band["attrs"]["out_row0"]
        weight[row0 : row0 + band["weight"].shape[0]] += band["weight"]

    expected = np.zeros_like(weight)
    side = PATCH_PX // DOWNSAMPLE
    step = STRIDE_PX // DOWNSAMPLE
    for r, c in zip(*np.nonzero(TISSUE), strict=True):
        expected[r * step : r * step + side, c * step : c * step + side] += 1.0
    assert np.array_equal(weight, expected)


def test_infer_deterministic(slide):
    """A second run with the same seed writes the same band."""
    again = slide["folder"] / "again.zarr"
    run_infer(slide["store"], slide["plan_path"], 1, again, output_downsample=DOWNSAMPLE,
              batch_size=BATCH_SIZE, seed=SEED)
    first = read_band(slide["reference"])
    second = read_band(again)
    assert np.array_equal(first["sum"], second["sum"])
    assert np.array_equal(first["weight"], second["weight"])


def test_infer_ensemble_writes_variance(slide):
    """Two weight files give the mean of their maps and the variance across them."""
    folder = slide["folder"]
    models = [untrained_model(11), untrained_model(12)]
    paths = [folder / f"member-{k}.weights.h5" for k in range(2)]
    for model, path in zip(models, paths, strict=True):
        model.save_weights(path)

    out = folder / "ensemble.zarr"
    run_infer(slide["store"], slide["plan_path"], 1, out, weights=paths, output_downsample=DOWNSAMPLE,
              batch_size=BATCH_SIZE, seed=SEED)
    band = read_band(out)
    expected = expected_band(models, slide["store"], slide["plan"]["shards"][1])

    np.testing.assert_allclose(band["sum"], expected["sum"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(band["variance_sum"], expected["variance_sum"], rtol=0, atol=2e-6)
    assert band["variance_sum"].max() > 0
    assert [record["file"] for record in band["attrs"]["weights"]] == [path.name for path in paths]


def test_infer_rejects_downsample(slide):
    """An output downsample that does not divide the stride raises ConfigError."""
    from wsiseg.errors import ConfigError

    with pytest.raises(ConfigError, match="must divide"):
        run_infer(slide["store"], slide["plan_path"], 1, slide["folder"] / "bad.zarr",
                  output_downsample=3)


_EMPTY_BAND_SCRIPT = """
import sys
from wsiseg.infer import run_infer
run_infer(sys.argv[1], sys.argv[2], 0, sys.argv[3], output_downsample=4)
loaded = sorted(name for name in ("keras", "tensorflow") if name in sys.modules)
print("loaded:" + ",".join(loaded))
"""


@pytest.mark.parametrize("case", ["no_tissue", "no_patches"])
def test_infer_empty_band_without_keras(tmp_path, case):
    """A shard without patches writes a valid empty band and never imports Keras."""
    tissue = np.zeros_like(TISSUE) if case == "no_patches" else TISSUE
    status = "no_tissue" if case == "no_tissue" else "ok"
    store = tmp_path / "patches.zarr"
    plan_path = tmp_path / "shards.json"
    write_patches_store(store, tissue, status=status)
    write_plan(plan_path, tissue if status == "ok" else np.zeros_like(TISSUE), patches_per_shard=100, status=status)
    out = tmp_path / "shard-0.zarr"

    completed = subprocess.run(
        [sys.executable, "-c", _EMPTY_BAND_SCRIPT, str(store), str(plan_path), str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "loaded:\n" in completed.stdout

    band = read_band(out)
    assert band["sum"].shape == (0, math.ceil(IMAGE_W / DOWNSAMPLE))
    assert band["weight"].shape == band["sum"].shape
    assert band["attrs"]["n_patches"] == 0
    assert band["attrs"]["status"] == status
    assert band["attrs"]["weights"] == "untrained"


_SLOW_INFER_SCRIPT = """
import sys
from wsiseg.infer import run_infer
run_infer(sys.argv[1], sys.argv[2], 1, sys.argv[3], output_downsample=4, batch_size=1,
          tta=["flip_h", "flip_v", "rot90", "rot180", "rot270", "transpose"], seed=3, devices=[])
"""


def test_infer_kill_leaves_no_store(slide):
    """kill -9 during prediction leaves nothing at the final path, and a rerun matches."""
    out = slide["folder"] / "killed.zarr"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_INFER_SCRIPT, str(slide["store"]), str(slide["plan_path"]), str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        # The temporary store appears once the model is built, just before prediction starts.
        deadline = time.monotonic() + 120
        while not list(slide["folder"].glob(".tmp-killed.zarr-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        still_running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    leftovers = list(slide["folder"].glob(".tmp-killed.zarr-*"))
    assert still_running
    assert leftovers
    # The leftover is an incomplete Zarr group, which must never sit at the final path.
    assert (leftovers[0] / "zarr.json").exists()
    assert not out.exists()

    run_infer(slide["store"], slide["plan_path"], 1, out, output_downsample=DOWNSAMPLE,
              batch_size=BATCH_SIZE, seed=SEED)
    rerun = read_band(out)
    reference = read_band(slide["reference"])
    np.testing.assert_allclose(rerun["sum"], reference["sum"], rtol=0, atol=1e-6)
    assert np.array_equal(rerun["weight"], reference["weight"])


@pytest.mark.parametrize("mode", ["digipathai", "imagenet"])
def test_scaling_in_model_matches_preprocess(mode):
    """The scaling that runs inside the wrapped model equals wsiseg.model.preprocess."""
    import keras

    from wsiseg.ensemble import preprocessing_affine
    from wsiseg.model import preprocess

    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    scale, offset = preprocessing_affine(mode)
    layer = keras.layers.Rescaling(scale, offset, dtype="float32")
    scaled = keras.ops.convert_to_numpy(layer(pixels))
    np.testing.assert_allclose(scaled, preprocess(pixels, mode), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("counts", "patches_per_shard", "max_shards"),
    [
        ([3] * 100, 30, 64),
        ([3] * 100, 30, 4),
        ([0, 0, 5, 5, 5, 5, 0], 4, 64),
        ([10], 4, 64),
        ([0, 7, 0, 0, 1, 9, 2, 0], 5, 3),
    ],
)
def test_plan_shards_bands(counts, patches_per_shard, max_shards):
    """Shards are contiguous bands of whole rows, none empty, within the shard limit."""
    shards = plan_shards(counts, patches_per_shard, max_shards)
    wanted = min(max_shards, math.ceil(sum(counts) / patches_per_shard))

    assert [shard["index"] for shard in shards] == list(range(len(shards)))
    assert shards[0]["row_start"] == 0
    assert shards[-1]["row_stop"] == len(counts)
    for before, after in zip(shards[:-1], shards[1:], strict=True):
        assert before["row_stop"] == after["row_start"]
    for shard in shards:
        assert shard["n_patches"] == sum(counts[shard["row_start"] : shard["row_stop"]])
        assert shard["n_patches"] > 0
        assert shard["patch_start"] == sum(counts[: shard["row_start"]])
        assert shard["patch_stop"] == shard["patch_start"] + shard["n_patches"]
    assert 1 <= len(shards) <= wanted


def test_plan_shards_even_split():
    """Uniform rows split into equal bands."""
    shards = plan_shards([3] * 100, 30, 4)
    assert [shard["n_patches"] for shard in shards] == [75, 75, 75, 75]


def test_plan_shards_no_patches():
    """A grid without patches gets one empty shard over every row."""
    assert plan_shards([0, 0, 0], 10, 4) == [
        {"index": 0, "row_start": 0, "row_stop": 3, "n_patches": 0, "patch_start": 0, "patch_stop": 0}
    ]


def test_min_patches_per_shard_arithmetic():
    """7 s of start-up at 2,000 patches/s needs 266,000 patches for a 5 % share."""
    from wsiseg.shards import min_patches_per_shard

    n = min_patches_per_shard(7.0, 2000.0, 0.05)
    assert n == 266_000
    assert 7.0 / (7.0 + n / 2000.0) <= 0.05


def test_prefetcher_raises_producer_error():
    """An exception in the producer thread is raised in the consuming thread."""
    from wsiseg.infer import Prefetcher

    def produce():
        yield 1
        raise ValueError("broken chunk")

    received = []
    with pytest.raises(ValueError, match="broken chunk"):
        with Prefetcher(produce, max_items=1) as prefetcher:
            for item in prefetcher:
                received.append(item)
    assert received == [1]


def test_background_worker_raises_error():
    """An exception in the worker is raised when the block ends, and later items are skipped."""
    from wsiseg.infer import BackgroundWorker

    done = []

    def work(item):
        if item == 2:
            raise ValueError("write failed")
        done.append(item)

    with pytest.raises(ValueError, match="write failed"):
        with BackgroundWorker(work, max_items=1, name="test-worker") as worker:
            for item in range(1, 4):
                worker.submit(item)
    assert done == [1]


def test_infer_corrupt_chunk_leaves_no_store(slide, tmp_path):
    """A corrupt image chunk fails the shard with an error and writes no store."""
    import shutil

    store = tmp_path / "patches.zarr"
    shutil.copytree(slide["store"], store)
    chunk_files = sorted((store / "image" / "c").rglob("*"))
    chunk = [path for path in chunk_files if path.is_file()][-1]
    chunk.write_bytes(b"not a blosc frame")

    out = tmp_path / "shard-1.zarr"
    with pytest.raises(RuntimeError, match="blosc"):
        run_infer(store, slide["plan_path"], 1, out, output_downsample=DOWNSAMPLE,
                  batch_size=BATCH_SIZE, seed=SEED)
    assert not out.exists()
    assert not list(tmp_path.glob(".tmp-shard-1.zarr-*"))
