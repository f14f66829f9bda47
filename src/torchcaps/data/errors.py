"""Exceptions raised by the data layer."""

__all__ = ["DataFormatError", "ChecksumError"]


class DataFormatError(ValueError):
    """A data file is corrupt, truncated, of the wrong format, or holds unexpected content."""


class ChecksumError(DataFormatError):
    """A file's SHA-256 does not match the expected value."""
