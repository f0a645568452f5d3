"""The Python API: paths or nibabel images in, nibabel images out, on the input's own grid.

    import cordseg
    seg = cordseg.segment_cord("sub-01_T2w.nii.gz")             # contrast read from the name
    les = cordseg.segment_lesions(img, contrast="t2s")           # any nibabel image
    mask, centerline = cordseg.detect_centerline(img, contrast="t2")

Each call opens the models it needs; for many images, a cordseg.Segmenter opens them once.

Errors are CordsegError subclasses; warnings are CordsegWarning. Nothing is printed.
"""
from __future__ import annotations

from . import centerline as _centerline
from .errors import CordsegError
from .inputs import (check_callable, check_min_contrast, check_model_path, check_smoothness,  # noqa: F401
                     check_threads, check_threshold, guess_contrast, resolve_contrast, typed_errors)
from .io import image_like, input_shape, load_image
from .lesions import Lesion  # noqa: F401 (public here too)
from .lesions import lesion_table as _lesion_table
from .orientation import to_rpi
from .segmenter import Segmenter, given_centerline


def _prepare(src, contrast, volume):
    return load_image(src, volume=volume), resolve_contrast(src, contrast)


@typed_errors
def detect_centerline(img, contrast=None, *, model=None, smoothness=_centerline.DEFAULT_SMOOTHNESS,
                      volume=None, progress=None, threads=None, conus=True):
    """Returns (centerline mask image on the input grid, Centerline).

    threads: CPU threads for ONNX Runtime (None: its default, one per physical core). conus: end the
    centerline at the conus where the roots of the cauda equina run on below it (t1/t2; cordseg.conus)."""
    check_smoothness(smoothness)
    check_threads(threads)
    check_model_path(model)
    check_callable(progress)
    image, contrast = _prepare(img, contrast, volume)
    return Segmenter(contrast, centerline_model=model, threads=threads, smoothness=smoothness,
                     conus=conus)._centerline(image, contrast, progress)


@typed_errors
def centerline_from_mask(img, centerline, *, volume=None):
    """A centerline given as a mask (path or image; on any grid of the session; a few marked voxels are
    enough, linear in between) on `img`'s slices: (mask image on the input grid, one voxel per slice,
    Centerline), as detect_centerline returns them."""
    image = load_image(img, volume=volume)
    cl = given_centerline(centerline, to_rpi(image))
    return image_like(cl.native_mask().reshape(input_shape(image)), image), cl


@typed_errors
def segment_cord(img, contrast=None, soft=False, *, threshold=None, model=None, centerline_model=None,
                 centerline=None, volume=None, progress=None, threads=None, conus=True):
    """Spinal cord mask (uint8) or, with soft=True, its probability map (float32), on the input grid.

    centerline: use this centerline instead of detecting one: a mask (path or image, on any grid of the same
    session; marked voxels on a few slices are interpolated between) or the Centerline that
    detect_centerline returned for this image. threads, conus: as for detect_centerline."""
    check_threshold(threshold)
    check_threads(threads)
    check_callable(progress)
    image, contrast = _prepare(img, contrast, volume)
    seg = Segmenter(contrast, centerline_model=centerline_model, cord_model=model, threads=threads, conus=conus)
    return seg._cord(image, contrast, soft, threshold, centerline, progress)


@typed_errors
def segment_lesions(img, contrast=None, soft=False, *, threshold=None, min_contrast=None, model=None,
                    centerline_model=None, cord_model=None, centerline=None, volume=None, progress=None,
                    threads=None, conus=True):
    """MS lesion mask (uint8) or probability map (float32) in the cord, on the input grid (centerline: as
    for segment_cord).

    The mask keeps only lesions that touch the cord and are bright enough, as the lesion model says (the
    shipped one: against the same places of the cord on the slices above and below,
    cordseg.lesions.local_contrasts, with a bar the scan sets itself, cordseg.lesions.null_contrasts; others:
    the median of the lesion-free cord on their slices). min_contrast None: the model's screening; a number:
    that one bar for every lesion; 0: no screening, every voxel at the threshold. The cord is segmented with
    `cord_model` (default: the installed cord model for the contrast) along the same centerline. The soft map is the
    network's output, unscreened. threads, conus: as for detect_centerline."""
    check_min_contrast(min_contrast)
    check_threshold(threshold)
    check_threads(threads)
    check_callable(progress)
    image, contrast = _prepare(img, contrast, volume)
    seg = Segmenter(contrast, centerline_model=centerline_model, cord_model=cord_model, lesion_model=model,
                    threads=threads, conus=conus)
    return seg._lesions(image, contrast, soft, threshold, min_contrast, centerline, progress)


@typed_errors
def lesion_table(mask, **kwargs):
    """One cordseg.lesions.Lesion per connected lesion of `mask` (a path or a nibabel image); keyword arguments
    as cordseg.lesions.lesion_table takes them."""
    import nibabel as nib

    if not isinstance(mask, nib.spatialimages.SpatialImage):
        mask = load_image(mask)
    return _lesion_table(mask, **kwargs)


__all__ = ["detect_centerline", "centerline_from_mask", "segment_cord", "segment_lesions", "lesion_table",
           "guess_contrast", "Segmenter", "CordsegError"]
