"""Exceptions raised by wsiseg.

Every error about one slide carries its slide id, so a message in a cohort log names the
slide it belongs to without the surrounding context.
"""

from __future__ import annotations


class WsisegError(Exception):
    """Base class of every error wsiseg raises on purpose."""

    def __init__(self, message: str, slide_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.slide_id = slide_id

    def __str__(self) -> str:
        if self.slide_id:
            return f"slide {self.slide_id}: {self.message}"
        return self.message


class SlideReadError(WsisegError):
    """A slide file is missing, truncated or in a format OpenSlide cannot read."""


class MppError(WsisegError):
    """A slide's microns-per-pixel value is missing where required, or implausible."""


class ConfigError(WsisegError):
    """A configuration value or sample sheet is invalid."""


class WeightsError(WsisegError):
    """A model weights file is missing, of an unknown type, or does not fit the model."""


class ArtefactError(WsisegError):
    """An intermediate artefact is missing, incomplete or inconsistent with its inputs."""
