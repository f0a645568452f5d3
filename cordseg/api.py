"""The Python API: paths or nibabel images in, nibabel images out, on the input's own grid.

    import cordseg
    seg = cordseg.segment_cord("sub-01_T2w.nii.gz")             # contrast read from the name
    les = cordseg.segment_lesions(img, contrast="t2s")           # any nibabel image
    mask, centerline = cordseg.detect_centerline(img, contrast="t2")

Errors are CordsegError subclasses; warnings are CordsegWarning. Nothing is printed.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from . import centerline as _centerline
from . import lesions as _lesions
from . import segmentation as _segmentation
from .errors import CordsegError, CordsegWarning, InputError, ModelError, NoCordError
from .inference import CONTRASTS, find_model
from .io import image_like, load_image, same_grid
from .lesions import Lesion, lesion_table  # noqa: F401 (public here too)
from .orientation import to_rpi

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
    stem = Path(str(name)).name.lower()
    stem = re.sub(r"\.nii(\.gz)?$", "", stem)
    suffix = stem.rsplit("_", 1)[-1]
    if suffix in _BIDS_SUFFIX:
        return _BIDS_SUFFIX[suffix]
    for contrast, pattern in _CONTRAST_PATTERNS:
        if re.search(pattern, stem):
            return contrast
    return None


def check_threshold(threshold, name="threshold"):
    """InputError unless `threshold` is None or strictly between 0 and 1 (`name`: what the user called it)."""
    if threshold is not None and not (0.0 < float(threshold) < 1.0):
        raise InputError(f"{name} must be between 0 and 1 (exclusive), not {threshold}")


def check_threads(threads, name="threads"):
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise InputError(f"{name} must be a whole number >= 1, got {threads!r}")


def check_smoothness(smoothness, name="smoothness"):
    """InputError unless `smoothness` is a finite number >= 0."""
    if not (np.isfinite(smoothness) and smoothness >= 0):
        raise InputError(f"{name} must be a finite number >= 0, not {smoothness}")


def resolve_contrast(src, contrast) -> str:
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


def _warn_if_flagged(model):
    if model.warning:
        warnings.warn(f"{model.path.name}: {model.warning}", CordsegWarning, stacklevel=3)


def _prepare(src, contrast, volume):
    img = load_image(src, volume=volume)
    return img, resolve_contrast(src, contrast), to_rpi(img)


def _mask_image(data, ref, dtype=np.uint8):
    """A new image on `ref`'s grid (same shape, affine, qform/sform and codes)."""
    return image_like(np.asarray(data, dtype), ref)


def detect_centerline(img, contrast=None, *, model=None, smoothness=_centerline.DEFAULT_SMOOTHNESS,
                      volume=None, progress=None, threads=None):
    """Returns (centerline mask image on the input grid, Centerline).

    threads: CPU threads for ONNX Runtime (None: its default, one per physical core)."""
    check_smoothness(smoothness)
    check_threads(threads)
    image, contrast, rpi = _prepare(img, contrast, volume)
    cl = _centerline.detect(rpi, find_model("centerline", contrast, model, threads), smoothness=smoothness,
                            progress=progress)
    return _mask_image(cl.native_mask(), image), cl


def centerline_from_mask(img, centerline, *, volume=None):
    """A centerline given as a mask (path or image; on any grid of the session; a few marked voxels are
    enough, linear in between) on `img`'s slices: (mask image on the input grid, one voxel per slice,
    Centerline), as detect_centerline returns them."""
    image = load_image(img, volume=volume)
    rpi = to_rpi(image)
    cl = _given_centerline(centerline, rpi)
    return _mask_image(cl.native_mask(), image), cl


def _given_centerline(centerline, rpi):
    """A centerline the caller supplies: a Centerline from detect_centerline on the same image, or a mask
    (path or nibabel image; a few marked voxels are enough, see centerline.from_mask)."""
    if isinstance(centerline, _centerline.Centerline):
        if not same_grid(centerline.rpi.affine, centerline.rpi.shape, rpi.affine, rpi.shape):
            raise InputError("the centerline given was found on another image (its grid differs)")
        return _centerline.Centerline(centerline.z, centerline.x, centerline.y, rpi)
    mask = load_image(centerline)
    return _centerline.from_mask(rpi, np.asanyarray(mask.dataobj), mask.affine)


