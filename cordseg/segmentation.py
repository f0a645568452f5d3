"""CNN2 along the centerline: crop, resample to the model's grid, patches, blend, back to the input grid.

Only a box around the centerline is resampled (the cord is a thin structure in a large field of view), and
the soft map is brought back to that box's native voxels by the exact inverse resampling, then thresholded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .centerline import Centerline, model_grid
from .errors import ModelError
from .inference import Model, release_memory
from .normalization import network_input
from .resampling import resample, resample_to_shape, resampled_zooms
from .stages import timed

PATCH_BATCH = 1  # one patch per network call: its activations (tens of MB each) bound the peak memory
SLICE_LEVEL_TOLERANCE = 1.25  # level_slices leaves slices within this factor of the box's median alone
SLICE_LEVEL_MAX_GAIN = 10.0  # and scales none by more than this


@dataclass
class Box:
    lo: tuple
    hi: tuple

    @property
    def slices(self):
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))


def cord_box(cl: Centerline, patch_mm, shape) -> Box:
    """RPI voxel box holding every patch placed along the centerline (plus a margin)."""
    zooms = cl.rpi.zooms
    half = [0.5 * p / z + 2 for p, z in zip(patch_mm, zooms)]
    lo = [np.floor(cl.x.min() - half[0]), np.floor(cl.y.min() - half[1]), np.floor(cl.z.min() - half[2] / 2)]
    hi = [np.ceil(cl.x.max() + half[0]) + 1, np.ceil(cl.y.max() + half[1]) + 1, np.ceil(cl.z.max() + half[2] / 2) + 1]
    lo = tuple(int(max(0, v)) for v in lo)
    hi = tuple(int(min(n, v)) for v, n in zip(hi, shape))
    return Box(lo, hi)


def _patch_centres(z_first, z_last, depth):
    """Patch centre slices (model grid) so that patches overlap by half along the cord."""
    step = max(1, depth // 2)
    if z_last - z_first + 1 <= depth:
        return [0.5 * (z_first + z_last)]
    centres = list(np.arange(z_first + depth / 2 - 0.5, z_last - depth / 2 + 0.5, step))
    if centres[-1] < z_last - depth / 2 + 0.5:
        centres.append(z_last - depth / 2 + 0.5)
    return centres


def _blend_weights(shape):
    """Separable tent weights: a patch's centre counts more than its borders."""
    w = [1.0 - np.abs(np.linspace(-1, 1, n)) * 0.9 for n in shape]
    return (w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]).astype(np.float32)


def _overlap(corner, shape, vol_shape):
    """The part of a patch inside the volume: (volume slices, patch slices)."""
    src = [slice(max(0, c), min(n, c + s)) for c, s, n in zip(corner, shape, vol_shape)]
    dst = [slice(a.start - c, a.stop - c) for a, c in zip(src, corner)]
    return src, dst


def extract_patch(vol, corner, shape):
    """Patch at `corner`; outside the volume the edge voxels repeat (the cord runs on, as it does in training,
    instead of meeting a blank wall at the field of view's end)."""
    idx = [np.clip(np.arange(c, c + s), 0, n - 1) for c, s, n in zip(corner, shape, vol.shape)]
    return vol[np.ix_(*idx)]


def level_slices(crop: np.ndarray) -> np.ndarray:
    """Each axial slice of the box around the cord scaled so that its median matches the box's.

    2D multi-slice scans change brightness from slice to slice, most of all where the receive coil's reach
    ends (full-field neck scans: the end slices 3-8x darker than the middle). CNN2 normalises its patches
    together, so a dark slice reached it as dark tissue and the cord there went unmarked; CNN1 levels its
    slices itself. The median of a box a few centimetres wide follows the coil, not the cord's contents."""
    # brightness above the box's darkest voxels, so that images stored with an offset or z-scored (negative
    # values) are levelled by their contrast, not by how far their median sits from zero
    base = float(np.percentile(crop, 1.0))
    med = np.median(crop.reshape(-1, crop.shape[2]), axis=0) - base
    ok = med > 0
    if not ok.any():
        return crop
    log_gain = np.where(ok, np.log(np.median(med[ok]) / np.where(ok, med, 1.0)), 0.0)
    # within +-25% a slice is left as it is: such differences are anatomy as often as coil, and training
    # covered them (smooth bias fields); beyond 10x it is a nearly empty slice, not shading
    log_gain = np.sign(log_gain) * np.maximum(np.abs(log_gain) - np.log(SLICE_LEVEL_TOLERANCE), 0.0)
    log_gain = np.clip(log_gain, -np.log(SLICE_LEVEL_MAX_GAIN), np.log(SLICE_LEVEL_MAX_GAIN))
    return (base + (crop - base) * np.exp(log_gain)).astype(np.float32)


