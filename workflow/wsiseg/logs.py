"""One logging set-up for every wsiseg command."""

from __future__ import annotations

import logging
import sys
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int = "INFO") -> None:
    """Log to stderr (Snakemake redirects it into each rule's log file).

    Python warnings are routed into the log, so library deprecations show up with a
    timestamp next to the slide they occurred on.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
