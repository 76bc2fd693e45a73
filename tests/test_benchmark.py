"""Smoke tests of the benchmark command at tiny sizes (`wsiseg benchmark --quick`)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile

import pytest

from wsiseg import benchmark


@pytest.fixture(scope="module")
def map_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Sections a, c and e at the quick sizes, in a temporary folder that must vanish."""
    folder = tmp_path_factory.mktemp("benchmark")
    json_path = folder / "results.json"
    output = io.StringIO()
    original = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        with contextlib.redirect_stdout(output):
            code = benchmark.main(["--quick", "--sections", "ace", "--json", str(json_path)])
    finally:
        tempfile.tempdir = original
    leftovers = sorted(path.name for path in folder.glob("wsiseg-benchmark-*"))
    return {
        "code": code,
        "results": json.loads(json_path.read_text()),
        "leftovers": leftovers,
        "output": output.getvalue(),
    }


def test_map_run_exit_code(map_run):
    """The quick run of sections a, c and e succeeds."""
    assert map_run["code"] == 0


def test_map_run_deletes_work_dir(map_run):
    """The temporary work folder is gone after the run."""
    assert map_run["leftovers"] == []


def test_reading_ratios(map_run):
    """Section a has a raw rate and one stage row per worker count, with finite ratios."""
    reading = map_run["results"]["a_reading"]
    assert reading["raw"]["patches_per_s"] > 0
    assert [row["workers"] for row in reading["stage"]] == list(range(1, map_run["results"]["max_workers"] + 1))
    assert all(math.isfinite(row["per_worker_over_raw"]) for row in reading["stage"])


def test_map_polygons_match_generated_discs(map_run):
    """Stitching and vectorising the generated shards give one polygon per tumour disc."""
    for size in map_run["results"]["c_map"]["sizes"]:
        assert size["vectorise"]["n_tumour_regions"] == size["n_expected_regions"]


def test_map_area_close_to_analytic(map_run):
    """The vectorised tumour area is within 1 % of the generated discs' area."""
    for size in map_run["results"]["c_map"]["sizes"]:
        assert abs(size["tumour_area_relative_error"]) < 0.01


def test_map_peak_rss_recorded(map_run):
    """Stitch and vectorise report a peak RSS above their interpreter's baseline."""
    for size in map_run["results"]["c_map"]["sizes"]:
        for stage in ("stitch", "vectorise"):
            assert size[stage]["tree_peak_rss_bytes"] >= size[stage]["baseline_rss_bytes"] > 0


def test_memory_sizes_compared(map_run):
    """Section e compares the large slide with the small one for both stages."""
    memory = map_run["results"]["e_memory"]
    assert set(memory["rss_growth"]) == {"tissue", "patches"}
    assert memory["area_ratio"] == pytest.approx(16.0)


@pytest.mark.slow
def test_model_sections_quick(tmp_path, capsys):
    """Sections b and d run the model at tiny sizes and report their ratios."""
    json_path = tmp_path / "results.json"
    code = benchmark.main(
        ["--quick", "--sections", "bd", "--json", str(json_path), "--work-dir", str(tmp_path / "work")]
    )
    results = json.loads(json_path.read_text())
    assert code == 0
    assert results["b_inference"]["stage_over_raw_predict"] > 0
    assert 0 < results["d_overhead"]["overhead_fraction"] < 1
    assert results["d_overhead"]["model_s"] > 0
    assert "raw model.predict" in capsys.readouterr().out


def test_generated_shards_announced(map_run):
    """Section c states in its output that its shards are generated, not predicted."""
    assert "GENERATED" in map_run["output"]


@pytest.mark.parametrize(
    "argv",
    [["--sections", "xz"], ["--infer-patch-px", "48"], ["--small-slide-px", "4096", "--large-slide-px", "2048"]],
)
def test_rejects_invalid_options(argv):
    """Invalid options return exit code 2 before anything runs."""
    assert benchmark.main(argv) == 2