def soft_segmentation(cl: Centerline, model: Model, progress=None, stage="segmentation", on_stage=None) -> np.ndarray:
    """Probability map on the RPI grid (zeros away from the cord). `stage` names it for `progress` and for
    the stage events of its parts (cordseg.stages): <stage>.resample, .normalise, .cnn2, .back."""
    if model.patch_shape is None or len(model.patch_shape) != 3:
        raise ModelError(f"{model.path.name}: segmentation models need a 3D patch shape")
    rpi = cl.rpi
    patch = model.patch_shape
    target = model_grid(rpi, model)
    box = cord_box(cl, [p * t for p, t in zip(patch, target)], rpi.shape)
    with timed(on_stage, f"{stage}.resample"):
        crop = level_slices(rpi.data[box.slices])
        vol = resample(crop, rpi.zooms, target, order=1)
        zooms = resampled_zooms(crop.shape, rpi.zooms, target)
    # centerline in crop-model coordinates
    scale = [r / m for r, m in zip(rpi.zooms, zooms)]

    def to_model(v, axis):
        return (v - box.lo[axis] + 0.5) * scale[axis] - 0.5

    zc_model = to_model(cl.z.astype(float), 2)
    xc_model, yc_model = to_model(cl.x, 0), to_model(cl.y, 1)
    centres = _patch_centres(max(0.0, zc_model.min()), min(vol.shape[2] - 1.0, zc_model.max()), patch[2])
    corners = []
    for zc in centres:
        x = np.interp(zc, zc_model, xc_model)
        y = np.interp(zc, zc_model, yc_model)
        corners.append(tuple(int(round(c - s / 2 + 0.5)) for c, s in zip((x, y, zc), patch)))
    patches = np.stack([extract_patch(vol, c, patch) for c in corners]).astype(np.float32, copy=False)
    centres = None
    if len(model.channels) > 1:  # where the centerline crosses each patch slice, in the patch's voxels
        centres = np.stack([np.stack([np.interp(c[2] + np.arange(patch[2]), zc_model, xc_model) - c[0],
                                      np.interp(c[2] + np.arange(patch[2]), zc_model, yc_model) - c[1]], axis=1)
                            for c in corners])
    with timed(on_stage, f"{stage}.normalise"):
        patches = network_input(model.normalisation, patches, model.normalisation_params, channels=model.channels,
                                centres=centres, zooms=target)
    probs = np.empty(patches.shape[:4], np.float32)
    with timed(on_stage, f"{stage}.cnn2"):
        for start in range(0, len(patches), PATCH_BATCH):
            probs[start:start + PATCH_BATCH] = model.predict(patches[start:start + PATCH_BATCH], flip_average=True)
            if progress:
                progress(stage, min(1.0, (start + PATCH_BATCH) / len(patches)))
    release_memory()
    acc = np.zeros(vol.shape, np.float32)
    wsum = np.zeros(vol.shape, np.float32)
    weights = _blend_weights(patch)
    for p, c in zip(probs, corners):
        src, dst = _overlap(c, patch, vol.shape)
        if all(a.stop > a.start for a in src):
            acc[tuple(src)] += p[tuple(dst)] * weights[tuple(dst)]
            wsum[tuple(src)] += weights[tuple(dst)]
    soft_crop = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
    with timed(on_stage, f"{stage}.back"):
        back = resample_to_shape(soft_crop, zooms, crop.shape, order=1)
    soft = np.zeros(rpi.shape, np.float32)
    soft[box.slices] = np.clip(back, 0.0, 1.0)
    # OptiC says where the cord starts and ends: no cord beyond (patches reach past the ends, and below
    # the conus CNN2 would take the nerve roots for cord)
    soft[:, :, :int(cl.z.min())] = 0.0
    soft[:, :, int(cl.z.max()) + 1:] = 0.0
    return soft


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The cord is one connected object: drop islands a patch may have produced away from it."""
    nz = np.nonzero(mask)  # labelled in the mask's bounding box only: the cord is a thin part of the volume
    if not nz[0].size:
        return mask
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
    labels, n = ndi.label(mask[box], structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    sizes = ndi.sum(mask[box], labels, index=np.arange(1, n + 1))
    out = np.zeros_like(mask)
    out[box] = (labels == 1 + int(np.argmax(sizes))).astype(mask.dtype)
    return out
