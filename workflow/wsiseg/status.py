"""Per-slide status values written into every artefact and the report.

A slide's status travels from stage to stage, so a slide that one stage cannot process
still gets empty but valid artefacts downstream and a row in the report.
"""

from __future__ import annotations

OK = "ok"
NO_MPP = "no_mpp"  # processed in pixels; areas in mm² stay empty
NO_TISSUE = "no_tissue"
UNREADABLE = "unreadable"
FAILED = "failed"

ALL_STATUSES = (OK, NO_MPP, NO_TISSUE, UNREADABLE, FAILED)


def is_processable(status: str) -> bool:
    """Return True when later stages should compute on the slide."""
    return status in (OK, NO_MPP)
