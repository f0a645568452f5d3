"""Centerline detection: CNN1 heatmap on axial slices, a reward volume from it, OptiC's global optimum.

The reward is built on CNN1's own grid (1 mm in-plane for the shipped model): solving there is exact for
what the answer needs, and far cheaper than at 0.5 mm. Inside the predicted cord the reward grows with the
distance to the cord's edge (so the path runs through the middle); outside it is negative and falls with the
Euclidean distance to the nearest predicted cord voxel (so gaps are bridged towards the cord, and slices
without cord are left out when their cost outweighs what they add). Rewards are per mm of cord length, so
thick and thin slices weigh alike; OptiC's penalty is per mm of displacement squared over slice thickness.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError, ModelError, NoCordError
from .inference import Model
from .normalization import normalize_with
from .optic import optimal_path
from .orientation import Reoriented
from .resampling import resample, resampled_zooms

DEFAULT_SMOOTHNESS = 1.0  # OptiC's lambda, per mm^2 of displacement over mm of slice thickness
SLICE_BATCH = 8
# CNN1 need not see every thin slice: the centerline is smooth along z, so slices thinner than this are
# resampled to it for the heatmap (a 1 mm sagittal volume: half the CNN1 work), and the centerline is
# interpolated back onto every input slice.
CENTERLINE_SLICE_MM = 2.0


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


def heatmap(rpi: Reoriented, model: Model, progress=None) -> tuple[np.ndarray, tuple]:
    """CNN1 probability volume on the model's grid, and that grid's exact zooms."""
    if model.patch_shape is not None:
        raise ModelError(f"{model.path.name}: centerline models must be fully convolutional (patch 'slice')")
    target = model_grid(rpi, model, CENTERLINE_SLICE_MM)
    vol = resample(rpi.data, rpi.zooms, target, order=1)
    zooms = resampled_zooms(rpi.shape, rpi.zooms, target)
    vol = normalize_with(model.normalisation, vol, model.normalisation_params)
    m = max(1, model.size_multiple)
    nx, ny, nz = vol.shape
    px, py = (-nx) % m, (-ny) % m
    slices = np.pad(np.moveaxis(vol, 2, 0), ((0, 0), (0, px), (0, py)), mode="edge")
    heat = np.empty((nz, nx, ny), np.float32)
    for start in range(0, nz, SLICE_BATCH):
        stop = min(nz, start + SLICE_BATCH)
        heat[start:stop] = model.predict(slices[start:stop], flip_average=True)[:, :nx, :ny]
        if progress:
            progress("centerline", stop / nz)
    return np.moveaxis(heat, 0, 2), zooms


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


def detect(rpi: Reoriented, model: Model, *, smoothness: float = DEFAULT_SMOOTHNESS, progress=None) -> Centerline:
    """The cord's centerline in `rpi`, or NoCordError."""
    heat, zooms = heatmap(rpi, model, progress)
    if not (heat >= model.threshold).any():
        raise NoCordError("no spinal cord found")
    path = optimal_path(reward(heat, zooms, model.threshold), zooms, smoothness)
    if path is None:
        raise NoCordError("no spinal cord found")
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
        raise NoCordError("no spinal cord found")
    return Centerline(z_int, np.interp(z_int, z_r, x_r), np.interp(z_int, z_r, y_r), rpi)


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
    world = idx @ np.asarray(mask_affine, float)[:3, :3].T + np.asarray(mask_affine, float)[:3, 3]
    to_vox = np.linalg.inv(rpi.affine)
    pts = world @ to_vox[:3, :3].T + to_vox[:3, 3]
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
