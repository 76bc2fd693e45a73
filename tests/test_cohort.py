"""A cohort run over broken, odd and hostile slides: every slide gets a row, the run exits 0.

One real Snakemake run covers the slide classes that must not stop a cohort. They are
unreadable files (truncated, random bytes, missing, a directory), a slide without
tissue, a slide without MPP and a DICOM WSI folder. Two more sit behind odd paths: one
with spaces and non-ASCII characters on read-only storage, one full of shell
metacharacters.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from test_workflow import DATA, run_snakemake
from wsiseg.synthetic import Disc, blank_slide, write_slide

HOSTILE_NAME = "x $(touch PWNED) ; `touch PWNED2` 'q\" &.svs"


def _cohort(root: Path) -> dict[str, Path]:
    """Create the cohort's slides under ``root`` and return slide id → path."""
    slides = root / "slides"
    slides.mkdir()

    truncated = slides / "truncated.svs"
    data = (DATA / "CMU-1-Small-Region.svs").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    random_bytes = slides / "random.svs"
    random_bytes.write_bytes(os.urandom(4096))

    directory = slides / "a-folder.svs"
    directory.mkdir()

    blank = slides / "blank.tiff"
    blank_slide(blank, width_px=1024, height_px=1024, mpp_um=0.5)

    no_mpp = slides / "no-mpp.tiff"
    write_slide(no_mpp, width_px=512, height_px=512, mpp_um=None,
                discs=(Disc(256, 256, 180),), level_downsamples=(1.0, 4.0))

    # A slide on read-only storage, in a folder whose name has spaces and non-ASCII letters.
    read_only = slides / "Biopsie Müller 3"
    read_only.mkdir()
    tiny = read_only / "tiny 16px é.svs"
    shutil.copyfile(DATA / "tiny-16px.svs", tiny)
    tiny.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)

    hostile = slides / HOSTILE_NAME
    shutil.copyfile(DATA / "tiny-16px.svs", hostile)

    dicom = slides / "boxes-dicom"
    shutil.copytree(DATA / "boxes-dicom", dicom)

    return {
        "truncated": truncated,
        "random": random_bytes,
        "missing": slides / "does-not-exist.svs",
        "folder": directory,
        "blank": blank,
        "no_mpp": no_mpp,
        "read_only_unicode": tiny,
        "hostile": hostile,
        "dicom": dicom,
    }


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    """Run the workflow once over the whole odd cohort; return (workdir, report, process)."""
    workdir = tmp_path_factory.mktemp("cohort run")
    slides = _cohort(workdir)
    # The hostile name contains a double quote, so it goes into the sheet CSV-quoted.
    sheet = workdir / "samples.csv"
    sheet.write_text(
        "slide_id,path\n"
        + "".join(f'{slide_id},"{str(path).replace(chr(34), chr(34) * 2)}"\n' for slide_id, path in slides.items()),
        encoding="utf-8",
    )

    config = {
        "results": str(workdir / "results"),
        "sample_sheet": str(sheet),
        "slides_glob": None,
        "patches": {"patch_size_px": 128, "stride_px": 128, "workers": 1, "chunk_px": 256},
        "inference": {"batch_size": 8, "output_downsample": 4, "threads": 2},
        "vectorise": {"min_area_um2": 0.0, "min_area_px": 0.0},
    }
    try:
        process = run_snakemake(workdir, config, check=False)
    finally:
        (workdir / "slides" / "Biopsie Müller 3").chmod(0o755)
    report_path = workdir / "results" / "report.csv"
    report = pd.read_csv(report_path, keep_default_na=True) if report_path.exists() else None
    return workdir, report, process


def _row(report: pd.DataFrame, slide_id: str) -> pd.Series:
    rows = report[report["slide_id"] == slide_id]
    assert len(rows) == 1, f"expected one row for {slide_id}, found {len(rows)}"
    return rows.iloc[0]


def test_cohort_exits_zero(cohort_run):
    """Broken slides are statuses, not failed jobs: snakemake exits 0."""
    _, _, process = cohort_run
    assert process.returncode == 0, process.stderr[-6000:]


def test_cohort_every_slide_has_row(cohort_run):
    """The report has exactly one row per slide of the sheet."""
    _, report, _ = cohort_run
    assert report is not None
    assert sorted(report["slide_id"]) == sorted(
        ["truncated", "random", "missing", "folder", "blank", "no_mpp", "read_only_unicode", "hostile", "dicom"]
    )


@pytest.mark.parametrize("slide_id", ["truncated", "random", "missing", "folder"])
def test_cohort_unreadable_rows(cohort_run, slide_id):
    """Unreadable inputs get status unreadable and a message naming the problem."""
    _, report, _ = cohort_run
    row = _row(report, slide_id)
    assert row["status"] == "unreadable"
    assert isinstance(row["message"], str)
    assert len(row["message"]) > 10


def test_cohort_unreadable_geojson_empty(cohort_run):
    """An unreadable slide still gets a valid, empty FeatureCollection."""
    workdir, _, _ = cohort_run
    collection = json.loads((workdir / "results" / "random" / "tumour.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["features"] == []


def test_cohort_blank_slide_no_tissue(cohort_run):
    """A white slide has status no_tissue and zero areas."""
    workdir, report, _ = cohort_run
    row = _row(report, "blank")
    assert row["status"] == "no_tissue"
    assert row["tissue_area_mm2"] == 0
    assert row["tumour_area_mm2"] == 0
    collection = json.loads((workdir / "results" / "blank" / "tumour.geojson").read_text())
    assert collection["features"] == []


def test_cohort_no_mpp_row(cohort_run):
    """A slide without MPP is processed in pixels with empty mm² columns."""
    _, report, _ = cohort_run
    row = _row(report, "no_mpp")
    assert row["status"] == "no_mpp"
    assert row["mpp_source"] == "missing"
    assert pd.isna(row["mpp_x"])
    assert pd.isna(row["tissue_area_mm2"])
    assert pd.isna(row["tumour_area_mm2"])


@pytest.mark.parametrize("slide_id", ["read_only_unicode", "hostile", "dicom"])
def test_cohort_odd_paths_processed(cohort_run, slide_id):
    """Slides behind odd but valid paths, and a DICOM folder, are processed normally."""
    _, report, _ = cohort_run
    row = _row(report, slide_id)
    assert row["status"] == "ok"
    assert row["mpp_x"] == pytest.approx(0.499, abs=1e-3)


def test_cohort_hostile_path_not_executed(cohort_run):
    """Shell metacharacters in a slide path are never run by a shell."""
    workdir, _, _ = cohort_run
    assert not list(workdir.rglob("PWNED*"))
    assert not list(Path.cwd().glob("PWNED*"))
