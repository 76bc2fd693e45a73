"""Atomic writes: an artefact is either complete at its final path or absent.

Each writer creates a temporary sibling in the same directory (so the final rename stays
on one file system) and moves it into place with ``os.replace`` only after the content is
complete. A process killed half-way leaves a ``.tmp-*`` sibling behind, never a partial
artefact under the real name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _naming(error: OSError, path: Path) -> OSError:
    """Return ``error`` as an OSError whose message and filename name the final ``path``.

    Errors raised while flushing (a full disk) carry no file name, and errors on the
    temporary sibling name a file the user never asked for.
    """
    reason = error.strerror or str(error)
    return OSError(error.errno, f"cannot write {path}: {reason}", str(path))


# tempfile creates files 0600 and folders 0700; artefacts get the permissions any other
# new file would get, so colleagues in the same group can read a cohort's results.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_sibling(path: Path, *, directory: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{path.name}-"
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        temp.chmod(0o777 & ~_UMASK)
        return temp
    handle, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_UMASK)
    return Path(name)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    try:
        temp = _temp_sibling(path, directory=False)
    except OSError as error:
        raise _naming(error, path) from error
    try:
        with open(temp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise _naming(error, path) from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN is rejected)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, sort_keys=False)
    write_text(path, text + "\n")


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary siblings that a killed writer of ``path`` left behind.

    Snakemake runs at most one job per output, so any ``.tmp-<name>-*`` sibling that
    exists when a new writer starts belongs to a writer that died (kill -9, node
    failure). Without this, every crash would leave a partial store on disk for good.
    """
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".tmp-{glob.escape(path.name)}-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block succeeds.

    Used for Zarr stores and other multi-file outputs. An existing ``path`` is removed
    only after the new content is complete. On error the temporary directory is deleted
    and ``path`` is left as it was.
    """
    path = Path(path)
    _remove_stale_temps(path)
    try:
        temp = _temp_sibling(path, directory=True)
    except OSError as error:
        raise _naming(error, path) from error
    try:
        yield temp
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise _naming(error, path) from error
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        # Move the old directory aside first: rmtree is not atomic, a rename is.
        old = _temp_sibling(path, directory=True)
        old.rmdir()
        os.replace(path, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(temp, path)
