"""Error types shared by every edgetune package."""

from __future__ import annotations


class EdgetuneError(Exception):
    """Base class of edgetune's user-facing errors (bad config, bad data, bad artifacts)."""


class ConfigError(EdgetuneError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class ImageDecodeError(EdgetuneError, ValueError):
    """Bytes or a file could not be decoded as an image."""


class BundleError(EdgetuneError):
    """An exported bundle is incomplete, inconsistent or tampered with."""