def _soft_map(task, img, contrast, threshold, model, centerline_model, volume, progress, centerline=None,
              threads=None):
    """Shared by cord and lesion segmentation: (input image, RPI view, probability map, CNN2 model,
    centerline, contrast)."""
    check_threshold(threshold)
    check_threads(threads)
    image, contrast, rpi = _prepare(img, contrast, volume)
    cnn2 = find_model(task, contrast, model, threads)  # before any work: a missing model fails fast
    _warn_if_flagged(cnn2)
    if centerline is not None:
        cl = _given_centerline(centerline, rpi)
    else:
        cl = _centerline.detect(rpi, find_model("centerline", contrast, centerline_model, threads),
                                progress=progress)
    prob = _segmentation.soft_segmentation(cl, cnn2, progress, stage={"sc": "cord", "lesion": "lesions"}[task])
    return image, rpi, prob, cnn2, cl, contrast


def segment_cord(img, contrast=None, soft=False, *, threshold=None, model=None, centerline_model=None,
                 centerline=None, volume=None, progress=None, threads=None):
    """Spinal cord mask (uint8) or, with soft=True, its probability map (float32), on the input grid.

    centerline: use this centerline instead of detecting one: a mask (path or image, on any grid of the same
    session; marked voxels on a few slices are interpolated between) or the Centerline that
    detect_centerline returned for this image. threads: as for detect_centerline."""
    image, rpi, prob, sc_model, _, _ = _soft_map("sc", img, contrast, threshold, model, centerline_model, volume,
                                                 progress, centerline, threads)
    if soft:
        return _mask_image(rpi.to_native(prob), image, np.float32)
    thr = sc_model.threshold if threshold is None else float(threshold)
    mask = _segmentation.keep_largest_component((prob >= thr).astype(np.uint8))
    if not mask.any():
        raise NoCordError("no spinal cord found (the centerline was found, but no voxel reached the "
                          f"cord threshold {thr:g})")
    return _mask_image(rpi.to_native(mask), image)


def segment_lesions(img, contrast=None, soft=False, *, threshold=None, min_contrast=None, model=None,
                    centerline_model=None, cord_model=None, centerline=None, volume=None, progress=None,
                    threads=None):
    """MS lesion mask (uint8) or probability map (float32) in the cord, on the input grid (centerline: as
    for segment_cord).

    The mask keeps only lesions that touch the cord and whose mean intensity is at least `min_contrast`
    times the median of the lesion-free cord on their slices (None: the lesion model's own value, 1.1 for
    the shipped one; 0: no screening, every voxel at the threshold). The cord is segmented with `cord_model`
    (default: the installed cord model for the contrast) along the same centerline. The soft map is the
    network's output, unscreened. threads: as for detect_centerline."""
    if min_contrast is not None and not (np.isfinite(min_contrast) and min_contrast >= 0):
        raise InputError(f"min_contrast must be a number >= 0, got {min_contrast!r}")
    image, rpi, prob, lesion_model, cl, contrast = _soft_map("lesion", img, contrast, threshold, model,
                                                            centerline_model, volume, progress, centerline,
                                                            threads)
    if soft:
        return _mask_image(rpi.to_native(prob), image, np.float32)
    thr = lesion_model.threshold if threshold is None else float(threshold)
    mask = (prob >= thr).astype(np.uint8)
    least = lesion_model.min_lesion_contrast if min_contrast is None else float(min_contrast)
    if least > 0 and mask.any():
        try:
            sc = find_model("sc", contrast, cord_model, threads)
        except ModelError as err:
            warnings.warn(f"lesion screening skipped: {err}", CordsegWarning, stacklevel=2)
        else:
            mask = _lesions.screen(mask, cl, sc, least, progress)
    return _mask_image(rpi.to_native(mask), image)


__all__ = ["detect_centerline", "segment_cord", "segment_lesions", "lesion_table", "guess_contrast",
           "CordsegError"]
