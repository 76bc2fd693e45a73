"""The list of slides a run processes: a sample sheet or a glob, checked before any work.

Slide ids become directory names under the results directory, so they are checked to be
safe file names: letters (any script), digits, '.', '_' and '-', not starting with a
dot, at most 128 characters. That rules out path separators, '..', quotes, shell
metacharacters and control characters, so no id can place a file outside its slide's
directory. Ids derived from file names by a glob have every other character replaced by
'_'. Duplicate ids are rejected with both paths named, before any slide is touched.
"""

from __future__ import annotations

import glob
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wsiseg.errors import ConfigError

logger = logging.getLogger(__name__)

SLIDE_ID_PATTERN = re.compile(r"[^\W][\w.\-]{0,127}")

# Extensions stripped from a file name to form a glob-derived slide id. Multi-part
# extensions come first so "a.ome.tiff" gives "a", not "a.ome".
_SLIDE_EXTENSIONS = (
    ".ome.tiff", ".ome.tif", ".svs", ".tiff", ".tif", ".ndpi", ".vms", ".vmu", ".scn",
    ".mrxs", ".svslide", ".bif", ".dcm", ".czi", ".png", ".jpg", ".jpeg",
)


@dataclass(frozen=True)
class SlideEntry:
    """One slide of the run: its id, its path, and an MPP override (µm/px) or None."""

    slide_id: str
    path: str
    mpp_um: float | None = None


def validate_slide_id(slide_id: str, source: str) -> None:
    """Raise ConfigError unless ``slide_id`` is safe as a directory name."""
    if not SLIDE_ID_PATTERN.fullmatch(slide_id) or slide_id in (".", ".."):
        raise ConfigError(
            f"invalid slide id {slide_id!r} in {source}: use letters, digits, '.', '_' "
            "and '-' only (no spaces, slashes or quotes), not starting with '.' or '-', "
            "at most 128 characters"
        )


def slide_id_from_path(path: str) -> str:
    """Derive a safe slide id from a file or folder name."""
    name = Path(path.rstrip("/")).name
    lowered = name.lower()
    for extension in _SLIDE_EXTENSIONS:
        if lowered.endswith(extension) and len(name) > len(extension):
            name = name[: -len(extension)]
            break
    safe = re.sub(r"[^\w.\-]", "_", name)
    safe = re.sub(r"^[^\w]+", "", safe)[:128]
    return safe or "slide"


def _read_sheet(sheet_path: str) -> pd.DataFrame:
    path = Path(sheet_path)
    if not path.is_file():
        raise ConfigError(f"sample sheet not found: {sheet_path}; set sample_sheet in config.yaml to an existing TSV or CSV file")
    separator = "," if path.suffix.lower() == ".csv" else "\t"
    table = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, comment=None)
    table.columns = [column.strip().lower() for column in table.columns]
    missing = {"slide_id", "path"} - set(table.columns)
    if missing:
        raise ConfigError(
            f"sample sheet {sheet_path} lacks column(s) {', '.join(sorted(missing))}; "
            f"found {', '.join(table.columns)}. Expected slide_id, path and optionally mpp "
            f"({'comma' if separator == ',' else 'tab'}-separated)"
        )
    return table


def _parse_mpp(value: str, slide_id: str, sheet_path: str) -> float | None:
    text = value.strip()
    if not text:
        return None
    try:
        mpp_um = float(text)
    except ValueError:
        raise ConfigError(f"invalid mpp {value!r} for slide {slide_id} in {sheet_path}: expected a number in µm/px or an empty cell") from None
    if not math.isfinite(mpp_um) or mpp_um <= 0:
        raise ConfigError(f"invalid mpp {value!r} for slide {slide_id} in {sheet_path}: expected a positive number in µm/px")
    return mpp_um


def entries_from_sheet(sheet_path: str) -> list[SlideEntry]:
    """Read slide entries from a sample sheet; relative paths are taken from the sheet's folder."""
    table = _read_sheet(sheet_path)
    base = Path(sheet_path).parent
    entries = []
    for row in table.itertuples(index=False):
        slide_id = str(row.slide_id).strip()
        validate_slide_id(slide_id, f"sample sheet {sheet_path}")
        raw_path = str(row.path)
        if not raw_path.strip():
            raise ConfigError(f"empty path for slide {slide_id} in sample sheet {sheet_path}")
        path = raw_path if Path(raw_path).is_absolute() else str(base / raw_path)
        mpp_um = _parse_mpp(str(getattr(row, "mpp", "")), slide_id, sheet_path) if "mpp" in table.columns else None
        entries.append(SlideEntry(slide_id, path, mpp_um))
    return entries


def entries_from_glob(pattern: str) -> list[SlideEntry]:
    """Expand a glob of slide files or folders into entries with ids from their names."""
    paths = sorted(glob.glob(pattern, recursive=True))
    return [SlideEntry(slide_id_from_path(path), path) for path in paths]


def check_unique(entries: list[SlideEntry]) -> None:
    """Raise ConfigError naming both paths when two entries share a slide id."""
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.slide_id in seen:
            raise ConfigError(
                f"duplicate slide id {entry.slide_id!r}: {seen[entry.slide_id]!r} and "
                f"{entry.path!r}; give each slide a distinct slide_id in a sample sheet "
                "(a glob names slides after their file names without the extension)"
            )
        seen[entry.slide_id] = entry.path


def load_entries(sample_sheet: str | None, slides_glob: str | None) -> list[SlideEntry]:
    """Return the run's slides from the sample sheet, else from the glob."""
    if sample_sheet:
        entries = entries_from_sheet(sample_sheet)
        source = f"sample sheet {sample_sheet}"
    elif slides_glob:
        entries = entries_from_glob(slides_glob)
        source = f"glob {slides_glob!r}"
    else:
        raise ConfigError("no slides configured: set sample_sheet or slides_glob in config.yaml")

    if not entries:
        raise ConfigError(f"{source} lists no slides; check the path or pattern")
    check_unique(entries)
    logger.info("%d slide(s) from %s", len(entries), source)
    return entries
