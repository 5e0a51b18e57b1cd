"""Exceptions that carry a message a user can act on."""

from __future__ import annotations


class CnnkitError(Exception):
    """Base class: a problem the user can fix (bad argument, bad file, missing package)."""


class DataError(CnnkitError):
    """A dataset, annotation or image file is unusable; the message names the file (and line)."""


class WeightsError(CnnkitError):
    """A weights file does not fit the model; the message names the keys and shapes."""


class OutputError(CnnkitError):
    """An output cannot be written: the disk is full, the folder is read-only, or a file stands where
    a folder must be. The message names the path; what was written before is intact."""
