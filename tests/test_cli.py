"""The ``wsiseg`` command line: help for every stage, and errors that name the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_workflow import DATA

STAGES = ["inspect", "tissue", "patches", "infer", "stitch", "vectorise", "overlay", "report"]


def _wsiseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsiseg", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage):
    """Every stage has --help that describes its options."""
    process = _wsiseg(stage, "--help")
    assert process.returncode == 0
    assert "--out" in process.stdout


def test_inspect_writes_metadata(tmp_path):
    """`wsiseg inspect` on the real sample slide writes its metadata."""
    out = tmp_path / "slide.json"
    process = _wsiseg("inspect", str(DATA / "CMU-1-Small-Region.svs"), "--slide-id", "cmu", "--out", str(out))
    assert process.returncode == 0, process.stderr
    metadata = json.loads(out.read_text())
    assert metadata["slide_id"] == "cmu"
    assert metadata["status"] == "ok"
    assert "inspect finished" in process.stderr


def test_output_under_file_named(tmp_path):
    """An output folder that cannot be created fails with a message naming the path."""
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    process = _wsiseg("inspect", str(DATA / "tiny-16px.svs"), "--slide-id", "tiny",
                      "--out", str(blocker / "tiny" / "slide.json"))
    assert process.returncode == 1
    assert str(blocker / "tiny" / "slide.json") in process.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_named(tmp_path):
    """Writing into a read-only folder fails with a message that names the path."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        process = _wsiseg("inspect", str(DATA / "tiny-16px.svs"), "--slide-id", "tiny",
                          "--out", str(folder / "slide.json"))
    finally:
        folder.chmod(0o755)
    assert process.returncode == 1
    assert str(folder) in process.stderr


def test_output_on_full_disk_named():
    """A full disk (ENOSPC from /dev/full) fails with a message that names the path."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    code = (
        "import sys, errno\n"
        "from wsiseg.cli import main\n"
        "import wsiseg.atomic as atomic\n"
        "real_open = open\n"
        "def full_open(path, mode='r', *a, **k):\n"
        "    if 'w' in mode and '.tmp-' in str(path):\n"
        "        return real_open('/dev/full', mode, *a, **k)\n"
        "    return real_open(path, mode, *a, **k)\n"
        "atomic.open = full_open\n"
        f"sys.exit(main(['inspect', {str(DATA / 'tiny-16px.svs')!r}, '--slide-id', 'tiny', '--out', sys.argv[1]]))\n"
    )
    process = subprocess.run([sys.executable, "-c", code, "/tmp/wsiseg-full-disk-test/slide.json"],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert "No space left on device" in process.stderr
    assert "wsiseg-full-disk-test" in process.stderr
