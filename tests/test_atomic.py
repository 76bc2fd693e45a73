"""Atomic writers: complete artefacts or none, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from wsiseg.atomic import atomic_dir, write_json, write_text


def test_write_json_replaces_whole_file(tmp_path):
    """A rewrite replaces the file and leaves no temporary sibling."""
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2})
    assert path.read_text() == '{\n  "x": 2\n}\n'
    assert [entry.name for entry in tmp_path.iterdir()] == ["a.json"]


def test_write_json_rejects_nan(tmp_path):
    """NaN is not JSON; the writer raises and leaves nothing behind."""
    with pytest.raises(ValueError):
        write_json(tmp_path / "a.json", {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_old(tmp_path):
    """An error inside the block keeps the previous directory untouched."""
    target = tmp_path / "store.zarr"
    with atomic_dir(target) as temp:
        (temp / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as temp:
            (temp / "new").write_text("new")
            raise RuntimeError("killed half-way")
    assert sorted(entry.name for entry in target.iterdir()) == ["old"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["store.zarr"]


def test_atomic_outputs_follow_umask(tmp_path):
    """Files and folders get the umask's permissions, not tempfile's private ones."""
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    expected_file = 0o666 & ~old_umask
    expected_dir = 0o777 & ~old_umask
    write_text(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d") as temp:
        (temp / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == expected_file
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == expected_dir


def test_atomic_dir_removes_stale_temps(tmp_path):
    """A new writer deletes the temporary store a killed writer left behind."""
    stale = tmp_path / ".tmp-store.zarr-abc123"
    stale.mkdir()
    (stale / "chunk").write_bytes(b"partial")
    other = tmp_path / ".tmp-other.zarr-abc123"
    other.mkdir()
    with atomic_dir(tmp_path / "store.zarr") as temp:
        (temp / "complete").write_text("x")
    assert not stale.exists()
    assert other.exists()
