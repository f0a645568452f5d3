"""Intensity normalisation, shared by the runtime and the training code so both see identical inputs.

The model file's metadata names the scheme; these functions implement each name.
"""
from __future__ import annotations

import numpy as np

from .errors import ModelError

# Spreads are compared with the values' own magnitude, never with a fixed number: an image in m²/s (1e-9) or
# in raw counts (1e6) must be treated alike. Below this fraction of the magnitude, a spread is float32 noise.
_RELATIVE_EPS = 1e-5


def _spread_or_one(spread, *magnitudes):
    """`spread` where it is meaningful relative to `magnitudes` (arrays broadcast), else 1.0."""
    spread = np.asarray(spread, np.float64)
    scale = np.max(np.abs(np.stack(np.broadcast_arrays(*magnitudes))), axis=0)
    ok = (spread > 0) & (spread > _RELATIVE_EPS * scale) & np.isfinite(spread)
    return np.where(ok, spread, 1.0)


def percentile_slices(volume: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Per axial slice (last axis): map the `low`..`high` percentiles to 0..1 (not clipped).

    Per slice rather than per volume because slices of thick-slice scans differ in coil sensitivity, and
    a full-field slice and a cropped one then look alike to CNN1.
    """
    v = np.asarray(volume, np.float32)
    flat = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v[:, None]
    lo, hi = np.percentile(flat, [low, high], axis=0)
    scale = _spread_or_one(hi - lo, lo, hi)
    return ((v - lo) / scale).astype(np.float32)


def zscore_stack(patches: np.ndarray) -> np.ndarray:
    """Z-score over all stacked patches together, after clipping to their 0.5..99.5th percentiles, as CNN2
    expects."""
    v = np.asarray(patches, np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    c = np.clip(v, lo, hi)
    mean = float(c.mean(dtype=np.float64))
    std = float(_spread_or_one(c.std(dtype=np.float64), lo, hi))
    return ((c - mean) / std).astype(np.float32)


SCHEMES = {"percentile_slices": percentile_slices, "zscore_stack": zscore_stack}


def normalize(name: str, data: np.ndarray) -> np.ndarray:
    try:
        fn = SCHEMES[name]
    except KeyError:
        raise ModelError(f"unknown normalisation '{name}' in model metadata (known: {', '.join(SCHEMES)})") from None
    return fn(data)


# ----------------------------------------------------------------------------------------------------
# Schemes of the published models (Gros et al. 2019, Spinal Cord Toolbox), for models brought in with
# `cordseg import-keras`. Their constants travel in the model file (cordseg_normalisation_params), so
# these schemes take `params`; use `normalize_with(name, data, params)` to apply any scheme.

def _params(params, n: int | None, name: str) -> tuple:
    if params is None:
        raise ModelError(f"normalisation '{name}' needs parameters (cordseg_normalisation_params) in the model")
    if isinstance(params, str):
        try:
            params = [float(p) for p in params.split(",") if p.strip()]
        except ValueError:
            raise ModelError(f"normalisation '{name}': parameters '{params}' are not numbers") from None
    values = tuple(float(p) for p in params)
    if (n is not None and len(values) != n) or not all(np.isfinite(values)):
        raise ModelError(f"normalisation '{name}' expects {n} finite parameters, got {len(values)}")
    return values


def published_ctr(volume: np.ndarray, params=None) -> np.ndarray:
    """Published CNN1 input: params "mean,std".

    The whole volume's 2nd..98th percentiles are mapped to 0..255 with values outside clipped (what
    skimage's rescale_intensity does), then z-scored with the training set's mean and std:
        y = (clip((v - p2) / (p98 - p2), 0, 1) * 255 - mean) / std
    Percentiles are over everything passed in: give it the whole volume at the model's grid.
    """
    mean, std = _params(params, 2, "published_ctr")
    v = np.asarray(volume, np.float32)
    p2, p98 = np.percentile(v, [2.0, 98.0])
    scaled = np.clip((v - p2) / (p98 - p2), 0.0, 1.0) * 255.0 if p98 > p2 else np.zeros_like(v)
    return ((scaled - mean) / (std if std != 0 else 1.0)).astype(np.float32)


HISTOGRAM_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)


def _saturating_tail(x, x_join, y_join, slope, limit):
    """Exponential through (x_join, y_join) with `slope` there, tending to `limit` away from x_join."""
    omega = y_join - limit
    if abs(omega) < 1e-12 or slope == 0:
        return np.full_like(x, limit)
    return limit + omega * np.exp(slope * (x - x_join) / omega)


def histogram_standardise(values: np.ndarray, landmarks) -> np.ndarray:
    """Piecewise-linear histogram standardisation (Nyul & Udupa) as the published lesion tool does it.

    The data's percentiles 1, 10, 20, ..., 90, 99 are mapped linearly, segment by segment, onto the 11
    `landmarks`. Beyond the 1st and 99th percentiles the map continues as an exponential that saturates
    at the outer landmark: below, one that joins the 10th-percentile landmark with the slope of the
    1..10 segment and tends to landmarks[0]; above, one that joins the 90th-percentile landmark with the
    slope of the 80..90 segment and tends to landmarks[-1]. Percentiles are over everything passed in.
    """
    y = np.asarray(landmarks, np.float64)
    if y.shape != (len(HISTOGRAM_PERCENTILES),):
        raise ModelError(f"histogram standardisation needs {len(HISTOGRAM_PERCENTILES)} landmarks, got {y.size}")
    v = np.asarray(values, np.float64)
    x = np.percentile(v, HISTOGRAM_PERCENTILES)
    # Ties (e.g. a large zero background) would make segments of zero width: keep x strictly increasing.
    span = float(x[-1] - x[0])
    eps = 1e-6 * (span if span > 0 else max(float(np.abs(x).max()), np.finfo(np.float64).tiny))
    x = x + eps * np.arange(len(x))
    out = np.interp(v, x, y)
    below, above = v < x[0], v > x[-1]
    if below.any():
        slope = (y[1] - y[0]) / (x[1] - x[0])
        out[below] = _saturating_tail(v[below], x[1], y[1], slope, y[0])
    if above.any():
        slope = (y[-2] - y[-3]) / (x[-2] - x[-3])
        out[above] = _saturating_tail(v[above], x[-2], y[-2], slope, y[-1])
    return out.astype(np.float32)


def published_lesion(volume: np.ndarray, params=None) -> np.ndarray:
    """Published CNN2-lesion input: params = 11 landmarks, then mean, std.

    y = (histogram_standardise(v, landmarks) - mean) / std. The published tool standardises the 48-voxel
    wide crop around the centerline at native resolution, then resamples to 0.5 mm; give this the stacked
    patches around the cord (or that crop) so the percentiles describe the same tissue mix.
    """
    p = _params(params, len(HISTOGRAM_PERCENTILES) + 2, "published_lesion")
    mean, std = p[-2], p[-1]
    return ((histogram_standardise(volume, p[:-2]) - mean) / (std if std != 0 else 1.0)).astype(np.float32)


SCHEMES.update({"published_ctr": published_ctr, "published_lesion": published_lesion})
PARAMETRISED = frozenset({"published_ctr", "published_lesion"})


def normalize_with(name: str, data: np.ndarray, params=None) -> np.ndarray:
    """Apply scheme `name`, passing `params` (a "a,b,c" string or numbers) to schemes that take them."""
    if name not in SCHEMES:
        return normalize(name, data)  # raises the usual ModelError
    fn = SCHEMES[name]
    if name in PARAMETRISED:
        return fn(data, params)
    return fn(data)


# ----------------------------------------------------------------------------------------------------
# Extra input channels of CNN2 (metadata cordseg_channels). "image" is the normalised patch itself; the
# others are computed from the raw patch and where the cord runs through it, identically at training and at
# run time.

ANOMALY_GAIN = 5.0  # a lesion 1.2x the cord at its place reads +1
ANOMALY_LIMIT = 5.0
_LEVEL_RADIUS_MM = 2.5  # the cord's brightness on a slice: median inside this radius of the centerline
_LEVEL_SMOOTH_SLICES = 9  # ... then a running median along the cord, so a lesion does not set its own level


def cord_anomaly(patch: np.ndarray, centres: np.ndarray, zooms=(0.5, 0.5, 1.0)) -> np.ndarray:
    """How much brighter each voxel is than the same place in the cord on the patch's other slices, as a
    share of the cord's brightness (x ANOMALY_GAIN, clipped).

    `patch` (X, Y, Z) raw intensities; `centres` (Z, 2) the centerline in the patch's voxel coordinates.
    The patch is straightened along the centerline, each slice divided by the cord's level on it, and each
    in-plane position compared with its median along the cord. Grey matter and coil shading are the same
    from slice to slice and cancel; a lesion is a few millimetres to centimetres long and stands out. This is
    what the lesion network's zscore input leaves it to work out over its 30-40 voxel receptive field."""
    from scipy import ndimage as ndi

    v = np.asarray(patch, np.float32)
    nx, ny, nz = v.shape
    c = np.asarray(centres, np.float64).reshape(nz, 2)
    mid = np.median(c, axis=0)
    # whole-voxel shifts: at 0.5 mm a half-voxel misplacement is below what the median along the cord sees
    shift = np.rint(c - mid).astype(int)
    ix = np.clip(np.arange(nx)[:, None] + shift[None, :, 0], 0, nx - 1)  # (X, Z)
    iy = np.clip(np.arange(ny)[:, None] + shift[None, :, 1], 0, ny - 1)  # (Y, Z)
    iz = np.arange(nz)
    straight = v[ix[:, None, :], iy[None, :, :], iz[None, None, :]]
    base = float(np.percentile(v, 1.0))
    straight = straight - base
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    disk = ((gx - mid[0]) * zooms[0]) ** 2 + ((gy - mid[1]) * zooms[1]) ** 2 <= _LEVEL_RADIUS_MM ** 2
    if not disk.any():
        disk[int(np.clip(round(mid[0]), 0, nx - 1)), int(np.clip(round(mid[1]), 0, ny - 1))] = True
    level = np.median(straight[disk], axis=0)
    level = ndi.median_filter(level, size=min(_LEVEL_SMOOTH_SLICES, nz), mode="nearest")
    scale = float(np.percentile(np.abs(straight), 99.0))
    level = np.maximum(level, 0.05 * scale if scale > 0 else 1.0)
    ratio = straight / level[None, None, :]
    anomaly = ratio - np.median(ratio, axis=2, keepdims=True)
    # back to the patch's own positions (where a shift ran off the patch's side, the nearest column answers)
    jx = np.clip(np.arange(nx)[:, None] - shift[None, :, 0], 0, nx - 1)
    jy = np.clip(np.arange(ny)[:, None] - shift[None, :, 1], 0, ny - 1)
    back = anomaly[jx[:, None, :], jy[None, :, :], iz[None, None, :]]
    return np.clip(back * ANOMALY_GAIN, -ANOMALY_LIMIT, ANOMALY_LIMIT).astype(np.float32)


CHANNELS = ("image", "cord_anomaly")


def network_input(scheme: str, patches: np.ndarray, params=None, *, channels=("image",), centres=None,
                  zooms=(0.5, 0.5, 1.0)) -> np.ndarray:
    """CNN2's input for raw `patches` (N, X, Y, Z): the normalised patches, and with more `channels` than
    "image" a last axis holding each (centres: (N, Z, 2), the centerline in each patch's voxels)."""
    image = normalize_with(scheme, patches, params)
    if tuple(channels) == ("image",):
        return image
    if centres is None:
        raise ModelError(f"channels {','.join(channels)} need the centerline through each patch")
    out = [image]
    for name in channels[1:]:
        if name != "cord_anomaly":
            raise ModelError(f"unknown input channel '{name}' (known: {', '.join(CHANNELS)})")
        out.append(np.stack([cord_anomaly(p, c, zooms) for p, c in zip(patches, centres)]))
    return np.stack(out, axis=-1).astype(np.float32)


def centres_from_mask(mask: np.ndarray) -> np.ndarray:
    """(Z, 2) centroid of `mask` (X, Y, Z) on each slice; slices without it take the nearest ones' values
    (linear between, constant beyond), and the patch's middle where the mask is empty throughout."""
    m = np.asarray(mask) > 0.5
    nx, ny, nz = m.shape
    has = m.any(axis=(0, 1))
    if not has.any():
        return np.tile([(nx - 1) / 2.0, (ny - 1) / 2.0], (nz, 1))
    zs = np.nonzero(has)[0]
    cxy = np.array([[idx.mean() for idx in np.nonzero(m[:, :, z])] for z in zs])
    allz = np.arange(nz)
    return np.stack([np.interp(allz, zs, cxy[:, 0]), np.interp(allz, zs, cxy[:, 1])], axis=1)
