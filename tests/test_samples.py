"""Sample sheet and glob parsing, slide id checks."""

from __future__ import annotations

import pytest

from wsiseg.errors import ConfigError
from wsiseg.samples import (
    SlideEntry,
    check_unique,
    entries_from_glob,
    entries_from_sheet,
    load_entries,
    slide_id_from_path,
    validate_slide_id,
)


@pytest.mark.parametrize("slide_id", ["CMU-1", "case_01.a", "Müller_3", "切片7", "_x"])
def test_slide_id_valid(slide_id):
    """Ids made of letters of any script, digits, '.', '_' and '-' pass."""
    validate_slide_id(slide_id, "test")


@pytest.mark.parametrize(
    "slide_id",
    ["../../x", "/abs/path", "a/b", ".hidden", "-flag", "a b", "x;rm -rf", "$(id)", "`id`",
     "a'b", 'a"b', "a\nb", "line\n", "", ".", "..", "x" * 129],
)
def test_slide_id_rejected(slide_id):
    """Ids that could escape the results folder or reach a shell are rejected."""
    with pytest.raises(ConfigError, match="invalid slide id"):
        validate_slide_id(slide_id, "test")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/data/CMU-1.svs", "CMU-1"),
        ("/data/a.ome.tiff", "a"),
        ("/data/Biopsie Müller 3.ndpi", "Biopsie_Müller_3"),
        ("/data/$(touch x);.svs", "__touch_x__"),
        ("/data/boxes-dicom/", "boxes-dicom"),
        ("/data/.svs", "svs"),
    ],
)
def test_slide_id_from_path(path, expected):
    """Glob-derived ids drop the extension and replace unsafe characters."""
    slide_id = slide_id_from_path(path)
    assert slide_id == expected
    validate_slide_id(slide_id, "test")


def test_sheet_relative_paths_and_mpp(tmp_path):
    """Relative paths resolve against the sheet's folder; mpp is parsed per row."""
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("slide_id\tpath\tmpp\na\tslides/a.svs\t0.25\nb\t/abs/b.tiff\t\n", encoding="utf-8")

    entries = entries_from_sheet(str(sheet))

    assert entries[0] == SlideEntry("a", str(tmp_path / "slides/a.svs"), 0.25)
    assert entries[1] == SlideEntry("b", "/abs/b.tiff", None)


def test_sheet_csv_hostile_path_kept_verbatim(tmp_path):
    """A path with shell metacharacters is data, kept exactly as written."""
    hostile = "/data/x $(touch pwned) `id`; 'q\".svs"
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f'slide_id,path\nok1,"{hostile.replace(chr(34), chr(34) * 2)}"\n', encoding="utf-8")

    entries = entries_from_sheet(str(sheet))

    assert entries[0].path == hostile


def test_sheet_missing_column(tmp_path):
    """A sheet without a path column names what it expected and what it found."""
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("slide_id\tfile\na\tx.svs\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="lacks column"):
        entries_from_sheet(str(sheet))


def test_sheet_invalid_mpp(tmp_path):
    """A non-numeric mpp names the slide and the sheet."""
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("slide_id\tpath\tmpp\na\tx.svs\tfast\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid mpp 'fast' for slide a"):
        entries_from_sheet(str(sheet))


def test_duplicate_ids_name_both_paths():
    """Duplicate ids are rejected with both paths in the message."""
    entries = [SlideEntry("a", "/one/a.svs"), SlideEntry("a", "/two/a.svs")]
    with pytest.raises(ConfigError) as caught:
        check_unique(entries)
    assert "/one/a.svs" in str(caught.value)
    assert "/two/a.svs" in str(caught.value)


def test_glob_duplicates_rejected(tmp_path):
    """Two files whose names give the same id stop the run before any work."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "s.svs").write_bytes(b"")
    (tmp_path / "two" / "s.svs").write_bytes(b"")
    with pytest.raises(ConfigError, match="duplicate slide id 's'"):
        load_entries(None, str(tmp_path / "*" / "s.svs"))


def test_glob_no_match(tmp_path):
    """An empty glob is an error, not a run with nothing to do."""
    with pytest.raises(ConfigError, match="lists no slides"):
        load_entries(None, str(tmp_path / "*.svs"))


def test_glob_sorted(tmp_path):
    """Glob entries come sorted by path, so runs are reproducible."""
    for name in ("b.svs", "a.svs"):
        (tmp_path / name).write_bytes(b"")
    entries = entries_from_glob(str(tmp_path / "*.svs"))
    assert [entry.slide_id for entry in entries] == ["a", "b"]
