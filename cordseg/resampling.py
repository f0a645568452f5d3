"""Extent-preserving resampling, one axis at a time.

A grid of n voxels of size z covers [-0.5, n - 0.5] in voxel units. Resampling
keeps that extent: the new shape is max(1, round(n * z / new_z)) (halves round
up) and new voxel j sits at old coordinate (j + 0.5) * n / n_new - 0.5, clamped
to [0, n - 1] (edges repeat, nothing is extrapolated). The new voxel size is
therefore exactly extent / n_new, which may differ slightly from the one asked
(`resampled_zooms` gives it).

Interpolation is separable, so each axis is done on its own with (order + 1)
taps instead of (order + 1)^3: order 0 (nearest, dtype kept, for masks), 1
(linear) and 3 (cubic B-spline, prefiltered with scipy.ndimage.spline_filter1d).
A size-1 axis stays size 1 unless asked otherwise.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "resample",
    "resample_to_shape",
    "resampled_shape",
    "resampled_zooms",
    "resampled_affine",
]

# Edge padding before the cubic prefilter: the boundary condition's influence
# decays as 0.268^k, so 12 voxels put it below float32 precision.
_SPLINE_PAD = 12


def resampled_shape(shape, zooms, new_zooms) -> tuple:
    """Shape of the extent-preserving grid with voxel size close to `new_zooms`."""
    shape, zooms, new_zooms = _triplets(shape, zooms, new_zooms)
    out = []
    for n, z, nz in zip(shape, zooms, new_zooms):
        if not (z > 0 and nz > 0 and math.isfinite(z) and math.isfinite(nz)):
            raise ValueError(f"voxel sizes must be positive and finite, got {z} -> {nz}")
        # Round half up (not Python's half-to-even); the tiny epsilon keeps
        # products such as 45 * 4.98 / 0.5 from falling just below the half.
        out.append(max(1, int(math.floor(n * z / nz + 0.5 + 1e-9))))
    return tuple(out)


def resampled_zooms(shape, zooms, new_zooms) -> tuple:
    """Exact voxel sizes of the resampled grid: extent / new shape."""
    shape, zooms, new_zooms = _triplets(shape, zooms, new_zooms)
    new_shape = resampled_shape(shape, zooms, new_zooms)
    return tuple(float(n * z / m) for n, z, m in zip(shape, zooms, new_shape))


def resampled_affine(affine, shape, new_shape) -> np.ndarray:
    """Affine of the grid `new_shape` covering the same extent as (`affine`, `shape`)."""
    affine = np.asarray(affine, dtype=float)
    ratio = np.array([n / m for n, m in zip(shape[:3], new_shape[:3])], dtype=float)
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = 0.5 * ratio - 0.5
    return affine @ step


def resample(data, zooms, new_zooms, *, order: int = 1) -> np.ndarray:
    """Resample the first len(zooms) axes of `data` from voxel size `zooms` to about `new_zooms`.

    order 0 keeps the dtype; orders 1 and 3 return float32 (float64 input stays float64).
    """
    data = np.asanyarray(data)
    k = len(zooms)
    if len(new_zooms) != k or data.ndim < k:
        raise ValueError(f"zooms {tuple(zooms)} / {tuple(new_zooms)} do not fit data of shape {data.shape}")
    new_shape = resampled_shape(data.shape[:k], zooms, new_zooms)
    return _resample_axes(data, new_shape, order)


def resample_to_shape(data, zooms, shape, *, order: int = 1) -> np.ndarray:
    """The inverse of `resample`: onto the grid of `shape` covering the same extent as `data`.

    `zooms` (data's voxel sizes) documents the grid; the mapping depends only
    on the shape ratio because both grids cover the same extent.
    """
    data = np.asanyarray(data)
    shape = tuple(int(n) for n in shape)
    k = len(shape)
    if data.ndim < k or (zooms is not None and len(zooms) != k):
        raise ValueError(f"shape {shape} / zooms {zooms} do not fit data of shape {data.shape}")
    if any(n < 1 for n in shape):
        raise ValueError(f"target shape must be positive, got {shape}")
    return _resample_axes(data, shape, order)


# --------------------------------------------------------------------------- internals


def _triplets(shape, zooms, new_zooms):
    shape = tuple(int(n) for n in shape)
    zooms = tuple(float(z) for z in zooms)
    new_zooms = tuple(float(z) for z in new_zooms)
    if not (len(shape) == len(zooms) == len(new_zooms)):
        raise ValueError(f"shape {shape}, zooms {zooms} and new zooms {new_zooms} differ in length")
    return shape, zooms, new_zooms


def _coords(n_old: int, n_new: int) -> np.ndarray:
    j = np.arange(n_new, dtype=np.float64)
    x = (j + 0.5) * (n_old / n_new) - 0.5
    return np.clip(x, 0.0, n_old - 1)


def _resample_axes(data: np.ndarray, new_shape: tuple, order: int) -> np.ndarray:
    if order not in (0, 1, 3):
        raise ValueError(f"interpolation order must be 0, 1 or 3, not {order}")
    out = data
    if order:
        ftype = np.float64 if data.dtype == np.float64 else np.float32
        out = np.asarray(out, dtype=ftype)
    # Shrinking axes first keeps the intermediate arrays small.
    axes = [a for a in range(len(new_shape)) if new_shape[a] != data.shape[a]]
    axes.sort(key=lambda a: new_shape[a] / data.shape[a])
    for axis in axes:
        out = _resample_axis(out, axis, new_shape[axis], order)
    if out is data:
        out = data.copy()
    return np.ascontiguousarray(out)


def _bcast(w: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return w.reshape(shape)


def _resample_axis(a: np.ndarray, axis: int, n_new: int, order: int) -> np.ndarray:
    n_old = a.shape[axis]
    x = _coords(n_old, n_new)
    if order == 0:
        idx = np.minimum(np.floor(x + 0.5).astype(np.intp), n_old - 1)
        return np.take(a, idx, axis=axis)
    if n_old == 1:
        return np.repeat(a, n_new, axis=axis)
    dt = a.dtype
    if order == 1:
        i0 = np.minimum(np.floor(x).astype(np.intp), n_old - 2)
        t = (x - i0).astype(dt)
        lo = np.take(a, i0, axis=axis)
        hi = np.take(a, i0 + 1, axis=axis)
        hi -= lo
        hi *= _bcast(t, a.ndim, axis)
        lo += hi
        return lo
    # Cubic B-spline: pad with edge values (the "nearest" extension), get the
    # spline coefficients along this axis only, evaluate with 4 taps.
    pad = [(0, 0)] * a.ndim
    pad[axis] = (_SPLINE_PAD, _SPLINE_PAD)
    coef = ndimage.spline_filter1d(np.pad(a, pad, mode="edge"), order=3, axis=axis, output=dt, mode="mirror")
    xp = x + _SPLINE_PAD
    i = np.floor(xp).astype(np.intp)
    t = xp - i
    w = (
        (1 - t) ** 3 / 6,
        (3 * t**3 - 6 * t**2 + 4) / 6,
        (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
        t**3 / 6,
    )
    out = None
    for k, wk in enumerate(w):
        term = np.take(coef, i - 1 + k, axis=axis)
        term *= _bcast(wk.astype(dt), a.ndim, axis)
        if out is None:
            out = term
        else:
            out += term
    return out
