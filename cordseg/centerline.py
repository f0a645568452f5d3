"""Centerline detection: CNN1 heatmap on axial slices, a reward volume from it, OptiC's global optimum.

The reward is built on CNN1's own grid (1 mm in-plane for the shipped model): solving there is exact for
what the answer needs, and far cheaper than at 0.5 mm. Inside the predicted cord the reward grows with the
distance to the cord's edge (so the path runs through the middle); outside it is negative and falls with the
Euclidean distance to the nearest predicted cord voxel (so gaps are bridged towards the cord, and slices
without cord are left out when their cost outweighs what they add). Rewards are per mm of cord length, so
thick and thin slices weigh alike; OptiC's penalty is per mm of displacement squared over slice thickness.

CNN1 runs twice: on whole slices, then on a window around the first curve on every slice (SECOND_LOOK_MM),
and OptiC's path through the second heatmap is the answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.affines import apply_affine
from scipy import ndimage as ndi

from .contract import CENTERLINE_SLICE_MM, SECOND_LOOK_MM  # noqa: F401 (defaults, kept importable here)
from .errors import InputError, ModelError, NoCordError
from .inference import Model
from .normalization import normalize_with
from .optic import optimal_path
from .orientation import Reoriented
from .resampling import resample, resampled_zooms
from .stages import timed

DEFAULT_SMOOTHNESS = 1.0  # OptiC's lambda, per mm^2 of displacement over mm of slice thickness
SLICE_BATCH = 8
BATCH_PIXELS = 8 * 256 * 256  # at most this many pixels per CNN1 call (about 0.4 GB of activations)
# Two per-model settings live in the model contract (cordseg.contract), with these defaults:
# CENTERLINE_SLICE_MM: CNN1 need not see every thin slice: the centerline is smooth along z, so slices thinner
# than this are resampled to it for the heatmap (a 1 mm sagittal volume: half the CNN1 work), and the
# centerline is interpolated back onto every input slice.
# SECOND_LOOK_MM: CNN1 normalises each slice by its own intensity percentiles, and learnt on 96 mm crops of
# synthetic anatomy. On a full-field slice (a whole neck, 23 cm) those percentiles are set by fat and air far
# from the cord, and real anatomy offers look-alikes the crops never had: the cord drops out of some slices.
# A second look through a window this wide around the first pass's curve finds it again (measurements: CNN1
# card).


@dataclass
class Centerline:
    """One cord centre per axial slice of the RPI grid, for slices z_start..z_stop."""

    z: np.ndarray  # int RPI slice indices
    x: np.ndarray  # float RPI voxel coordinates
    y: np.ndarray
    rpi: Reoriented

    @property
    def rpi_points(self) -> np.ndarray:
        return np.column_stack([self.x, self.y, self.z.astype(float)])

    def native_points(self) -> np.ndarray:
        """(n, 3) voxel coordinates on the input image's own grid."""
        return self.rpi.points_to_native(self.rpi_points)

    def scanner_mm(self) -> np.ndarray:
        pts = self.rpi_points
        return pts @ self.rpi.affine[:3, :3].T + self.rpi.affine[:3, 3]

    def native_mask(self) -> np.ndarray:
        """uint8 mask on the input grid with one voxel per cord slice."""
        mask = np.zeros(self.rpi.shape, np.uint8)
        xi = np.clip(np.rint(self.x).astype(int), 0, self.rpi.shape[0] - 1)
        yi = np.clip(np.rint(self.y).astype(int), 0, self.rpi.shape[1] - 1)
        mask[xi, yi, self.z] = 1
        return self.rpi.to_native(mask)

    def at(self, z_rpi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) at any RPI slice position, clamped at the ends."""
        return np.interp(z_rpi, self.z, self.x), np.interp(z_rpi, self.z, self.y)


def model_grid(rpi: Reoriented, model: Model, min_slice_mm: float = 0.0) -> tuple:
    """Target zooms for a model: its voxel size, the input's where the metadata says 'native' (along z no
    thinner than `min_slice_mm`)."""
    zooms = [rpi.zooms[i] if v is None else v for i, v in enumerate(model.voxel_size)]
    if model.voxel_size[2] is None:
        zooms[2] = max(zooms[2], min_slice_mm)
    return tuple(zooms)


def _model_volume(rpi: Reoriented, model: Model) -> tuple[np.ndarray, tuple]:
    """The image on CNN1's grid (not normalised) and that grid's exact zooms."""
    if model.patch_shape is not None:
        raise ModelError(f"{model.path.name}: centerline models must be fully convolutional (patch 'slice')")
    target = model_grid(rpi, model, model.contract.centerline_slice_mm)
    return resample(rpi.data, rpi.zooms, target, order=1), resampled_zooms(rpi.shape, rpi.zooms, target)


def _predict_slices(slices: np.ndarray, model: Model, progress, span) -> np.ndarray:
    """CNN1 on (n, nx, ny) normalised slices, padded to the model's size multiple; progress over `span`."""
    m = max(1, model.size_multiple)
    n, nx, ny = slices.shape
    padded = np.pad(slices, ((0, 0), (0, (-nx) % m), (0, (-ny) % m)), mode="edge")
    heat = np.empty((n, nx, ny), np.float32)
    batch = max(1, min(SLICE_BATCH, BATCH_PIXELS // padded[0].size))  # the network's memory grows with pixels
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        heat[start:stop] = model.predict(padded[start:stop], flip_average=True)[:, :nx, :ny]
        if progress:
            progress("centerline", span[0] + (span[1] - span[0]) * stop / n)
    return heat


def _whole_slices(vol: np.ndarray, model: Model, progress, span) -> np.ndarray:
    """CNN1 on every whole slice of `vol` (the image on CNN1's grid)."""
    vol = normalize_with(model.normalisation, vol, model.normalisation_params)
    return np.moveaxis(_predict_slices(np.moveaxis(vol, 2, 0), model, progress, span), 0, 2)


def _windows(vol: np.ndarray, zooms, rpi: Reoriented, model: Model, around: "Centerline", window_mm: float,
             progress, span) -> np.ndarray:
    """CNN1 on a `window_mm` square of every slice of `vol`, centred on `around`; zero elsewhere."""
    nx, ny, nz = vol.shape
    m = max(1, model.size_multiple)
    size = [min(n, int(np.ceil(window_mm / z / m)) * m) for n, z in zip((nx, ny), zooms[:2])]
    z_rpi = (np.arange(nz) + 0.5) * zooms[2] / rpi.zooms[2] - 0.5
    centre = [(c + 0.5) * r / z - 0.5 for c, r, z in zip(around.at(z_rpi), rpi.zooms[:2], zooms[:2])]
    lo = [np.clip(np.rint(c - w / 2), 0, n - w).astype(int) for c, w, n in zip(centre, size, (nx, ny))]
    windows = np.stack([vol[lo[0][z]:lo[0][z] + size[0], lo[1][z]:lo[1][z] + size[1], z] for z in range(nz)])
    windows = np.moveaxis(normalize_with(model.normalisation, np.moveaxis(windows, 0, 2),
                                         model.normalisation_params), 2, 0)
    probs = _predict_slices(windows, model, progress, span)
    heat = np.zeros(vol.shape, np.float32)
    for z in range(nz):
        heat[lo[0][z]:lo[0][z] + size[0], lo[1][z]:lo[1][z] + size[1], z] = probs[z]
    return heat


def window_heatmap(rpi: Reoriented, model: Model, around: "Centerline", window_mm: float, progress=None,
                   span=(0.0, 1.0)) -> tuple[np.ndarray, tuple]:
    """CNN1 on a `window_mm` square of every slice, centred on `around` (its end points beyond its ends),
    each window normalised on its own; zero outside the windows; on CNN1's grid, with its zooms."""
    vol, zooms = _model_volume(rpi, model)
    return _windows(vol, zooms, rpi, model, around, window_mm, progress, span), zooms


def reward(heat: np.ndarray, zooms, threshold: float) -> np.ndarray:
    """Slice-major (nz, nx, ny) reward for OptiC (see module docstring)."""
    sx, sy, sz = zooms
    out = np.empty((heat.shape[2],) + heat.shape[:2], np.float32)
    for z in range(heat.shape[2]):
        cord = heat[:, :, z] >= threshold
        if cord.any():
            depth = ndi.distance_transform_edt(cord, sampling=(sx, sy))
            dist = ndi.distance_transform_edt(~cord, sampling=(sx, sy))
            r = np.where(cord, 0.5 + depth / 2.0, -0.5 - np.minimum(dist, 10.0) / 10.0)
        else:
            r = np.full(cord.shape, -1.5)
        out[z] = r * sz
    return out


def refine(heat: np.ndarray, threshold: float, xs, ys, zs) -> tuple[np.ndarray, np.ndarray]:
    """Sub-voxel centres: heat-weighted centroid of the predicted cord region the path runs through.

    Slices where the path crosses no predicted cord (signal gaps) take the centre interpolated from
    their neighbours along the path, so one bad slice does not pull the curve.
    """
    fx, fy = xs.astype(float), ys.astype(float)
    found = np.zeros(len(zs), bool)
    for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
        h = heat[:, :, z]
        if h[x, y] < threshold:
            continue
        labels, _ = ndi.label(h >= threshold)
        region = labels == labels[x, y]
        w = np.where(region, h, 0.0)
        gx, gy = np.nonzero(region)
        total = w[gx, gy].sum()
        fx[i], fy[i] = (w[gx, gy] * gx).sum() / total, (w[gx, gy] * gy).sum() / total
        found[i] = True
    if found.any() and not found.all():
        fx[~found] = np.interp(zs[~found], zs[found], fx[found])
        fy[~found] = np.interp(zs[~found], zs[found], fy[found])
    return fx, fy


def _trace(heat: np.ndarray, zooms, rpi: Reoriented, model: Model, smoothness: float) -> Centerline | None:
    """OptiC's path through a heatmap, as sub-voxel centres on every RPI slice it spans (None: no cord)."""
    if not (heat >= model.threshold).any():
        return None
    path = optimal_path(reward(heat, zooms, model.threshold), zooms, smoothness)
    if path is None:
        return None
    zs = path.z
    fx, fy = refine(heat, model.threshold, path.x, path.y, zs)
    # model grid -> RPI grid (extent-preserving voxel-centre mapping, as in resampling)
    scale = [z_m / z_r for z_m, z_r in zip(zooms, rpi.zooms)]
    x_r = (fx + 0.5) * scale[0] - 0.5
    y_r = (fy + 0.5) * scale[1] - 0.5
    z_r = (zs + 0.5) * scale[2] - 0.5
    z_lo, z_hi = int(np.ceil(z_r[0] - 0.5 * scale[2] + 1e-6)), int(np.floor(z_r[-1] + 0.5 * scale[2] - 1e-6))
    z_lo, z_hi = max(0, z_lo), min(rpi.shape[2] - 1, z_hi)
    z_int = np.arange(z_lo, z_hi + 1)
    if len(z_int) == 0:
        return None
    return Centerline(z_int, np.interp(z_int, z_r, x_r), np.interp(z_int, z_r, y_r), rpi)


_MODEL = object()  # detect's window_mm default: the model's own (contract's second_look_mm)


def detect(rpi: Reoriented, model: Model, *, smoothness: float = DEFAULT_SMOOTHNESS, progress=None,
           window_mm=_MODEL, on_stage=None) -> Centerline:
    """The cord's centerline in `rpi`, or NoCordError.

    Two passes: whole slices, then (unless `window_mm` is None or 0) a window of `window_mm` around the first
    curve on every slice, whose answer is kept (default: the model's second_look_mm, 56 mm unless its file
    says otherwise). on_stage: stage events (cordseg.stages) for the parts, centerline.*"""
    if window_mm is _MODEL:
        window_mm = model.contract.second_look_mm
    with timed(on_stage, "centerline.resample"):
        vol, zooms = _model_volume(rpi, model)  # resampled once, for both passes
    with timed(on_stage, "centerline.cnn1"):
        heat = _whole_slices(vol, model, progress, (0.0, 0.5 if window_mm else 1.0))
    with timed(on_stage, "centerline.optic"):
        first = _trace(heat, zooms, rpi, model, smoothness)
    if first is None:
        raise NoCordError("no spinal cord found")
    if not window_mm:
        return first
    with timed(on_stage, "centerline.second_look"):
        heat = _windows(vol, zooms, rpi, model, first, window_mm, progress, (0.5, 1.0))
    with timed(on_stage, "centerline.optic"):
        second = _trace(heat, zooms, rpi, model, smoothness)
    return first if second is None else second


def from_mask(rpi: Reoriented, mask_data: np.ndarray, mask_affine: np.ndarray) -> Centerline:
    """A given centerline (a mask: one or a few voxels per slice, on any grid) on `rpi`'s slices.

    Each marked voxel is placed in `rpi`'s voxel space through scanner coordinates, so the mask may come from
    another grid of the same session (a 0.5 mm resampling, a sagittal view). Slices with several points take
    their mean; slices between marked ones are interpolated linearly, so a point every few centimetres is
    enough; the centerline runs from the lowest marked slice to the highest (no extrapolation).
    """
    idx = np.argwhere(np.asarray(mask_data) > 0)
    if len(idx) == 0:
        raise InputError("the centerline mask has no marked voxel")
    pts = apply_affine(np.linalg.inv(rpi.affine) @ np.asarray(mask_affine, float), idx)  # mask -> RPI voxels
    z_round = np.rint(pts[:, 2]).astype(int)
    inside = (z_round >= 0) & (z_round < rpi.shape[2])
    if not inside.any():
        raise InputError("the centerline mask lies outside the image's field of view")
    pts, z_round = pts[inside], z_round[inside]
    zs = np.unique(z_round)
    xs = np.array([pts[z_round == z, 0].mean() for z in zs])
    ys = np.array([pts[z_round == z, 1].mean() for z in zs])
    z_int = np.arange(zs[0], zs[-1] + 1)
    return Centerline(z_int, np.interp(z_int, zs, xs), np.interp(z_int, zs, ys), rpi)
