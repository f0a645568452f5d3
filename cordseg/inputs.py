"""Checks of what callers pass in, and the contrast of an image (given, or read from its file name)."""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from .contract import CONTRASTS
from .errors import InputError, ResourceError
from .io import nifti_stem

# BIDS suffixes first, then the names people give files.
_CONTRAST_PATTERNS = [
    ("t2s", r"(?:^|[_\-.])(t2star|t2s|t2\*|me-?gre|gre|mt0|mton|mtoff)(?:[_\-.]|$)"),
    ("t1", r"(?:^|[_\-.])(t1w|t1)(?:[_\-.]|$)"),
    ("t2", r"(?:^|[_\-.])(t2w|t2)(?:[_\-.]|$)"),
    ("dwi", r"(?:^|[_\-.])(dwi|dmri|dti)(?:[_\-.]|$)"),
]
_BIDS_SUFFIX = {"t1w": "t1", "t2w": "t2", "t2star": "t2s", "dwi": "dwi"}


def guess_contrast(name) -> str | None:
    """Contrast from a file name: the BIDS suffix (T1w, T2w, T2star, dwi) when there is one, otherwise
    common names (t1, t2, t2s, …) anywhere in it; None when nothing matches."""
    stem = nifti_stem(str(name)).lower()
    suffix = stem.rsplit("_", 1)[-1]
    if suffix in _BIDS_SUFFIX:
        return _BIDS_SUFFIX[suffix]
    for contrast, pattern in _CONTRAST_PATTERNS:
        if re.search(pattern, stem):
            return contrast
    return None


def resolve_contrast(src, contrast) -> str:
    """`contrast` checked, or the one `src`'s file name says (a path or an image read from a file)."""
    if contrast is not None:
        c = str(contrast).lower()
        if c not in CONTRASTS:
            raise InputError(f"unknown contrast '{contrast}' (choose from {', '.join(CONTRASTS)})")
        return c
    name = src if isinstance(src, (str, Path)) else (src.get_filename() if hasattr(src, "get_filename") else None)
    guessed = guess_contrast(name) if name else None
    if guessed is None:
        raise InputError(f"cannot tell the contrast of {Path(str(name)).name if name else 'the image'}; "
                         f"give it with -c/--contrast ({', '.join(CONTRASTS)})")
    return guessed


def _number(value, name, what) -> float:
    """`value` as a float, or InputError naming the argument (strings, None, arrays... are refused)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_threshold(threshold, name="threshold"):
    """InputError unless `threshold` is None or strictly between 0 and 1 (`name`: what the user called it)."""
    if threshold is not None and not (0.0 < _number(threshold, name, "a number between 0 and 1") < 1.0):
        raise InputError(f"{name} must be between 0 and 1 (exclusive), not {threshold}")


def check_threads(threads, name="threads"):
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise InputError(f"{name} must be a whole number >= 1, got {threads!r}")


def check_smoothness(smoothness, name="smoothness"):
    """InputError unless `smoothness` is a finite number >= 0."""
    value = _number(smoothness, name, "a finite number >= 0")
    if not (np.isfinite(value) and value >= 0):
        raise InputError(f"{name} must be a finite number >= 0, not {smoothness}")


def check_min_contrast(min_contrast, name="min_contrast"):
    if min_contrast is not None:
        value = _number(min_contrast, name, "a number >= 0")
        if not (np.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a number >= 0, got {min_contrast!r}")


def check_volume(volume, name="volume"):
    if volume is not None and (isinstance(volume, bool) or not isinstance(volume, (int, np.integer)) or volume < 0):
        raise InputError(f"{name} must be a whole number >= 0, got {volume!r}")


def check_flag(value, name):
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, not {value!r}")


def check_callable(fn, name="progress"):
    if fn is not None and not callable(fn):
        raise InputError(f"{name} must be a function (or None), got {type(fn).__name__}")


def check_model_path(path, name="model"):
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{name} must be a path to an ONNX file (or None), got {type(path).__name__}")


def typed_errors(fn):
    """`fn` raising a ResourceError instead of MemoryError, so callers meet CordsegError subclasses only."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemoryError:
            raise ResourceError("out of memory; crop the image around the spinal cord or free memory") from None
    return wrapper
