"""Training samples cut from real labelled volumes, with the paper's augmentation.

Shifts (±10 voxels of the patch centre around the cord), left-right flips, rotations (±20° in-plane, ±10°
tilt), elastic deformation (coefficient 100, σ 16 voxels, as in Gros et al.), and for lesions random local
erosion or dilation of the lesion edges. Volumes are read once, put in the runtime's working space (RPI) and
resampled to the model's grid, so a real sample looks exactly like what the runtime feeds the network.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from cordseg.io import load_image
from cordseg.orientation import to_rpi
from cordseg.resampling import resample


class RealVolume:
    """One labelled volume on a model's grid: image, cord mask, lesion mask (float32, RPI)."""

    def __init__(self, item, grid):
        rpi = to_rpi(load_image(item.image))
        target = tuple(rpi.zooms[i] if g is None else g for i, g in enumerate(grid))
        self.image = resample(rpi.data, rpi.zooms, target, order=1)

        def mask(path):
            if path is None:
                return np.zeros(self.image.shape, np.float32)
            m = to_rpi(load_image(path)).data
            return (resample(m, rpi.zooms, target, order=1) >= 0.5).astype(np.float32)

        self.cord, self.lesion = mask(item.cord), mask(item.lesion)
        self.contrast = item.contrast
        self.cord_slices = np.nonzero(self.cord.any(axis=(0, 1)))[0]


def elastic_field(rng, shape, alpha=100.0, sigma=16.0):
    """Displacements (voxels) of Simard-style elastic deformation: smoothed uniform noise times alpha."""
    coarse = tuple(max(2, int(np.ceil(s / (sigma / 2)))) for s in shape)
    fields = []
    for _ in range(len(shape)):
        noise = rng.uniform(-1, 1, coarse)
        noise = ndi.zoom(noise, [s / c for s, c in zip(shape, coarse)], order=1)[tuple(slice(0, s) for s in shape)]
        # smoothing at scale sigma reduces the variance by about sigma^dims; rescale as Simard's formulation does
        fields.append(ndi.gaussian_filter(noise, sigma / 4) * alpha / sigma)
    return fields


def _warp(arrays, rng, shape, centre, *, max_rot=20.0, max_tilt=10.0, elastic=True):
    """Sample `arrays` on a rotated, elastically deformed grid of `shape` around `centre`."""
    ndim = len(shape)
    grid = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    a = np.deg2rad(rng.uniform(-max_rot, max_rot))
    x, y = grid[0] * np.cos(a) - grid[1] * np.sin(a), grid[0] * np.sin(a) + grid[1] * np.cos(a)
    coords = [x, y] + ([grid[2]] if ndim == 3 else [])
    if ndim == 3 and max_tilt:
        t = np.deg2rad(rng.uniform(-max_tilt, max_tilt))
        c, s = np.cos(t), np.sin(t)
        coords[1], coords[2] = coords[1] * c - coords[2] * s, coords[1] * s + coords[2] * c
    if elastic:
        for c, d in zip(coords, elastic_field(rng, shape)):
            c += d
    coords = [c + ctr for c, ctr in zip(coords, centre)]
    return [ndi.map_coordinates(arr, coords, order=1, mode="nearest") for arr in arrays]


def jitter_lesion_edges(lesion, rng):
    """Random local erosion or dilation of the lesion borders (the manual outline is uncertain there)."""
    if not lesion.any():
        return lesion
    m = lesion > 0.5
    op = ndi.binary_dilation if rng.random() < 0.5 else ndi.binary_erosion
    changed = op(m)
    local = ndi.gaussian_filter(rng.random(m.shape), 2.0) > 0.5  # apply it only in random regions
    out = np.where(local, changed, m)
    return out.astype(np.float32) if out.any() else m.astype(np.float32)


def real_patch(vol: RealVolume, rng, shape, *, lesions=False, shift=10):
    """(image, target) patch of `shape` from `vol`, centred on the cord (shifted ±`shift` voxels)."""
    if len(vol.cord_slices):
        z = int(rng.choice(vol.cord_slices))
        xs, ys = np.nonzero(vol.cord[:, :, z])
        cx, cy = xs.mean(), ys.mean()
    else:
        z = int(rng.integers(vol.image.shape[2]))
        cx, cy = vol.image.shape[0] / 2, vol.image.shape[1] / 2
    cx += rng.uniform(-shift, shift)
    cy += rng.uniform(-shift, shift)
    target_src = vol.lesion if lesions else vol.cord
    if len(shape) == 2:
        img, tgt = _warp([vol.image[:, :, z], target_src[:, :, z]], rng, shape, (cx, cy), max_tilt=0.0)
    else:
        img, tgt = _warp([vol.image, target_src], rng, shape, (cx, cy, z + rng.uniform(-shift, shift)))
    if rng.random() < 0.5:
        img, tgt = img[::-1], tgt[::-1]
    tgt = (tgt >= 0.5).astype(np.float32)
    if lesions and rng.random() < 0.5:
        tgt = jitter_lesion_edges(tgt, rng)
    return np.ascontiguousarray(img, np.float32), np.ascontiguousarray(tgt, np.float32)
