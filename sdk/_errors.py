"""Errors shared by every part of routet2i. Each subclasses the built-in it resembles."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad user input at a CLI or public boundary: printed as one line, exit code 2."""


class BundleError(ValueError):
    """A bundle folder is malformed or does not match its manifest (names the file)."""


class BundleFileMissing(FileNotFoundError):
    """A file a bundle needs is missing (names the file)."""
